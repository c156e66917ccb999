"""Per-head attention weights, in one convention for every architecture.

Convention (TransformerLens's): row vectors, ``q = x @ W_Q[l, h] + b_Q[l, h]``, likewise k and v, and a
head's contribution to the residual stream is ``z @ W_O[l, h]`` (``b_O[l]`` is added once per layer).
Attention scores are ``(q . k) * scaling[l]``; ``x`` is the input of the attention block (BERT: the
layer's input hidden state; GPT-2: ``ln_1`` of it).

Shapes: W_Q, W_K, W_V ``[L, H, d_model, d_head]``; b_Q, b_K, b_V ``[L, H, d_head]``;
W_O ``[L, H, d_head, d_model]``; b_O ``[L, d_model]``; scaling ``[L]``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _split_heads_in(weight_in_out: torch.Tensor, bias: torch.Tensor, n_heads: int):
    """``[d_model, H*d]`` (x @ W layout) and ``[H*d]`` -> ``[H, d_model, d]`` and ``[H, d]``."""
    d_model, width = weight_in_out.shape
    d_head = width // n_heads
    return weight_in_out.reshape(d_model, n_heads, d_head).permute(1, 0, 2), bias.reshape(n_heads, d_head)


def _bert_layer(layer, n_heads):
    att = layer.attention
    parts = []
    for lin in (att.self.query, att.self.key, att.self.value):
        parts.extend(_split_heads_in(lin.weight.T, lin.bias, n_heads))  # nn.Linear stores [out, in]
    dense = att.output.dense
    w_o = dense.weight.T.reshape(n_heads, -1, dense.weight.shape[0])  # [H, d, d_model]
    scaling = att.self.scaling if hasattr(att.self, "scaling") else att.self.attention_head_size**-0.5
    return (*parts, w_o, dense.bias, scaling)


def _gpt2_layer(block, n_heads):
    attn = block.attn
    d_model = attn.embed_dim
    w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D stores [in, out]: fused [d_model, 3*d_model]
    parts = []
    for i in range(3):
        parts.extend(_split_heads_in(w[:, i * d_model : (i + 1) * d_model], b[i * d_model : (i + 1) * d_model], n_heads))
    w_o = attn.c_proj.weight.reshape(n_heads, -1, d_model)
    return (*parts, w_o, attn.c_proj.bias, attn.scaling)


def head_weights(model, dtype: torch.dtype = torch.float32, device=None) -> HeadWeights:
    """Per-head weight slices of every layer (copies, detached, on ``device``; default the model's)."""
    lm: LoadedModel = as_loaded(model)
    if lm.model_type == "gpt2":
        layers = [_gpt2_layer(block, lm.n_heads) for block in lm.base.h]
    else:
        layers = [_bert_layer(layer, lm.n_heads) for layer in lm.base.encoder.layer]
    with torch.no_grad():
        cols = list(zip(*layers))
        stacked = [torch.stack([t.detach().to(device=device, dtype=dtype) for t in col]) for col in cols[:-1]]
        scaling = torch.tensor([float(s) for s in cols[-1]], dtype=dtype)
    return HeadWeights(*stacked, scaling=scaling)
