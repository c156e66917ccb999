"""Which earlier head feeds a head's attention pattern, measured in the forward pass (path patching of queries and
keys; Wang et al. 2022, Goldowsky-Dill et al. 2023).

Weight-based composition (:func:`attnlab.circuits.scores.composition_scores`, Elhage et al. 2021) reads
``W_OV1 W_QK2`` and cannot see through LayerNorm, the MLPs or rotary positions: in the rotary organisms trained here
every K-composition score sits at its random baseline. Here the question is put to the model itself:

- a *receiver* head g (layer L) attends from each query to its *target* (for an induction head: the token after the
  previous instance of the query's token, or at a [MASK], the previous instance itself);
- a *sender* head s in an earlier layer is ablated (zero or mean, as in :func:`attnlab.ablate`) in a second run,
  whose layer-L queries and keys are kept;
- g's pattern is recomputed with only its **keys** (path K) or only its **queries** (path Q) from the ablated run,
  everything else clean: g's attention to its target there, against the clean run's, is what flows from s to g
  through that path (directly or through the layers between). Layer L's input is clean in such a run, so the
  patched rows need only both runs' layer-L queries and keys: one forward pass per ablation.

``lost`` = (clean - patched) / clean, summed over trials: 0 when s does not feed g through the path, 1 when the
path carries all of g's attention to the target.

Ablating one head finds the heads a receiver *needs*; it misses feeders that back each other up (two previous-token
heads that write the same thing: ablating either removes nothing). So each sender is also measured *alone in its
layer* (denoising; Heimersheim and Nanda 2024): with every other head of its layer ablated, ``restored`` = (alone -
floor) / (clean - floor), where ``floor`` has the whole layer ablated and ``layer_lost`` = (clean - floor) / clean is
what the layer carries through the path. :data:`FEEDER_RULE` names a sender a feeder by either measure.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.circuits.ablation import HeadEdit, ablation_values, layer_index
from attnlab.core.attention_impl import editing, recording
from attnlab.core.errors import InputError
from attnlab.core.extractor import apply_mask, row_scores
from attnlab.core.stats import bootstrap_ratio_ci, top_share

PATHS = ("K", "Q")
MIN_LOST = 0.25
MIN_RESTORED = 0.5
MAX_TOP_SHARE = 0.5
FEEDER_RULE = (f"a sender is named a feeder of a receiver through a path when ablating it removes at least "
               f"{MIN_LOST:.0%} of the receiver's attention to its target there (necessary), or when, with the rest of "
               f"its layer ablated, it alone restores at least {MIN_RESTORED:.0%} of what its layer carries there and "
               f"the layer carries at least {MIN_LOST:.0%} (sufficient: feeders that back each other up); either way "
               f"the 95% CI's lower bound is above 0 and no single trial carries more than {MAX_TOP_SHARE:.0%}")


class _Stop(Exception):
    """Raised after the last layer a capture needs: the rest of the forward pass cannot change it."""


class _Capture:
    """A recorder keeping what the chosen layers' attention was computed from: ``{layer: (q, k, mask, scaling,
    causal)}``, q and k ``[B, H, S, d]`` (grouped-query keys repeated to H heads), as the model computed them."""

    def __init__(self, lm, layers):
        self.layer_of, self.layers, self.kept = layer_index(lm), set(layers), {}

    def record(self, module, q, k, mask, scaling, causal):
        layer = self.layer_of.of(module)
        if layer in self.layers:
            if k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            self.kept[layer] = (q, k, mask, scaling, causal)
            if len(self.kept) == len(self.layers):
                raise _Stop


def _capture(lm, ids, layers, edit=None) -> dict:
    cap = _Capture(lm, layers)
    with torch.inference_mode(), recording(cap), (editing(edit) if edit else nullcontext()):
        try:
            lm.base(input_ids=ids.to(lm.device), attention_mask=torch.ones_like(ids).to(lm.device))
        except _Stop:
            pass
    if len(cap.kept) != len(cap.layers):
        raise InputError(f"path patching: the attention of layers {sorted(cap.layers - set(cap.kept))} was never "
                         f"computed through attnlab's hook point for model '{lm.name}'")
    return cap.kept


def _to_targets(q, k, mask, scaling, causal, queries, targets) -> torch.Tensor:
    """Attention of the queries to their targets, mean over a trial's queries: ``[T, H]`` float64, computed as the
    extractor computes every row (:func:`~attnlab.core.extractor.row_scores`, :func:`~attnlab.core.extractor.apply_mask`)."""
    qpos = queries.to(q.device)
    rows = torch.softmax(apply_mask(row_scores(q, k, qpos, scaling), mask, causal, qpos), dim=-1)  # [T, Q, H, S]
    index = targets.to(q.device)[:, :, None, None].expand(*rows.shape[:3], 1)
    return rows.gather(-1, index)[..., 0].mean(1).double().cpu()


@dataclass
class PathResult:
    """``receivers``: the heads traced [(layer, head)]; ``clean``: ``[R, T]`` each receiver's attention to its
    targets per trial (mean over the trial's queries); ``patched[path]``: ``[R, L, H, T]`` the same with one sender
    (layer, head) ablated on that path only; ``alone[path]``: ``[R, L, H, T]`` with every head of the sender's layer
    but the sender ablated; ``floor[path]``: ``[R, L, T]`` with the whole layer ablated. NaN where the sender is not
    in an earlier layer."""

    receivers: list
    clean: np.ndarray
    patched: dict
    mode: str
    alone: dict
    floor: dict

    def lost(self, path: str) -> np.ndarray:
        """``[R, L, H]``: share of each receiver's attention to its targets that ablating the sender removes through
        ``path`` (sums over trials)."""
        total = self.clean.sum(-1)[:, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (total - self.patched[path].sum(-1)) / total

    def layer_lost(self, path: str) -> np.ndarray:
        """``[R, L]``: share of each receiver's attention to its targets that ablating a whole layer removes."""
        total = self.clean.sum(-1)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (total - self.floor[path].sum(-1)) / total

    def restored(self, path: str) -> np.ndarray:
        """``[R, L, H]``: share of what its layer carries through ``path`` that the sender alone restores."""
        floor = self.floor[path].sum(-1)[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.alone[path].sum(-1) - floor) / (self.clean.sum(-1)[:, None, None] - floor)

    def table(self, seed: int) -> list[dict]:
        """One row per receiver, sender and path: lost share, its bootstrap 95% CI over trials, the largest trial's
        share of the loss; the layer's lost share, the share the sender restores alone with its CI and largest
        trial's share (NaN where the layer carries under ``MIN_LOST``); ``named_by`` (necessary, sufficient, both
        or none) and ``named`` by :data:`FEEDER_RULE`."""
        rows = []
        for r, (rl, rh) in enumerate(self.receivers):
            for path in PATHS:
                lost, layer_lost, restored = self.lost(path)[r], self.layer_lost(path)[r], self.restored(path)[r]
                for sl in range(rl):
                    floor = self.floor[path][r, sl]
                    for sh in range(lost.shape[1]):
                        clean = self.clean[r]
                        patched, alone = self.patched[path][r, sl, sh], self.alone[path][r, sl, sh]
                        lo, hi = bootstrap_ratio_ci(clean - patched, clean, seed)
                        top = float(top_share(clean - patched))
                        if layer_lost[sl] >= MIN_LOST:
                            r_lo, r_hi = bootstrap_ratio_ci(alone - floor, clean - floor, seed)
                            r_top, r_mean = float(top_share(alone - floor)), float(restored[sl, sh])
                        else:  # the layer carries (almost) nothing here: a share of it is noise over ~0
                            r_lo = r_hi = r_top = r_mean = float("nan")
                        by = [name for name, ok in (
                            ("necessary", lost[sl, sh] >= MIN_LOST and lo > 0 and top <= MAX_TOP_SHARE),
                            ("sufficient", layer_lost[sl] >= MIN_LOST and restored[sl, sh] >= MIN_RESTORED
                             and r_lo > 0 and r_top <= MAX_TOP_SHARE)) if ok]
                        rows.append({"receiver": f"L{rl}H{rh}", "sender": f"L{sl}H{sh}", "path": path,
                                     "clean": float(clean.mean()), "patched": float(patched.mean()),
                                     "lost": float(lost[sl, sh]), "ci_low": lo, "ci_high": hi,
                                     "top_trial_share": top, "layer_lost": float(layer_lost[sl]),
                                     "restored": r_mean, "restored_ci_low": r_lo,
                                     "restored_ci_high": r_hi, "restored_top_trial_share": r_top,
                                     "named_by": "+".join(by), "named": bool(by)})
        return rows


def induction_paths_input(batch, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [T, S], queries [T, 1], targets [T, 1])`` of an RRT batch (:func:`attnlab.induction.variants.build_batch`)
    at the target the induction verdict reads for this kind of model: decoders, the token after the query token's
    previous instance (``after``); masked LMs, at the [MASK], the previous instance of the token it hides
    (``prev``)."""
    target = batch.targets["after" if causal else "prev"]
    return batch.input_ids, batch.mask_index[:, None], target[:, None]


def trace_paths(lm, ids, queries, targets, receivers, *, mode: str = "zero", reference=None) -> PathResult:
    """The K and Q paths from every head of an earlier layer into each receiver (see the module doc).

    ``ids`` ``[T, S]`` (no padding), ``queries``/``targets`` ``[T, Q]`` positions, ``receivers`` [(layer, head)].
    Cost: two forward passes per sender (it ablated; it alone in its layer) and one per sender layer (all ablated),
    stopping at the last receiver layer; the patched rows of a receiver layer only need its clean and ablated
    queries and keys (its input is clean in both patched runs)."""
    ids, queries, targets = (torch.as_tensor(x) for x in (ids, queries, targets))
    receivers = sorted({(int(a), int(b)) for a, b in receivers})
    if not receivers:
        raise InputError("path patching needs at least one receiver head (layer, head)")
    if any(not (0 < a < lm.n_layers and 0 <= b < lm.n_heads) for a, b in receivers):
        raise InputError(f"receivers must be heads of layers 1..{lm.n_layers - 1} (a head in layer 0 has no earlier "
                         f"head), got {receivers}")
    layers = sorted({a for a, _ in receivers})
    values = ablation_values(lm, mode, reference)  # once, not once per sender
    clean = _capture(lm, ids, layers)
    clean_att = {layer: _to_targets(*clean[layer], queries, targets) for layer in layers}  # [T, H]
    n = ids.shape[0]
    patched, alone = ({p: np.full((len(receivers), lm.n_layers, lm.n_heads, n), np.nan) for p in PATHS}
                      for _ in range(2))
    floor = {p: np.full((len(receivers), lm.n_layers, n), np.nan) for p in PATHS}

    def run(sl: int, ablated_heads: list[int], into: dict, where: tuple) -> None:
        """Each later receiver r's attention to its targets ``[T]``, with heads ``ablated_heads`` of layer ``sl``
        ablated on each path, into ``into[path][(r, *where)]``."""
        later = [layer for layer in layers if layer > sl]
        ablated = _capture(lm, ids, later, HeadEdit(layer_index(lm), [(sl, h) for h in ablated_heads], mode, values))
        for layer in later:
            q, k, mask, scaling, causal = clean[layer]
            q_abl, k_abl = ablated[layer][:2]
            got = {"K": _to_targets(q, k_abl, mask, scaling, causal, queries, targets),
                   "Q": _to_targets(q_abl, k, mask, scaling, causal, queries, targets)}
            for r, (rl, rh) in enumerate(receivers):
                if rl == layer:
                    for path in PATHS:
                        into[path][(r, *where)] = got[path][:, rh].numpy()

    everyone = list(range(lm.n_heads))
    for sl in range(max(layers)):
        run(sl, everyone, floor, (sl,))
        for sh in everyone:
            run(sl, [sh], patched, (sl, sh))
            run(sl, [h for h in everyone if h != sh], alone, (sl, sh))
    clean_rows = np.stack([clean_att[rl][:, rh].numpy() for rl, rh in receivers])
    return PathResult(receivers, clean_rows, patched, mode, alone, floor)
