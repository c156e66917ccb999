"""A BERT whose layer-0 head-0 attends, by construction, to the key exactly `lag` positions back.

Position embeddings are sinusoids (cos, sin at 32 incommensurate frequencies) mirrored with their negatives,
so LayerNorm leaves them unchanged up to a constant; word and type embeddings are zero. Head 0 of layer 0
takes keys = position code and queries = the position code rotated back by `lag` steps, scaled sharply:
q_p . k_p' = sharpness * sum_i cos(w_i (p - lag - p')), maximal only at p' = p - lag. Every other query/key
weight is zero, so every other head attends uniformly.
"""

import math

import torch
from transformers import BertConfig, BertModel


def planted_lag_bert(lag: int, positions: int = 256, vocab_size: int = 30522, sharpness: float = 4.0,
                     layers: int = 2, heads: int = 2) -> BertModel:
    n_freq = 32
    d_head = 2 * n_freq
    hidden = heads * d_head
    assert hidden >= 4 * n_freq, "need room for the code and its mirror"
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden, max_position_embeddings=positions, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    freqs = torch.rand(n_freq, generator=g) * (math.pi - 0.3) + 0.15
    p = torch.arange(positions, dtype=torch.float32)[:, None]
    code = torch.cat([torch.cos(freqs * p), torch.sin(freqs * p)], dim=1)  # [P, 64]
    emb = torch.zeros(positions, hidden)
    emb[:, :d_head] = code
    emb[:, d_head:2 * d_head] = -code  # zero mean, constant norm: LayerNorm only rescales
    scale = math.sqrt(hidden / (2 * n_freq))  # LayerNorm divides by std = sqrt(2 * n_freq / hidden)
    # rotation by -lag * w on each (cos, sin) pair: rot @ code(p) = code(p - lag)
    c, s = torch.cos(freqs * lag), torch.sin(freqs * lag)
    rot = torch.zeros(d_head, d_head)
    idx = torch.arange(n_freq)
    rot[idx, idx], rot[idx, idx + n_freq] = c, s  # cos(w(p-lag)) = cos(wp) c + sin(wp) s
    rot[idx + n_freq, idx], rot[idx + n_freq, idx + n_freq] = -s, c  # sin(w(p-lag)) = sin(wp) c - cos(wp) s
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
        model.embeddings.position_embeddings.weight.copy_(emb)
        for layer in model.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key):
                lin.weight.zero_()
                lin.bias.zero_()
        att = model.encoder.layer[0].attention.self
        # nn.Linear computes x @ W.T with x[:d_head] = code * scale: key = code, query = sharpness * rot @ code,
        # so the score is sharpness * sum_i cos(w_i (p - lag - p')) / sqrt(d_head)
        att.key.weight[:d_head, :d_head] = torch.eye(d_head) / scale
        att.query.weight[:d_head, :d_head] = sharpness * rot / scale
    return model
