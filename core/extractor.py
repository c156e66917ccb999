"""The shared engine: attention rows of chosen queries, for every layer and head, batched.

The model runs its own SDPA attention; during that forward pass a recorder (see ``attention_impl``)
receives each layer's per-head queries and keys and computes softmax rows *only* for the query positions
asked for. Cost over a plain forward pass: one ``[Q, d_head] x [d_head, seq]`` product per head and layer.

Shapes (B batch, S padded length, Q queries per sequence, L layers, H heads, d = d_head):
    input_ids, attention_mask    [B, S]      right padding only (attention_mask 1 = token, 0 = pad)
    query_positions              [B, Q]      indices into the unpadded part of each sequence
    AttentionRows.attention      [B, Q, L, H, S]   float32, each row sums to 1, padded keys get 0
    AttentionRows.scores         [B, Q, L, H, S]   float32 pre-softmax q.k * scaling, before masking
    AttentionRows.queries/keys   [B, S, L, H, d]   float32 per-head vectors as the model computed them
                                                   (rotary families: after the rotation, the q/k the model
                                                   dots; grouped-query keys repeated per query head)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from attnlab.core.attention_impl import head_edits_active, recording
from attnlab.core.architectures import SUPPORTED_MODEL_TYPES, installed_transformers
from attnlab.core.errors import InputError, UnsupportedModelError
from attnlab.core.models import LoadedModel, as_loaded

DEFAULT_MEMORY_BUDGET_MB = 1024


@dataclass
class AttentionRows:
    """What :func:`extract_attention` returns; absent parts are None. All tensors on ``out_device``."""

    attention: torch.Tensor | None
    scores: torch.Tensor | None
    queries: torch.Tensor | None
    keys: torch.Tensor | None
    query_positions: torch.Tensor
    attention_mask: torch.Tensor
    #: ``[B, Q, L, S]`` bool (with ``attention``): the keys each row could see in each layer, read from the mask the
    #: model applied there - a sliding-window layer sees fewer keys than a global one, so its chance level differs
    visible: torch.Tensor | None = None

    def to_bertviz(self) -> tuple[torch.Tensor, ...]:
        """The layout bertviz's ``head_view``/``model_view`` and CircuitsVis take: one ``[batch, heads, q, k]`` tensor
        per layer (CircuitsVis: ``rows.to_bertviz()[layer][0]`` with the tokens). Needs every query row (extract with
        ``query_positions=None``)."""
        batch, n_q, _, _, n_k = self.attention.shape
        full = torch.arange(n_k).expand(batch, n_k)
        real = self.attention_mask.bool().cpu()
        if n_q != n_k or not torch.equal(self.query_positions.cpu()[real], full[real]):
            raise InputError("to_bertviz needs every query row: extract with query_positions=None")
        return tuple(self.attention[:, :, layer].permute(0, 2, 1, 3).contiguous()
                     for layer in range(self.attention.shape[2]))


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids [B, S]`` and ``attention_mask [B, S]``."""
    if len(sequences) == 0:
        raise InputError("no sequences given")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


class _LastLayerRecorded(Exception):
    """Raised after the last layer's q/k are recorded: the rest of the forward pass is not needed."""


