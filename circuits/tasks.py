"""The behavioural counterpart of the induction map, and head scans that reuse the unchanged computation.

Task ``rrt`` (masked LMs): random tokens X X (standard RRT, clean protocol). For each trial the same token is
masked once in the second copy and once, in a separate sequence, in the first copy (where no earlier copy can
be read). The per-trial metrics are the cross-entropy of the masked token in the second copy (``ce_second``),
its top-1 accuracy (``top1_second``), and the **in-context copying gain** ``ce_first - ce_second``: what the
earlier copy buys. Ablating a head that the model uses for copying lowers the gain.

:func:`scan_rrt` ablates every head one at a time without re-running the layers before it: the inputs of
every layer are computed once per batch, and the ablation of a head in layer l runs only layers l..L-1 (and
the MLM head at the masked positions). Cost relative to L x H full forward passes: about (L + 1) / (2 L).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.circuits.ablation import HeadEdit, ablation_values, layer_index
from attnlab.core.attention_impl import editing
from attnlab.core.errors import InputError, MissingHeadError
from attnlab.induction.protocols import make_protocol, token_spec_for
from attnlab.induction.variants import build_batch, get_variant

RRT_METRICS = ("copying_gain", "ce_second", "top1_second")


@dataclass
class RRTTask:
    """Two masked versions of the same T sequences ``[T, S]``: mask in the second copy, and in the first."""

    ids_second: torch.Tensor
    pos_second: torch.Tensor
    ids_first: torch.Tensor
    pos_first: torch.Tensor
    token: torch.Tensor  # [T] the masked token's id

    @property
    def n_trials(self) -> int:
        return self.ids_second.shape[0]


def rrt_task(lm, trials: int, n: int, seed: int) -> RRTTask:
    """Standard RRT, clean protocol: every masked token occurs exactly once per copy."""
    if lm.is_causal:
        raise InputError(f"model '{lm.name}' is causal; the rrt task masks a token of the second copy, which needs a "
                         "masked LM - for decoders use attnlab.ablate() with the causal induction variant")
    if not lm.has_lm_head or lm.lm_head() is None:
        raise MissingHeadError(f"model '{lm.name}' has no masked-LM head; the rrt task reads the masked token's "
                               "prediction (load it with masked_lm=True, e.g. bert-base-uncased)")
    protocol = make_protocol("clean", token_spec_for(lm))
    batch = build_batch(get_variant("standard"), protocol, trials, n, seed, max_positions=lm.max_positions)
    rows = torch.arange(trials)
    ids_first = batch.input_ids.clone()
    ids_first[rows, batch.mask_index] = batch.masked_token  # unmask the second copy...
    prev = batch.targets["prev"]
    ids_first[rows, prev] = protocol.mask_id  # ...and mask the same token in the first
    return RRTTask(batch.input_ids, batch.mask_index, ids_first, prev, batch.masked_token)


def _mask_loss(lm, hidden, pos, token):
    """Cross-entropy and top-1 correctness at the masked positions: ``([T], [T])``."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = lm.lm_head()(hidden[rows, pos.to(hidden.device)]).float()
    target = token.to(hidden.device)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return ce.double().cpu(), (logits.argmax(-1) == target).double().cpu()


class _Parts:
    """Per-batch losses of the two masked versions, gathered into the per-trial metrics ``[T]``."""

    def __init__(self):
        self.ce = {"first": [], "second": []}
        self.top1_second = []

    def add(self, which: str, ce, top1) -> None:
        self.ce[which].append(ce)
        if which == "second":
            self.top1_second.append(top1)

    def metrics(self) -> dict:
        first, second = torch.cat(self.ce["first"]), torch.cat(self.ce["second"])
        return {"copying_gain": first - second, "ce_second": second, "top1_second": torch.cat(self.top1_second)}


def rrt_metrics(lm, task: RRTTask, batch_size: int = 16) -> dict:
    """Per-trial ``{copying_gain, ce_second, top1_second}`` ``[T]`` under whatever ablation is active."""
    parts = _Parts()
    with torch.inference_mode():
        for s in range(0, task.n_trials, batch_size):
            e = min(s + batch_size, task.n_trials)
            for which in ("first", "second"):
                ids = getattr(task, f"ids_{which}")[s:e].to(lm.device)
                hidden = lm.base(input_ids=ids).last_hidden_state
                parts.add(which, *_mask_loss(lm, hidden, getattr(task, f"pos_{which}")[s:e], task.token[s:e]))
    return parts.metrics()


def _layers(lm):
    return lm.arch.bert_layers(lm.base)


def scan_rrt(lm, task: RRTTask, mode: str = "zero", reference=None, heads=None, batch_size: int = 16,
             progress: bool = False) -> dict:
    """Per-trial rrt metrics with each head ablated alone: ``{(layer, head): {metric: [T]}}``.

    Layer inputs are computed once per batch; ablating a head of layer l re-runs only layers l..L-1."""
    if lm.arch.bert_layers is None:
        raise InputError(f"the head scan reruns a BERT-style encoder layer by layer; model '{lm.name}' "
                         f"({lm.model_type}) is not one - use attnlab.ablate() head by head for other families")
    values = ablation_values(lm, mode, reference)
    layer_of = layer_index(lm)
    layers = _layers(lm)
    heads = heads or [(layer, head) for layer in range(lm.n_layers) for head in range(lm.n_heads)]
    parts = {h: _Parts() for h in heads}
    starts = range(0, task.n_trials, batch_size)
    if progress:
        from attnlab.core.progress import bar

        starts = bar(starts, desc="ablation scan", unit="batch")
    with torch.inference_mode():
        for s in starts:
            e = min(s + batch_size, task.n_trials)
            for which in ("first", "second"):
                ids = getattr(task, f"ids_{which}")[s:e].to(lm.device)
                inputs = lm.base(input_ids=ids, output_hidden_states=True).hidden_states  # input of every layer
                pos, token = getattr(task, f"pos_{which}")[s:e], task.token[s:e]
                for layer, head in heads:
                    x = inputs[layer]
                    with editing(HeadEdit(layer_of, [(layer, head)], mode, _batch_values(values, mode, s, e))):
                        for block in layers[layer:]:
                            x = block(x, attention_mask=None)
                            x = x[0] if isinstance(x, tuple) else x
                    parts[(layer, head)].add(which, *_mask_loss(lm, x, pos, token))
    return {h: p.metrics() for h, p in parts.items()}


def _batch_values(values: dict, mode: str, s: int, e: int) -> dict:
    """Resample values follow the trials of the batch; means and zero do not depend on it."""
    if mode != "resample":
        return values
    return {layer: v[s:e] for layer, v in values.items()}
