"""Per-head attention weights, in one convention for every architecture.

Convention (TransformerLens's): row vectors, ``q = x @ W_Q[l, h] + b_Q[l, h]``, likewise k and v, and a
head's contribution to the residual stream is ``z @ W_O[l, h]`` (``b_O[l]`` is added once per layer).
Attention scores are ``(q . k) * scaling[l]``; ``x`` is the input of the attention block (post-LN families such
as BERT: the layer's input hidden state; pre-LN ones such as GPT-2 and Llama: the layer's attention norm of it).

Shapes: W_Q, W_K, W_V ``[L, H, d_model, d_head]``; b_Q, b_K, b_V ``[L, H, d_head]``;
W_O ``[L, H, d_head, d_model]``; b_O ``[L, d_model]``; scaling ``[L]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from attnlab.core.models import LoadedModel, as_loaded


@dataclass
class HeadWeights:
    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_K: torch.Tensor
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    scaling: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]


@dataclass
class LayerWeights:
    """One layer's slice of :class:`HeadWeights`: W_Q, W_K, W_V ``[H, d_model, d_head]``; b_Q, b_K, b_V
    ``[H, d_head]``; W_O ``[H, d_head, d_model]``; b_O ``[d_model]``; scaling a number."""

    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_K: torch.Tensor
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    scaling: float


def layer_weights(model, layer: int, dtype: torch.dtype = torch.float32, device=None) -> LayerWeights:
    """Layer ``layer``'s per-head weights (copies, detached, on ``device``; default the model's), in the convention
    of :func:`head_weights` - which holds the same numbers for every layer - read for that layer alone."""
    lm: LoadedModel = as_loaded(model)
    *tensors, scaling = lm.arch.qkvo(lm, layer)
    with torch.no_grad():
        return LayerWeights(*[t.detach().to(device=device, dtype=dtype) for t in tensors], scaling=float(scaling))


def head_weights(model, dtype: torch.dtype = torch.float32, device=None) -> HeadWeights:
    """Per-head weight slices of every layer (copies, detached, on ``device``; default the model's).

    The family's record (``core.architectures``) says where each slice lives; grouped-query W_K / W_V come
    repeated per query head. Rotary families: these weights give the *pre-rotary* q and k
    (``architectures.rotate`` applies the rotation), so W_Q W_K^T compares token content, not position."""
    lm: LoadedModel = as_loaded(model)
    layers = [layer_weights(lm, layer, dtype, device) for layer in range(lm.n_layers)]
    names = [f.name for f in fields(LayerWeights) if f.name != "scaling"]
    return HeadWeights(*[torch.stack([getattr(w, name) for w in layers]) for name in names],
                       scaling=torch.tensor([w.scaling for w in layers], dtype=dtype))


def token_embedding(model) -> tuple[torch.Tensor, str]:
    """``([vocab, d_model], what it is)``: each token's embedding as it enters the residual stream, linear parts
    only - factorised embeddings (ALBERT, ELECTRA) go through their projection to d_model; position and type
    embeddings, the embedding LayerNorm and biases are left out, as is standard for OV-circuit scores."""
    lm: LoadedModel = as_loaded(model)
    emb = lm.base.get_input_embeddings().weight.detach()
    proj = lm.arch.embed_projection(lm.base)
    if proj is not None:
        return emb @ proj.weight.detach().T, "token embeddings through the embedding projection (factorised)"
    return emb, "token embeddings"


def unembedding(model) -> tuple[torch.Tensor | None, str]:
    """``([d_model, vocab] or None, what it is)``: the model's own read-out of the final residual stream - the LM
    head's linear part when the head is loaded; the transposed input embeddings when the model ties them and no
    head was loaded; None (with the reason) when neither is at hand."""
    lm: LoadedModel = as_loaded(model)
    tied = bool(getattr(lm.config, "tie_word_embeddings", True))
    w_u = lm.arch.unembed(lm.model) if lm.has_lm_head else None
    if w_u is not None:
        return w_u, "the LM head's read-out (its linear part)" + (" - tied to the input embeddings" if tied else "")
    factorised = lm.arch.embed_projection(lm.base) is not None
    if tied and not factorised:
        return lm.base.get_input_embeddings().weight.detach().T, "the input embeddings, transposed (tied; no LM head loaded)"
    why = ("its unembedding is not tied to the input embeddings" if not tied else
           "its factorised output passes through the LM head's own dense layer")
    return None, f"no LM head loaded, and {why}"
