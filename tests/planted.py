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



def planted_lag_gpt2(lag: int, positions: int = 256, vocab_size: int = 1000, sharpness: float = 4.0,
                     layers: int = 2, heads: int = 2):
    """The same planted lag head in a causal model (GPT-2, pre-LN): layer 0 head 0 attends from p to p - lag.

    ln_1 sees the mirrored position code (word embeddings zero), which it only rescales; Conv1D stores
    [in, out], so the query block is (sharpness * rot / scale)^T and the key block I / scale."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_freq = 32
    d_head = 2 * n_freq
    hidden = heads * d_head
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    freqs = torch.rand(n_freq, generator=g) * (math.pi - 0.3) + 0.15
    p = torch.arange(positions, dtype=torch.float32)[:, None]
    code = torch.cat([torch.cos(freqs * p), torch.sin(freqs * p)], dim=1)
    emb = torch.zeros(positions, hidden)
    emb[:, :d_head], emb[:, d_head:2 * d_head] = code, -code
    scale = math.sqrt(hidden / (2 * n_freq))
    c, s = torch.cos(freqs * lag), torch.sin(freqs * lag)
    rot = torch.zeros(d_head, d_head)
    idx = torch.arange(n_freq)
    rot[idx, idx], rot[idx, idx + n_freq] = c, s
    rot[idx + n_freq, idx], rot[idx + n_freq, idx + n_freq] = -s, c
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(emb)
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :2 * hidden].zero_()  # every query and key weight
            block.attn.c_attn.bias[:2 * hidden].zero_()
        w = model.transformer.h[0].attn.c_attn.weight  # [in, 3 * hidden]: q | k | v
        w[:d_head, :d_head] = (sharpness * rot / scale).T
        w[:d_head, hidden:hidden + d_head] = torch.eye(d_head) / scale
    return model


RECENCY = 7.0


def planted_induction_circuit(positions: int = 64, seed: int = 0, tiny: float = 1e-3, backup: bool = False):
    """A 2-layer BERT masked LM whose answer is known: a previous-token head (L0H0) writes the previous token
    into a subspace; an induction head (L1H0) matches that subspace between query and keys, looks only
    backwards, and copies the attended token into the token subspace that the tied decoder reads. L0H1 and L1H1
    have tiny random weights (they exist, so composition scores are defined, but do nothing); MLPs are zero.

    Residual stream (d_model 256): tokens [0, 64) (random unit embeddings), positions [64, 128) (one-hot),
    previous token [128, 192), a constant and the relative position p / S at 192 and 193. Head dimension 128. Attention scores are scaled by 1/sqrt(128) in BERT; the
    constants below are set with that and the LayerNorms' rescaling in mind.

    ``backup``: L0H1 is a second previous-token head, a copy of L0H0 - each alone feeds the induction head fully,
    so ablating either one changes nothing and ablating both removes it all."""
    from transformers import BertConfig, BertForMaskedLM

    vocab, d_model, n_heads, d_head = 30522, 256, 2, 128
    tok, pos, prev = slice(0, 64), slice(64, 128), slice(128, 192)
    cfg = BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=2, num_attention_heads=n_heads,
                     intermediate_size=16, max_position_embeddings=positions, layer_norm_eps=1e-12)
    model = BertForMaskedLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "LayerNorm.weight" in name else torch.zeros_like(p))
        emb = torch.nn.functional.normalize(torch.randn(vocab, 64, generator=g), dim=-1)
        model.bert.embeddings.word_embeddings.weight[:, tok] = emb  # also the tied decoder
        model.bert.embeddings.position_embeddings.weight[:, pos] = torch.eye(positions, 64)
        model.bert.embeddings.position_embeddings.weight[:, 192] = 1.0  # a constant feature...
        model.bert.embeddings.position_embeddings.weight[:, 193] = torch.arange(positions) / positions  # ...and p / S
        eye = torch.eye(64)
        shift = torch.zeros(64, 64)
        shift[torch.arange(1, 64), torch.arange(63)] = 1.0  # row p has its 1 at column p - 1
        a0 = model.bert.encoder.layer[0].attention
        a0.self.query.weight[0:64, pos] = (3.0 * shift).T  # q_p . k_k large exactly when k = p - 1
        a0.self.key.weight[0:64, pos] = eye
        a0.self.value.weight[0:64, tok] = eye  # read the token...
        a0.output.dense.weight[prev, 0:64] = eye  # ...write it into the previous-token subspace
        a1 = model.bert.encoder.layer[1].attention
        a1.self.query.weight[0:64, prev] = 8.0 * eye  # match the previous token of query and key
        a1.self.key.weight[0:64, prev] = eye
        a1.self.query.weight[64, 192] = -RECENCY  # prefer earlier keys: the query's own position (which always
        a1.self.key.weight[64, 193] = 1.0  # matches itself) is later than the previous instance
        a1.self.value.weight[0:64, tok] = eye  # copy the attended token...
        a1.output.dense.weight[tok, 0:64] = 6.0 * eye  # ...into the token subspace the decoder reads
        h1 = slice(d_head, 2 * d_head)
        if backup:
            for lin in (a0.self.query, a0.self.key, a0.self.value):
                lin.weight[h1] = lin.weight[:d_head]
            a0.output.dense.weight[:, h1] = a0.output.dense.weight[:, :d_head]
        for layer in model.bert.encoder.layer[int(backup):]:  # the other head of each layer: tiny random weights
            for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                lin.weight[h1] = tiny * torch.randn(d_head, d_model, generator=g)
            layer.attention.output.dense.weight[:, h1] = tiny * torch.randn(d_model, d_head, generator=g)
        tr = model.cls.predictions.transform
        tr.dense.weight.copy_(torch.eye(d_model))
        tr.dense.bias.fill_(50.0)  # GELU(x + 50) = x + 50 here; the LayerNorm then removes the 50
        tr.LayerNorm.weight.fill_(3.0)  # sharpen the logits
    return model


def planted_first_layer_gpt2(decay: float = 10.0, vocab_size: int = 500, positions: int = 128, seed: int = 0):
    """A GPT-2 whose first layer holds three heads with known behaviour, built so that LayerNorm is exactly linear
    (every part of the residual stream is mirrored, so its mean is 0, and has a constant norm, so sigma is constant):

    - L0H0, previous-token: query = the position code rotated one step back, key = the position code (as in
      :func:`planted_lag_gpt2`);
    - L0H1, contextual: a constant query (its bias) meets a key that reads sin(w p) ~ w p (w tiny) and the token
      code: the score is p / ``decay`` + b(token), so the attention decays exponentially with decay length
      ``decay`` and the normaliser factorises exactly;
    - L0H2, duplicate-token: query and key read the token code: a token meets itself with +10 logits.

    Residual stream (d_model 192 = 3 heads x 64): token code [0, 24) and its negative [24, 48); position code
    (cos, sin at 16 frequencies) [48, 80) and its negative [80, 112); (cos w p, sin w p) at 112, 113 and negatives
    at 114, 115; the rest zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_heads, d_head = 3, 64
    d_model = n_heads * d_head
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=1, n_head=n_heads, n_positions=positions,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    tok = torch.nn.functional.normalize(torch.randn(vocab_size, 24, generator=g), dim=-1)
    freqs = torch.rand(16, generator=g) * (math.pi - 0.3) + 0.15
    p = torch.arange(positions, dtype=torch.float32)[:, None]
    code = torch.cat([torch.cos(freqs * p), torch.sin(freqs * p)], dim=1)  # [P, 32], norm 4
    omega = 5e-4
    ramp = torch.cat([torch.cos(omega * p), torch.sin(omega * p)], dim=1)  # [P, 2], norm 1
    wte, wpe = torch.zeros(vocab_size, d_model), torch.zeros(positions, d_model)
    wte[:, 0:24], wte[:, 24:48] = tok, -tok
    wpe[:, 48:80], wpe[:, 80:112] = code, -code
    wpe[:, 112:114], wpe[:, 114:116] = ramp, -ramp
    sigma = math.sqrt((2 * 1 + 2 * 16 + 2 * 1) / d_model)  # |r|^2 / d_model, constant; mean 0
    c, s = torch.cos(freqs), torch.sin(freqs)
    rot = torch.zeros(32, 32)
    idx = torch.arange(16)
    rot[idx, idx], rot[idx, idx + 16] = c, s
    rot[idx + 16, idx], rot[idx + 16, idx + 16] = -s, c
    scaling = d_head ** -0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                        or name.endswith("ln_f.weight") else torch.zeros_like(param))
        model.transformer.wte.weight.copy_(wte)
        model.transformer.wpe.weight.copy_(wpe)
        w, b = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.bias  # [D, 3D]
        q, k, v = slice(0, d_model), slice(d_model, 2 * d_model), slice(2 * d_model, 3 * d_model)
        h0, h1, h2 = (slice(h * d_head, h * d_head + d_head) for h in range(3))
        # L0H0: (4 rot code_p) . code_p' / sqrt(d) = 4 sum cos(w_i (p - 1 - p')) / 8 peaks at p' = p - 1
        w[48:80, q][:, h0.start:h0.start + 32] = sigma * 4.0 * rot.T
        w[48:80, k][:, h0.start:h0.start + 32] = sigma * torch.eye(32)
        # L0H1: query = its bias (constant); key = sin(w p) (the ramp) and the token code
        b[q][h1.start] = 1.0
        w[113, k][h1.start] = sigma / (omega * decay * scaling)  # score = sin(w p) / (w decay) ~ p / decay
        w[0:24, k][:, h1.start] = 0.5 * sigma / scaling * torch.linspace(-1, 1, 24)  # a token-dependent part
        w[0:24, v][:, h1] = torch.eye(24, d_head) * sigma  # it reads the token (its value) ...
        # L0H2: query and key read the token code; a token meets itself with 10 logits
        w[0:24, q][:, h2] = torch.eye(24, d_head) * sigma * math.sqrt(10.0 / scaling)
        w[0:24, k][:, h2] = torch.eye(24, d_head) * sigma * math.sqrt(10.0 / scaling)
        model.transformer.h[0].attn.c_proj.weight.copy_(torch.eye(d_model))  # [in, out]: head outputs as they are
    return model