class _RowRecorder:
    """Receives (q, k, mask) per layer and keeps only what was asked for.

    After the last layer it aborts the forward pass: that layer's value/output projections, its MLP and
    the pooler cannot change any attention row, so computing them would be wasted work. What it keeps stays on
    the model's device until :meth:`stacked` (one transfer per chunk, not a blocking copy per layer: on a GPU
    each device-to-host copy would stall the queue of kernels behind it).
    """

    def __init__(self, layer_of, n_layers, query_positions, want_attention, want_scores, want_qk, out_device,
                 layers: list[int] | None = None):
        self.layer_of = layer_of
        self.layers = list(range(n_layers)) if layers is None else list(layers)  # what is kept, in this order
        self.last = max(self.layers)
        self.qpos = query_positions  # [B, Q] on the model's device
        self.want_attention, self.want_scores, self.want_qk = want_attention, want_scores, want_qk
        self.out_device = out_device
        self.attention = [None] * n_layers
        self.scores = [None] * n_layers
        self.queries = [None] * n_layers
        self.keys = [None] * n_layers
        self.visible = [None] * n_layers
        self.recorded: set[int] = set()

    def record(self, module, q, k, mask, scaling, causal):
        layer = self.layer_of.of(module)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: query head h reads key head h // (H / KV)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        self.recorded.add(layer)
        if layer in self.layers:
            self._record(layer, q, k, mask, scaling, causal)
        # (shared layers under a head edit: the editor counts calls too, so the pass must finish its last call)
        if layer == self.last and not (self.layer_of.shared and head_edits_active()):
            raise _LastLayerRecorded

    def _record(self, layer, q, k, mask, scaling, causal):
        batch = q.shape[0]
        if self.want_qk:
            self.queries[layer] = q.transpose(1, 2).float()  # [B, S, H, d]
            self.keys[layer] = k.transpose(1, 2).float()
        if not (self.want_attention or self.want_scores):
            return
        if self.qpos.shape[1] == 0:  # no rows asked for: empty [B, 0, H, S] results, not missing ones
            empty = torch.zeros(batch, 0, q.shape[1], k.shape[2], device=q.device)
            self.attention[layer] = empty if self.want_attention else None
            self.scores[layer] = empty if self.want_scores else None
            self.visible[layer] = empty[:, :, 0].bool() if self.want_attention else None
            return
        qpos = self.qpos.to(q.device)  # a device-mapped model's layers live on several devices (no-op otherwise)
        scores = row_scores(q, k, qpos, scaling)
        if self.want_scores:
            self.scores[layer] = scores
        if self.want_attention:
            self.attention[layer] = torch.softmax(apply_mask(scores, mask, causal, qpos), dim=-1)
            # -inf (bool masks) or the dtype's minimum (additive ones) where the mask hides the key
            hidden = apply_mask(scores.new_zeros(scores.shape[:2] + (1, scores.shape[-1])), mask, causal, qpos)
            self.visible[layer] = hidden[:, :, 0] > torch.finfo(torch.float32).min / 2  # [B, Q, S]

    def stacked(self, name):
        parts = [getattr(self, name)[layer] for layer in self.layers]
        if any(p is None for p in parts):
            return None
        if len({p.device for p in parts}) > 1:  # a device-mapped model: gather the layers on out_device first
            parts = [p.to(self.out_device) for p in parts]
        return torch.stack(parts, dim=2).to(self.out_device)  # layers go after [B, Q] (rows) or [B, S] (q/k)


def row_scores(q, k, qpos, scaling: float) -> torch.Tensor:
    """Pre-softmax scores ``[B, Q, H, S]`` (float32) of the queries at ``qpos`` ``[B, Q]``: ``q`` and ``k`` are
    ``[B, H, S, d]`` as the model computed them (grouped-query keys repeated to H heads)."""
    rows = torch.arange(q.shape[0], device=q.device)[:, None]
    q_rows = q.transpose(1, 2)[rows, qpos]  # [B, Q, H, d]
    # the product in the model's dtype (no fp32 copy of every layer's keys), the softmax in fp32
    return torch.einsum("bqhd,bhkd->bqhk", q_rows, k).float() * scaling


def apply_mask(scores, mask, causal: bool, qpos) -> torch.Tensor:
    """``scores`` ``[B, Q, H, S]`` with exactly the mask SDPA applied to these rows (bool: True attends; float:
    additive; None: none, or causal when ``causal``)."""
    if mask is None:
        if not causal:
            return scores
        key_idx = torch.arange(scores.shape[-1], device=scores.device)
        allowed = key_idx[None, None, :] <= qpos[:, :, None]  # [B, Q, S]
        return scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None]
    m = mask[:, 0].expand(scores.shape[0], -1, -1)[rows, qpos]  # [B, Q, S]
    if m.dtype == torch.bool:
        return scores.masked_fill(~m[:, :, None, :], float("-inf"))
    return scores + m[:, :, None, :].float()


class LayerIndex:
    """Which layer an attention call belongs to: by module where every layer has its own (a dict lookup), by
    call order where layers share one module (ALBERT) - a forward pass calls the layers' attention in order,
    so the i-th call of a pass is layer i mod L. ``of(module)`` returns None for a module that is not a layer's."""

    def __init__(self, lm: LoadedModel):
        modules = lm.arch.attention_modules(lm.base)
        self.n_layers = len(modules)
        self.shared = len({id(m) for m in modules}) < len(modules)
        self._by_id = {id(m): i for i, m in enumerate(modules)}
        self._calls = 0

    def of(self, module) -> int | None:
        if id(module) not in self._by_id:
            return None
        if not self.shared:
            return self._by_id[id(module)]
        layer = self._calls % self.n_layers
        self._calls += 1
        return layer


def _as_index_tensor(values, what: str) -> torch.Tensor:
    """Integer tensor from user input; floats are refused (truncating them would silently change the input)."""
    t = torch.as_tensor(values)
    if t.is_floating_point() or t.is_complex():
        raise InputError(f"{what} must be integers, got dtype {t.dtype}; convert with .long() only if that is meant")
    return t.long()


