"""Head ablation and activation patching through the one hook point (the ``attnlab_sdpa`` attention function).

While :func:`ablate` is active, every attention call hands its per-head outputs ``[batch, seq, heads, d_head]``
(after softmax x V, before the output projection) to an editor that replaces the chosen heads':

- ``zero``: by 0 - the same as zeroing those heads' columns of the output projection (tested against HF eager);
- ``mean``: by the head's mean output over the real tokens of a ``reference`` batch (one ``[d_head]`` vector);
- ``resample``: by its output on another input (``reference``, same shape as the ablated batch): patching.

>>> with attnlab.ablate(lm, heads=[(9, 0), (10, 9)], mode="zero"):
...     logits = lm.model(input_ids).logits          # any forward pass, the extractor included

Nothing is registered on the modules; leaving the block restores the model exactly.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from attnlab.circuits.experiment import MODES  # noqa: F401  (the config's choices)
from attnlab.core.attention_impl import editing
from attnlab.core.errors import InputError
from attnlab.core.models import as_loaded


def layer_index(lm):
    """A fresh :class:`~attnlab.core.extractor.LayerIndex` (one per forward pass sequence it follows)."""
    from attnlab.core.extractor import LayerIndex

    return LayerIndex(lm)


def parse_heads(spec, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """"L9H0,L10H9" (or [(9, 0), (10, 9)]) -> [(9, 0), (10, 9)], checked against the model's shape."""
    if isinstance(spec, str):
        heads = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            m = re.fullmatch(r"[Ll](\d+)[Hh](\d+)", part)
            if not m:
                raise InputError(f"cannot read head {part!r}; write heads as L<layer>H<head>, e.g. L9H0,L10H9")
            heads.append((int(m.group(1)), int(m.group(2))))
    else:
        heads = [_head_pair(item) for item in spec]
    if not heads:
        raise InputError("no heads given; name at least one, e.g. L9H0")
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise InputError(f"head L{layer}H{head} does not exist: the model has layers 0..{n_layers - 1} and heads "
                             f"0..{n_heads - 1} (0-based)")
    return sorted(set(heads))


def _head_pair(item) -> tuple[int, int]:
    """``(layer, head)`` as whole numbers; 0.5 or True is refused, not rounded."""
    import operator

    try:
        if len(item) != 2 or any(isinstance(v, bool) for v in item):
            raise TypeError
        return operator.index(item[0]), operator.index(item[1])
    except TypeError:
        raise InputError(f"cannot read head {item!r}; give (layer, head) pairs of whole numbers, e.g. [(9, 0)]") from None


class HeadEdit:
    """Replaces the chosen heads' outputs. ``values[layer]``: ``[H, d]`` (mean) or ``[B, S, H, d]`` (resample)."""

    def __init__(self, layer_of: dict, heads: list[tuple[int, int]], mode: str, values: dict | None = None):
        self.layer_of = layer_of
        self.heads: dict = {}
        for layer, head in heads:
            self.heads.setdefault(layer, []).append(head)
        self.mode, self.values = mode, values or {}

    def edit(self, module, out):
        layer = self.layer_of.of(module)
        heads = self.heads.get(layer)
        if not heads:
            return out
        out = out.clone()
        if self.mode == "zero":
            out[:, :, heads] = 0
        elif self.mode == "mean":
            out[:, :, heads] = self.values[layer][heads].to(out.dtype)
        else:
            source = self.values[layer]
            if source.shape != out.shape:
                raise InputError(f"resample: the reference batch has shape {tuple(source.shape[:2])} but the ablated "
                                 f"one {tuple(out.shape[:2])}; pass a reference of the same batch and length")
            out[:, :, heads] = source[:, :, heads].to(out.dtype)
        return out


class _Record:
    """An editor that changes nothing and keeps every layer's per-head outputs."""

    def __init__(self, layer_of):
        self.layer_of, self.outputs = layer_of, {}

    def edit(self, module, out):
        self.outputs[self.layer_of.of(module)] = out.detach()
        return out


def head_outputs(model, input_ids, attention_mask=None) -> dict:
    """Every layer's per-head outputs on a batch: ``{layer: [B, S, H, d_head]}`` (before the output projection)."""
    lm = as_loaded(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long).to(lm.device)
    mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(lm.device)
    record = _Record(layer_index(lm))
    with torch.inference_mode(), editing(record):
        lm.base(input_ids=ids, attention_mask=mask)
    return record.outputs


def ablation_values(lm, mode: str, reference, attention_mask=None) -> dict:
    """What ``mode`` replaces heads by: {} (zero), per-layer means ``[H, d]`` or full outputs (resample)."""
    if mode not in MODES:
        raise InputError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "zero":
        return {}
    if reference is None:
        raise InputError(f"mode {mode!r} needs a reference batch (input ids) to take head outputs from")
    outs = head_outputs(lm, reference, attention_mask)
    if mode == "resample":
        return outs
    ids = torch.as_tensor(reference)
    valid = (torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)).bool()
    return {layer: out[valid.to(out.device)].mean(0) for layer, out in outs.items()}  # [H, d] per layer


@contextmanager
def ablate(model, heads, mode: str = "zero", reference=None, attention_mask=None):
    """Ablate ``heads`` ([(layer, head)] or "L9H0,L10H9") in every forward pass inside the block (see module doc).

    ``reference``: input ids ``[B, S]`` whose head outputs ``mean`` averages or ``resample`` patches in."""
    lm = as_loaded(model)
    chosen = parse_heads(heads, lm.n_layers, lm.n_heads)
    values = ablation_values(lm, mode, reference, attention_mask)
    with editing(HeadEdit(layer_index(lm), chosen, mode, values)):
        yield