def planted_probe_bert(types: int = 64, positions: int = 32, seed: int = 0, dense: int | None = None):
    """A 2-layer BERT whose hidden state after layer 2 (and only there) carries, in one dimension, a label of the
    PREVIOUS token: tokens are one-hot types (ids 0..types-1) in dims [0, types) - or, with ``dense``, random codes
    in ``dense`` dims, so that a linear probe cannot memorise arbitrary labels of the types - positions one-hot in the
    next ``positions`` dims; block 0 does nothing; in block 1 head 0 attends from every position to the one before
    and writes the previous token's label (+-1; dense: u . code, whose sign is the label) into dim 127.
    Returns (model, labels [types] in {0, 1})."""
    from transformers import BertConfig, BertModel

    d_model = 128  # two heads of 64
    cfg = BertConfig(vocab_size=types, hidden_size=d_model, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=positions, layer_norm_eps=1e-12)
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    width = dense or types
    code = torch.eye(types) if dense is None else torch.randn(types, dense, generator=g)
    if dense is None:
        labels = torch.randint(0, 2, (types,), generator=g)
        read = labels.float() * 2 - 1  # the value reads the one-hot type's label directly
    else:
        u = torch.randn(dense, generator=g)
        labels = (code @ u > 0).long()
        read = u  # the value reads u . code: linear in the code, its sign the label
    pos = slice(width, width + positions)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "LayerNorm.weight" in name else torch.zeros_like(p))
        model.embeddings.word_embeddings.weight[:, :width] = code
        model.embeddings.position_embeddings.weight[:, pos] = torch.eye(positions)
        a = model.encoder.layer[1].attention
        shift = torch.zeros(positions, positions)
        shift[torch.arange(1, positions), torch.arange(positions - 1)] = 1.0  # position p -> key code p - 1
        a.self.query.weight[:positions, pos] = 60.0 * shift.T
        a.self.key.weight[:positions, pos] = torch.eye(positions)
        a.self.value.weight[0, :width] = read  # the attended token's label
        a.output.dense.weight[127, 0] = 5.0
    return model, labels
