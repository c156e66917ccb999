"""Direct logit attribution (DLA) of every head to the correct token's logit at the [MASK] (BERT).

A head's output at the masked position, o_h = z_h W_O^h, is added to the residual stream of its layer. Its
*direct* path to the logits passes every later LayerNorm (BERT is post-LN: after each attention and each MLP
sublayer) and skips every later attention and MLP branch. As is standard, each LayerNorm's scale is frozen at
the value it had in the actual forward pass, so the path is linear: LN(v) -> gamma * (v - mean v) / sigma.
The MLM head (dense, GELU, LayerNorm, tied decoder) is nonlinear; it is linearised at the actual final hidden
state (its gradient there), so DLA_h = grad(logit of the correct token) . J_frozen(o_h). Units: logits.

Shapes: T trials; returns ``[T, L, H]``.
"""

from __future__ import annotations

import torch

from attnlab.circuits.ablation import head_outputs
from attnlab.core.errors import InputError


def _sigma(x, ln) -> torch.Tensor:
    """The standard deviation LayerNorm divides by (biased variance + eps), per row."""
    return torch.sqrt(x.var(-1, unbiased=False) + ln.eps)


def layer_norm_scales(lm, ids) -> tuple[list, list, tuple, dict]:
    """Per layer, the LayerNorm scales sigma ``[T, S]`` after the attention and after the MLP sublayer,
    recomputed from the layer inputs and the heads' outputs; also the hidden states and head outputs."""
    with torch.no_grad():
        hidden = lm.base(input_ids=ids, output_hidden_states=True).hidden_states
        heads = head_outputs(lm, ids)
        sig_a, sig_m = [], []
        for layer, block in enumerate(lm.arch.bert_layers(lm.base)):
            x = hidden[layer]
            z = heads[layer].reshape(*x.shape[:2], -1)
            r_a = x + block.attention.output.dense(z)
            y = block.attention.output.LayerNorm(r_a)
            r_m = y + block.output.dense(block.intermediate(y))
            sig_a.append(_sigma(r_a, block.attention.output.LayerNorm))
            sig_m.append(_sigma(r_m, block.output.LayerNorm))
    return sig_a, sig_m, hidden, heads


def direct_logit_attribution(lm, ids, pos, token) -> torch.Tensor:
    """DLA of every head to ``token``'s logit at ``pos`` (see module doc). ids ``[T, S]``, pos/token ``[T]``."""
    if lm.arch.bert_layers is None or lm.lm_head() is None:
        raise InputError(f"direct logit attribution follows a BERT-style post-LN encoder into its masked-LM head; "
                         f"model '{lm.name}' ({lm.model_type}) is not one - load a BERT, RoBERTa or ELECTRA masked LM")
    ids = torch.as_tensor(ids).to(lm.device)
    rows = torch.arange(ids.shape[0], device=ids.device)
    pos, token = torch.as_tensor(pos).to(ids.device), torch.as_tensor(token).to(ids.device)
    sig_a, sig_m, hidden, heads = layer_norm_scales(lm, ids)
    final = hidden[-1][rows, pos].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logit = lm.lm_head()(final)[rows, token]
        (grad,) = torch.autograd.grad(logit.sum(), final)
    grad = grad.double()
    n_heads, d_head = lm.n_heads, lm.d_head
    out = torch.zeros(ids.shape[0], lm.n_layers, n_heads, dtype=torch.float64)
    for layer in reversed(range(lm.n_layers)):
        block = lm.arch.bert_layers(lm.base)[layer]
        for ln, sigma in ((block.output.LayerNorm, sig_m[layer]), (block.attention.output.LayerNorm, sig_a[layer])):
            v = grad * ln.weight.double() / sigma[rows, pos].double()[:, None]
            grad = v - v.mean(-1, keepdim=True)  # transpose of the frozen LN's linear part (centring is symmetric)
        w_o = block.attention.output.dense.weight.double().reshape(-1, n_heads, d_head)  # [D, H, d]
        z = heads[layer][rows, pos].double()  # [T, H, d]
        out[:, layer] = torch.einsum("thd,Dhd,tD->th", z, w_o, grad)
    return out.detach().float().cpu()
