"""Residual-stream activations by name (TransformerLens style).

``attn_input``: what layer l's attention reads, ``[L, S, d_model]`` for one sequence
(BERT, post-LN: the layer's input hidden state; GPT-2, pre-LN: ``ln_1`` of it).
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
        if lm.model_type == "gpt2":
            return torch.stack([block.ln_1(hidden[i][0]) for i, block in enumerate(lm.base.h)]).float()
        return torch.stack([h[0] for h in hidden[:-1]]).float()
