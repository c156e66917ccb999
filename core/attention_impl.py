"""The one hook point: an attention implementation that is SDPA plus an optional recorder.

transformers routes the attention call of every supported family (``core.architectures``) through a registry of
attention functions (``AttentionInterface``). We register ``"attnlab_sdpa"``: it runs the model's own
``scaled_dot_product_attention`` unchanged, and, when a :class:`Recorder` is active, hands it the
per-head queries and keys *as the model computed them* (after any scaling the architecture does in
its projection, and after the rotation on rotary families; grouped-query keys have fewer heads) together with the
mask and scaling the model used. The recorder then computes only the
attention rows it was asked for, so the forward pass never materialises ``[layers, heads, seq, seq]``.

The same function is where heads are ablated or patched (``circuits/ablation.py``): while an editor is active
it receives each layer's per-head outputs ``[batch, seq, heads, d_head]`` before the output projection.

Hook names (TransformerLens style, one per activation):
    ``q``      per-head queries  ``[batch, heads, seq, d_head]``
    ``k``      per-head keys     ``[batch, heads, seq, d_head]``
    ``mask``   the model's mask  (None, bool ``[batch|1, 1, seq, seq]`` True=attend, or additive float)
"""

from __future__ import annotations

import contextvars
from typing import Callable

import torch

CAPTURE_IMPLEMENTATION = "attnlab_sdpa"

# The recorder for the forward pass in flight (None: behave exactly like plain SDPA).
_ACTIVE_RECORDER: contextvars.ContextVar = contextvars.ContextVar("attnlab_recorder", default=None)
# Edits of the per-head outputs before the output projection (ablation, patching, recording), outermost
# first: nested blocks compose, so a recording inside an ablation sees the ablated outputs.
_ACTIVE_HEAD_EDITS: contextvars.ContextVar = contextvars.ContextVar("attnlab_head_edits", default=())


def _capture_attention_forward(module, query, key, value, attention_mask, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _ACTIVE_RECORDER.get()
    if recorder is not None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        recorder.record(module, query, key, attention_mask, float(scaling), bool(causal))
    out, weights = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal, **kwargs
    )
    for edit in _ACTIVE_HEAD_EDITS.get():
        out = edit.edit(module, out)  # out: [batch, seq, heads, d_head], before the output projection
    return out, weights


def head_edits_active() -> bool:
    return bool(_ACTIVE_HEAD_EDITS.get())


_installed = False


def install_capture_attention() -> None:
    """Register the capture implementation with transformers (idempotent)."""
    global _installed
    if _installed:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention_forward)
    # Masks are built exactly as for SDPA, so the recorder sees the mask SDPA sees.
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    _installed = True


class editing:
    """Context manager: every attention call in its block passes its per-head outputs ``[B, S, H, d_head]``
    through ``editor.edit(module, out) -> out`` before the output projection."""

    def __init__(self, editor):
        self.editor = editor
        self._token = None

    def __enter__(self):
        self._token = _ACTIVE_HEAD_EDITS.set(_ACTIVE_HEAD_EDITS.get() + (self.editor,))
        return self.editor

    def __exit__(self, *exc):
        _ACTIVE_HEAD_EDITS.reset(self._token)
        return False


class recording:
    """Context manager that makes ``recorder`` receive every attention call in its block."""

    def __init__(self, recorder):
        self.recorder = recorder
        self._token = None

    def __enter__(self):
        self._token = _ACTIVE_RECORDER.set(self.recorder)
        return self.recorder

    def __exit__(self, *exc):
        _ACTIVE_RECORDER.reset(self._token)
        return False


RecordFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool], None]
