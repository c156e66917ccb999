"""The behavioural counterpart of the induction map, and head scans that reuse the unchanged computation.

Task ``rrt`` (masked LMs): random tokens X X (standard RRT, clean protocol), one token of the second copy
masked. Its control is the same [MASK] at the same position of the trial's null sequence (the induction maps'
null: the first copy redrawn, so the masked token has no copy anywhere - a bidirectional model could read a
*later* copy, so masking the first copy instead would not remove the copy). The per-trial metrics are the
cross-entropy of the masked token in the second copy (``ce_second``), its top-1 accuracy (``top1_second``), and
the **in-context copying gain** ``ce_control - ce_second``: what the copy buys. Ablating a head that the model
uses for copying lowers the gain. Decoders: (BOS) X X with every token of X read left to right; the control is
the first copy (a decoder cannot see the second from it), and the metrics are the mean next-token losses of X's
tokens 2..n in each copy (:class:`CausalRRTTask`).

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
from attnlab.induction.variants import build_batch, build_null, get_variant

RRT_METRICS = ("copying_gain", "ce_second", "top1_second")


@dataclass
class RRTTask:
    """T masked trials ``[T, S]`` (the mask in the second copy) and their controls (the same [MASK] position in the
    null sequence, where the token has no copy)."""

    ids_second: torch.Tensor
    pos_second: torch.Tensor
    ids_control: torch.Tensor
    pos_control: torch.Tensor
    token: torch.Tensor  # [T] the masked token's id

    @property
    def n_trials(self) -> int:
        return self.ids_second.shape[0]


@dataclass
class CausalRRTTask:
    """Decoders: ``[T, S]`` sequences (BOS) X X; X's tokens 2..n are predicted in each copy (next-token loss), the
    first copy with no earlier instance to read, the second with one. ``start``: X's first position."""

    ids: torch.Tensor
    start: int
    n: int

    @property
    def n_trials(self) -> int:
        return self.ids.shape[0]

    @property
    def ids_second(self) -> torch.Tensor:  # the input a mean ablation's reference is taken from
        return self.ids


def rrt_task(lm, trials: int, n: int, seed: int, end_sep: bool = True):
    """Standard RRT, clean protocol: every token of X occurs exactly once per copy. Masked LMs: one token masked
    per trial (:class:`RRTTask`), ``[CLS] X X [SEP]`` (without the [SEP] when not ``end_sep``); decoders: every
    token of X read left to right (:class:`CausalRRTTask`)."""
    if lm.is_causal:
        if not lm.has_lm_head or lm.lm_head() is None:
            raise MissingHeadError(f"model '{lm.name}' has no LM head; the rrt task reads its next-token predictions "
                                   "(load it with its head)")
        protocol = make_protocol("clean", token_spec_for(lm))
        body = protocol.draw(trials, n, torch.Generator().manual_seed(seed))
        ids, start = protocol.frame(torch.cat([body, body], dim=1))
        return CausalRRTTask(ids, start, n)
    if not lm.has_lm_head or lm.lm_head() is None:
        raise MissingHeadError(f"model '{lm.name}' has no masked-LM head; the rrt task reads the masked token's "
                               "prediction (load it with masked_lm=True, e.g. bert-base-uncased)")
    protocol = make_protocol("clean", token_spec_for(lm), end_sep)
    variant = get_variant("standard")
    batch = build_batch(variant, protocol, trials, n, seed, max_positions=lm.max_positions)
    control = build_null(variant, protocol, batch, n, seed)  # the [MASK] kept in place, no token repeated
    return RRTTask(batch.input_ids, batch.mask_index, control, batch.mask_index.clone(), batch.masked_token)


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
        self.ce = {"control": [], "second": []}
        self.top1_second = []

    def add(self, which: str, ce, top1) -> None:
        self.ce[which].append(ce)
        if which == "second":
            self.top1_second.append(top1)

    def metrics(self) -> dict:
        control, second = torch.cat(self.ce["control"]), torch.cat(self.ce["second"])
        return {"copying_gain": control - second, "ce_second": second, "top1_second": torch.cat(self.top1_second)}


def _causal_losses(lm, ids: torch.Tensor, task: CausalRRTTask) -> dict:
    """Per-trial mean next-token cross-entropy over X's tokens 2..n in each copy, and top-1 in the second."""
    logits = lm.model(input_ids=ids.to(lm.device)).logits.float()
    target = ids.to(logits.device)
    a, n = task.start, task.n
    # logits at position p predict the token at p + 1: X's tokens 2..n sit at a+1..a+n-1 and a+n+1..a+2n-1
    first = slice(a, a + n - 1)
    second = slice(a + n, a + 2 * n - 1)
    out = {}
    for which, sl in (("first", first), ("second", second)):
        pred = logits[:, sl]
        gold = target[:, sl.start + 1:sl.stop + 1]
        ce = torch.nn.functional.cross_entropy(pred.transpose(1, 2), gold, reduction="none").mean(1)
        out[which] = (ce.double().cpu(), (pred.argmax(-1) == gold).double().mean(1).cpu())
    return out


def rrt_metrics(lm, task, batch_size: int = 16) -> dict:
    """Per-trial ``{copying_gain, ce_second, top1_second}`` ``[T]`` under whatever ablation is active."""
    parts = _Parts()
    if isinstance(task, CausalRRTTask):
        with torch.inference_mode():
            for s in range(0, task.n_trials, batch_size):
                losses = _causal_losses(lm, task.ids[s:s + batch_size], task)
                parts.add("control", *losses["first"])  # a decoder's first copy has no copy before it
                parts.add("second", *losses["second"])
        return parts.metrics()
    with torch.inference_mode():
        for s in range(0, task.n_trials, batch_size):
            e = min(s + batch_size, task.n_trials)
            for which in ("control", "second"):
                ids = getattr(task, f"ids_{which}")[s:e].to(lm.device)
                hidden = lm.base(input_ids=ids).last_hidden_state
                parts.add(which, *_mask_loss(lm, hidden, getattr(task, f"pos_{which}")[s:e], task.token[s:e]))
    return parts.metrics()


def _layers(lm):
    return lm.arch.bert_layers(lm.base)


def scan_rrt(lm, task: RRTTask, mode: str = "zero", reference=None, heads=None, batch_size: int = 16,
             progress: bool = False) -> dict:
    """Per-trial rrt metrics with each head ablated alone: ``{(layer, head): {metric: [T]}}``.

    Layer inputs are computed once per batch; ablating a head of layer l re-runs only layers l..L-1 (BERT-style
    encoders). Other families (decoders) run one full forward pass per head under :func:`ablate`."""
    if lm.arch.bert_layers is None or isinstance(task, CausalRRTTask):
        return _scan_by_forward(lm, task, mode, reference, heads, batch_size, progress)
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
            for which in ("control", "second"):
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


def _scan_by_forward(lm, task, mode, reference, heads, batch_size, progress) -> dict:
    from attnlab.circuits.ablation import ablate

    heads = heads or [(layer, head) for layer in range(lm.n_layers) for head in range(lm.n_heads)]
    if progress:
        from attnlab.core.progress import bar

        heads = bar(heads, desc="ablation scan", unit="head")
    out = {}
    for layer, head in heads:
        with ablate(lm, [(layer, head)], mode=mode, reference=reference):
            out[(layer, head)] = rrt_metrics(lm, task, batch_size)
    return out


def _batch_values(values: dict, mode: str, s: int, e: int) -> dict:
    """Resample values follow the trials of the batch; means and zero do not depend on it."""
    if mode != "resample":
        return values
    return {layer: v[s:e] for layer, v in values.items()}