def validate_inputs(lm: LoadedModel, input_ids, attention_mask, query_positions):
    """Turn user input into tensors and reject what would fail deep inside transformers."""
    input_ids = _as_index_tensor(input_ids, "input_ids")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must have shape [batch, seq] with both > 0, got {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = _as_index_tensor(attention_mask, "attention_mask")
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise InputError(f"attention_mask must hold only 0 (padding) and 1 (token), got values "
                         f"{sorted(set(attention_mask.unique().tolist()) - {0, 1})[:5]}")
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    lengths = attention_mask.sum(1)
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any() or (lengths == 0).any():
        raise InputError(
            "attention_mask must be right-padded (ones, then zeros) with at least one token per sequence; "
            "left padding shifts position ids and changes the model's output"
        )
    longest = int(lengths.max())
    if longest > lm.max_positions:
        raise InputError(
            f"sequence of {longest} tokens is longer than the model's {lm.max_positions} positions "
            f"(max_position_embeddings of {lm.name}); lower the sequence length (e.g. --seq-len) so that every "
            f"sequence including special tokens has at most {lm.max_positions} tokens"
        )
    real = input_ids[attention_mask.bool()]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= lm.vocab_size):
        raise InputError(
            f"token ids must lie in [0, {lm.vocab_size}) for {lm.name}; got range "
            f"[{int(real.min())}, {int(real.max())}]"
        )
    if query_positions is None:
        # every position; rows of padding positions are computed for position 0 and zeroed afterwards
        all_positions = torch.arange(seq).expand(batch, seq)
        query_positions = torch.where(all_positions < lengths[:, None], all_positions, 0)
    query_positions = _as_index_tensor(query_positions, "query_positions")
    if query_positions.ndim == 1:
        query_positions = query_positions[:, None]
    if query_positions.ndim != 2 or query_positions.shape[0] != batch:
        raise InputError(
            f"query_positions must have shape [batch={batch}, queries], got {tuple(query_positions.shape)}"
        )
    if query_positions.numel():
        bad = (query_positions < 0) | (query_positions >= lengths[:, None])
        if bad.any():
            b, j = (int(x) for x in bad.nonzero()[0])
            raise InputError(
                f"query position {int(query_positions[b, j])} of sequence {b} is out of range: that sequence has "
                f"{int(lengths[b])} tokens (positions 0..{int(lengths[b]) - 1}; padding cannot be a query)"
            )
    return input_ids, attention_mask, query_positions


def bytes_per_sequence(lm: LoadedModel, seq: int, n_queries: int, want_qk: bool) -> int:
    """A deliberately generous estimate of peak memory one sequence adds to a forward pass."""
    cfg = lm.config
    hidden = cfg.hidden_size
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    item = torch.finfo(lm.dtype).bits // 8
    activations = seq * (8 * hidden + 2 * inner) * item
    attention = 2 * cfg.num_attention_heads * seq * seq * item  # math-kernel SDPA may build one layer's map
    kept = 2 * n_queries * lm.n_layers * cfg.num_attention_heads * seq * 4
    if want_qk:
        kept += 2 * seq * lm.n_layers * hidden * 4
    return activations + attention + kept


def _never_recorded(lm: LoadedModel, layers: list[int]):
    """A forward pass whose attention skipped the hook point: refuse (rows would be missing), saying why."""
    raise UnsupportedModelError(
        f"the attention of layer(s) {', '.join(map(str, layers[:8]))} of {lm.name} did not pass through attnlab's "
        f"attention function: this model's implementation (transformers {installed_transformers()}) computes "
        f"attention itself instead of through transformers' attention-function registry; "
        f"upgrade transformers or use a supported family ({', '.join(SUPPORTED_MODEL_TYPES)})")


def _check_finite(lm, attention: torch.Tensor) -> None:
    """NaN or inf in attention rows comes from the model (NaN or inf weights): say which model and where, rather
    than let a figure or a histogram fail later."""
    bad = ~torch.isfinite(attention)
    if bad.any():
        where = bad.reshape(-1, *attention.shape[-3:-1], attention.shape[-1]).any(-1).any(0)  # [L, H]
        layer, head = (int(i) for i in torch.nonzero(where)[0])
        raise InputError(f"model '{lm.name}' produced non-finite attention (NaN or inf), first in L{layer}H{head}; "
                         "its weights may hold NaN or inf - check the checkpoint")


