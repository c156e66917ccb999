"""Residual-stream activations by name (TransformerLens style).

``attn_input``: what layer l's attention reads, ``[L, S, d_model]`` for one sequence (post-LN families such
as BERT: the layer's input hidden state; pre-LN ones such as GPT-2, Llama, ModernBERT: its attention norm of it).
"""

from __future__ import annotations

import torch

from attnlab.core.models import LoadedModel, as_loaded


def attention_inputs(model, input_ids) -> torch.Tensor:
    """The input of every layer's attention block for ONE sequence ``[S]`` -> ``[L, S, d_model]``."""
    lm: LoadedModel = as_loaded(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(lm.device)
    with torch.inference_mode():
        hidden = lm.base(input_ids=ids, output_hidden_states=True).hidden_states
        out = []
        for layer in range(lm.n_layers):
            norm = lm.arch.attn_norm(lm.base, layer)
            out.append(hidden[layer][0] if norm is None else norm(hidden[layer][0]))
        return torch.stack(out).float()