def extract_attention(
    model,
    input_ids,
    attention_mask=None,
    query_positions=None,
    *,
    return_attention: bool = True,
    return_scores: bool = False,
    return_qk: bool = False,
    batch_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    out_device: str | torch.device = "cpu",
    progress: bool = False,
    layers: Sequence[int] | None = None,
) -> AttentionRows:
    """Attention probabilities of the chosen query rows for every layer and head.

    Args:
        model: a :class:`LoadedModel` or a supported transformers model.
        input_ids: ``[B, S]`` token ids (right-padded), or a 1-D tensor for one sequence.
        attention_mask: ``[B, S]``, 1 for tokens and 0 for padding; default all ones.
        query_positions: ``[B, Q]`` (or ``[B]`` for one query each). None: every position (full maps -
            memory grows with S^2). ``[B, 0]``: no rows (useful with ``return_qk``).
        return_scores: also return pre-softmax scores ``q.k * scaling`` (before masking).
        return_qk: also return per-head queries and keys ``[B, S, L, H, d_head]``.
        batch_size: sequences per forward pass; default chosen from ``memory_budget_mb``.
        layers: only these layers (0-based, in this order; default all): the forward pass stops after the last of
            them, so the first layer alone costs one layer's work. The layer axis then has ``len(layers)`` entries.

    Returns:
        :class:`AttentionRows`; ``attention`` is ``[B, Q, L, H, S]`` float32.
    """
    lm = as_loaded(model)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a whole number of at least 1 (or None for automatic), got {batch_size!r}")
    if not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0:
        raise InputError(f"memory_budget_mb must be a positive number of megabytes, got {memory_budget_mb!r}")
    query_positions_given = query_positions
    if layers is not None:
        layers = [int(_as_index_tensor(layer, "layers")) for layer in layers]
        if not layers or any(not 0 <= layer < lm.n_layers for layer in layers):
            raise InputError(f"layers must name at least one of the model's layers 0..{lm.n_layers - 1}, got {layers}")
    input_ids, attention_mask, query_positions = validate_inputs(lm, input_ids, attention_mask, query_positions)
    batch, seq = input_ids.shape
    if batch_size is None:
        per_seq = bytes_per_sequence(lm, seq, query_positions.shape[1], return_qk)
        batch_size = max(1, int(memory_budget_mb * 2**20 // per_seq))
    batch_size = max(1, min(int(batch_size), batch))
    device = lm.device
    layer_of = LayerIndex(lm)
    wanted = {"attention": return_attention, "scores": return_scores, "queries": return_qk, "keys": return_qk,
              "visible": return_attention}
    pieces: dict[str, list] = {name: [] for name, want in wanted.items() if want}

    starts = range(0, batch, batch_size)
    if progress:
        from attnlab.core.progress import bar

        starts = bar(starts, desc="attention", unit="chunk")
    with torch.inference_mode():
        for start in starts:
            stop = min(start + batch_size, batch)
            width = int(attention_mask[start:stop].sum(1).max())  # trim padding shared by the whole chunk
            ids = input_ids[start:stop, :width].to(device)
            mask = attention_mask[start:stop, :width].to(device)
            recorder = _RowRecorder(
                layer_of, lm.n_layers, query_positions[start:stop].to(device),
                return_attention, return_scores, return_qk, out_device, layers,
            )
            try:
                with recording(recorder):
                    lm.base(input_ids=ids, attention_mask=mask)
            except _LastLayerRecorded:
                pass
            missing = set(range(recorder.last + 1)) - recorder.recorded
            if missing:
                _never_recorded(lm, sorted(missing))
            for name in pieces:
                part = recorder.stacked(name)
                pad = seq - width  # restore the caller's width: keys (or positions) beyond the chunk are padding
                if pad:
                    shape = list(part.shape)
                    if name in {"attention", "scores", "visible"}:
                        shape[-1] = pad
                        part = torch.cat([part, part.new_zeros(shape)], dim=-1)
                    else:
                        shape[1] = pad
                        part = torch.cat([part, part.new_zeros(shape)], dim=1)
                pieces[name].append(part)
    out = {name: torch.cat(parts) for name, parts in pieces.items()}
    if query_positions_given is None:
        padding_rows = ~attention_mask.bool().to(out_device)  # [B, S] query rows that are padding
        for name in ("attention", "scores", "visible"):
            if name in out:
                out[name][padding_rows] = 0
    if "attention" in out:
        _check_finite(lm, out["attention"])
    return AttentionRows(
        attention=out.get("attention"),
        scores=out.get("scores"),
        queries=out.get("queries"),
        keys=out.get("keys"),
        query_positions=query_positions,
        attention_mask=attention_mask,
        visible=out.get("visible"),
    )
