"""First-layer attention from the weights: token and position terms, positional patterns, head classes,
normalisation factors, and the bag of tokens that first-layer neurons read ("Contextual attention heads in the
first layer of GPT-2").

With absolute positions in the residual stream, layer 0's attention input is ``x = P(LN(E_t + P_p + c))`` (``P`` an
optional projection, ``c`` a constant such as BERT's token type 0). LayerNorm is ``gamma * (r - mean r) / sigma +
beta``: linear in ``r`` but for ``sigma``. So ``x = e + pi + b`` with a token part ``e = P(gamma * C E_t) / sigma``, a
position part ``pi = P(gamma * C (P_p + c)) / sigma`` (``C`` centres) and a bias ``b = P(beta)``, and every score
``(x_i W_Q + b_Q) . (x_j W_K + b_K) * scaling`` splits into

    tt = e_i W_Q . e_j W_K     tp = e_i W_Q . pi_j W_K     pt = pi_i W_Q . e_j W_K     pp = pi_i W_Q . pi_j W_K

plus the bias terms (everything that involves ``b``, ``b_Q`` or ``b_K``). **Exact** LayerNorm takes each token's own
``sigma`` (then the terms sum to the model's scores); **linearised** takes ``sigma = s(p)``, the median over corpus
text of the scale at position ``p`` - its error is measured on corpus text, not hidden.

Shapes: H heads, S tokens of a sequence, N positions analysed, V vocabulary, D d_model, F MLP width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.errors import InputError
from attnlab.core.weights import LayerWeights, layer_weights

TERMS = ("tt", "tp", "pt", "pp", "bias")


# ---------------------------------------------------------------- the embedding stream as an affine map


@dataclass
class Affine:
    """Layer ``layer``'s attention input as an affine function of ``r = token + position + constant``."""

    token: torch.Tensor  # [V, E]
    position: torch.Tensor  # [N_max, E], offset applied
    constant: torch.Tensor  # [E]
    gamma: torch.Tensor  # [E]
    beta: torch.Tensor  # [E]
    eps: float
    proj_w: torch.Tensor | None  # [E, D] (x @ W)
    proj_b: torch.Tensor | None  # [D]

    def residual(self, tokens, positions) -> torch.Tensor:
        """``r`` of tokens at positions ``[S]`` -> ``[S, E]``."""
        return self.token[tokens] + self.position[positions] + self.constant

    def sigma(self, r) -> torch.Tensor:
        """The LayerNorm's scale of ``r [..., E]`` -> ``[...]``."""
        return torch.sqrt(r.var(-1, unbiased=False) + self.eps)

    def linear(self, v) -> torch.Tensor:
        """The linear part of the map, before dividing by sigma: ``P(gamma * (v - mean v))``, ``[..., E] -> [..., D]``."""
        out = self.gamma * (v - v.mean(-1, keepdim=True))
        return out @ self.proj_w if self.proj_w is not None else out

    def bias(self) -> torch.Tensor:
        out = self.beta @ self.proj_w + self.proj_b if self.proj_w is not None else self.beta
        return out

    def parts(self, tokens, positions, scale=None):
        """``(e [S, D], pi [S, D], b [D])`` of tokens at positions ``[S]``; ``scale [S]`` replaces each token's
        own sigma (linearised LayerNorm) when given."""
        r = self.residual(tokens, positions)
        s = self.sigma(r) if scale is None else torch.as_tensor(scale, dtype=r.dtype)
        e = self.linear(self.token[tokens]) / s[:, None]
        pi = self.linear(self.position[positions] + self.constant) / s[:, None]
        return e, pi, self.bias()


def affine_of(lm, layer: int) -> Affine:
    """The record's stream for ``layer``, as float64 tensors on the CPU; a one-line error for rotary families."""
    if lm.arch.stream is None:
        raise InputError(f"{lm.model_type} puts positions into attention by rotating queries and keys (rotary), so a "
                         "first-layer score has no token/position split; the empirical positional pattern is offered "
                         "instead")
    st = lm.arch.stream(lm.base, layer)
    d = lambda t: t.detach().double().cpu()  # noqa: E731
    e_dim = st.token.shape[1]
    proj_w = d(st.projection.weight).T if st.projection is not None else None
    proj_b = d(st.projection.bias) if st.projection is not None and st.projection.bias is not None else (
        torch.zeros(proj_w.shape[1], dtype=torch.float64) if proj_w is not None else None)
    norm = st.norm
    return Affine(d(st.token), d(st.position[st.offset:]), d(st.constant) if st.constant is not None else
                  torch.zeros(e_dim, dtype=torch.float64), d(norm.weight), d(norm.bias),
                  float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5))), proj_w, proj_b)


def terms(e_q, pi_q, e_k, pi_k, b, w: LayerWeights) -> dict:
    """The five score terms ``{name: [H, Sq, Sk]}`` (scaled) for query parts ``e_q, pi_q [Sq, D]`` and key parts
    ``e_k, pi_k [Sk, D]`` sharing the bias ``b [D]``."""
    qe, qp = e_q @ w.W_Q, pi_q @ w.W_Q  # [H, Sq, d]
    ke, kp = e_k @ w.W_K, pi_k @ w.W_K  # [H, Sk, d]
    qb = b @ w.W_Q + w.b_Q  # [H, d]
    kb = b @ w.W_K + w.b_K
    mm = lambda a, c: a @ c.transpose(-1, -2)  # noqa: E731
    bias = (torch.einsum("hd,hkd->hk", qb, ke + kp)[:, None, :] + torch.einsum("hqd,hd->hq", qe + qp, kb)[:, :, None]
            + (qb * kb).sum(-1)[:, None, None])
    out = {"tt": mm(qe, ke), "tp": mm(qe, kp), "pt": mm(qp, ke), "pp": mm(qp, kp), "bias": bias}
    return {k: v * w.scaling for k, v in out.items()}


def sequence_terms(aff: Affine, w: LayerWeights, tokens, scale=None) -> dict:
    """The terms of one sequence's scores ``{name: [H, S, S]}`` (positions 0..S-1)."""
    tokens = torch.as_tensor(tokens)
    pos = torch.arange(len(tokens))
    e, pi, b = aff.parts(tokens, pos, None if scale is None else scale[: len(tokens)])
    return terms(e, pi, e, pi, b, w)


# ---------------------------------------------------------------- LayerNorm scales from data


def scale_by_position(aff: Affine, sequences, n_positions: int) -> np.ndarray:
    """``s(p)``: the median over corpus sequences of the LayerNorm scale at position ``p`` (``[n_positions]``);
    positions no sequence reaches take the median over all positions."""
    per = [[] for _ in range(n_positions)]
    for seq in sequences:
        seq = torch.as_tensor(seq[:n_positions])
        sig = aff.sigma(aff.residual(seq, torch.arange(len(seq))))
        for p, v in enumerate(sig.tolist()):
            per[p].append(v)
    every = [v for vs in per for v in vs]
    if not every:
        raise InputError("no corpus text to measure the LayerNorm scale from; give a corpus with text")
    overall = float(np.median(every))
    return np.array([float(np.median(vs)) if vs else overall for vs in per])


# ---------------------------------------------------------------- positional patterns


def positional_pattern(aff: Affine, w: LayerWeights, token: int, n: int, causal: bool, scale=None) -> torch.Tensor:
    """``[H, n, n]``: the attention each head gives on a sequence of ``n`` copies of ``token`` (no special tokens):
    the softmax over key positions of the position-dependent part of the score. Exact LayerNorm when ``scale`` is
    None, else the linearised one with ``scale [n]``."""
    tokens = torch.full((n,), int(token))
    s = sum(sequence_terms(aff, w, tokens, None if scale is None else torch.as_tensor(scale)).values())
    if causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, dim=-1)


def offset_profile(pattern: torch.Tensor, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean attention at each relative offset ``d = j - i`` over destinations ``i >= start``: ``(offsets,
    [H, offsets])``, offsets from -(n-1) to n-1 (NaN where no destination has that offset)."""
    h, n, _ = pattern.shape
    offsets = np.arange(-(n - 1), n)
    i = torch.arange(start, n)
    prof = np.full((h, len(offsets)), np.nan)
    p = pattern.double()
    for k, d in enumerate(offsets):
        j = i + int(d)
        ok = (j >= 0) & (j < n)
        if ok.any():
            prof[:, k] = p[:, i[ok], j[ok]].mean(-1).numpy()
    return offsets, prof


def decay_fit(profile: np.ndarray, offsets: np.ndarray, side: int, max_offset: int) -> tuple[float, float]:
    """Fit ``log p(d) = a - |d| / lambda`` over ``1 <= |d| <= max_offset`` on one side (``side`` -1: earlier keys,
    +1: later): ``(lambda, R^2)``; NaN when there is nothing to fit or no decay."""
    sel = (np.sign(offsets) == side) & (np.abs(offsets) <= max_offset) & np.isfinite(profile) & (profile > 1e-12)
    if sel.sum() < 3:
        return float("nan"), float("nan")
    x, y = np.abs(offsets[sel]).astype(float), np.log(profile[sel])
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300)
    return (float(-1 / slope) if slope < 0 else float("inf")), float(r2)


# ---------------------------------------------------------------- head classes


@dataclass
class Thresholds:
    prev_window: int = 2
    prev_min: float = 0.5
    prev_max_cv: float = 0.5
    context_min_tokens: float = 8.0
    decay_min_r2: float = 0.8
    duplicate_min: float = 2.0


def classify(pattern: torch.Tensor, causal: bool, duplicate: np.ndarray, t: Thresholds) -> list[dict]:
    """One row per head: the measured quantities and the class they decide (see ``docs/firstlayer.md``)."""
    h, n, _ = pattern.shape
    start = min(n - 1, max(t.prev_window, n // 4))
    offsets, prof = offset_profile(pattern, start)
    p = pattern.double()
    rows = []
    for head in range(h):
        idx = torch.arange(start, n)
        prev = sum(p[head, idx, (idx - d).clamp_min(0)] * (idx - d >= 0) for d in range(1, t.prev_window + 1))
        prev = prev.numpy()
        prev_mass, prev_cv = float(prev.mean()), float(prev.std() / max(prev.mean(), 1e-12))
        n_eff = float((1 / (p[head, idx] ** 2).sum(-1)).mean())
        left = decay_fit(prof[head], offsets, -1, max(3, n // 4))
        right = decay_fit(prof[head], offsets, +1, max(3, n // 4)) if not causal else (float("nan"), float("nan"))
        fits = [f for f in (left, right) if math.isfinite(f[0]) and math.isfinite(f[1])]  # decaying sides only
        r2 = max((f[1] for f in fits), default=float("nan"))
        if prev_mass >= t.prev_min and prev_cv <= t.prev_max_cv:
            kind = "previous-token"
        elif duplicate[head] >= t.duplicate_min:
            kind = "duplicate-token"
        elif n_eff >= t.context_min_tokens and math.isfinite(r2) and r2 >= t.decay_min_r2:
            kind = "contextual"
        else:
            kind = "other"
        rows.append({"head": head, "class": kind, "prev_mass": prev_mass, "prev_cv": prev_cv, "n_eff": n_eff,
                     "decay_left": left[0], "decay_left_r2": left[1], "decay_right": right[0],
                     "decay_right_r2": right[1], "duplicate_logit": float(duplicate[head])})
    return rows


def duplicate_scores(aff: Affine, w: LayerWeights, sample, scale: float) -> np.ndarray:
    """``[H]``: the token-token term for a token meeting itself minus meeting another token, in logits, averaged
    over ``sample`` tokens (``[n, n]`` per head; never vocab x vocab)."""
    e = aff.linear(aff.token[torch.as_tensor(sample)]) / scale
    m = (e @ w.W_Q) @ (e @ w.W_K).transpose(-1, -2) * w.scaling  # [H, n, n]
    n = m.shape[-1]
    diag = m.diagonal(dim1=-2, dim2=-1).mean(-1)
    off = (m.sum((-1, -2)) - m.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return (diag - off).numpy()


# ---------------------------------------------------------------- normalisation factors


def normalisers(scores: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """From real scores ``[T, H, S, S]`` of T texts: ``(log Z [T, H, S], n_eff [T, H, S])``, the log of each
    destination's softmax denominator and the effective number of keys it attends to (1 / sum p^2)."""
    t, h, s, _ = scores.shape
    if causal:
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    log_z = torch.logsumexp(scores, dim=-1)
    p = torch.softmax(scores, dim=-1)
    return log_z, 1 / (p ** 2).sum(-1)


# ---------------------------------------------------------------- the bag of tokens


@dataclass
class Bag:
    """One head's separable approximation ``a_ij ~ exp(s_pos(i, j) + s_tok(t_j)) / Z_med(i)``: the query's token
    part is replaced by its corpus mean (and, in the token factor, its position part too), LayerNorm is linearised
    with one scale ``s`` for token parts and ``s(p)`` for position parts."""

    head: int
    s_pos: torch.Tensor  # [N, N]
    q_tok: torch.Tensor  # [d]: the query that meets a key's token part
    value_pos: torch.Tensor  # [N, D]: (pi_j W_V + b W_V + b_V) W_O
    z_med: torch.Tensor  # [N]: the median over texts of the factorised normaliser
    scale: float
    causal: bool

    def token_factor(self, aff: Affine, w: LayerWeights, tokens, linear=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(s_tok(t)) [n], value_tok(t) = e_t W_V W_O [n, D])`` of ``tokens [n]``; ``linear [n, D]``:
        ``aff.linear`` of their embeddings, when the caller has it already (then ``tokens`` is not read)."""
        e = (aff.linear(aff.token[torch.as_tensor(tokens)]) if linear is None else linear) / self.scale
        s_tok = (e @ w.W_K[self.head]) @ self.q_tok * w.scaling
        return torch.exp(s_tok), (e @ w.W_V[self.head]) @ w.W_O[self.head]

    def weights(self, aff, w, tokens) -> torch.Tensor:
        """``[S, S]`` unnormalised factorised weights of one sequence."""
        s = len(tokens)
        f, _ = self.token_factor(aff, w, tokens)
        out = torch.exp(self.s_pos[:s, :s]) * f[None, :]
        return out.tril() if self.causal else out

    def output(self, aff, w, tokens) -> torch.Tensor:
        """``[S, D]``: the head's output approximated as a position-weighted sum of its tokens' extended values."""
        s = len(tokens)
        _, v_tok = self.token_factor(aff, w, tokens)
        weights = self.weights(aff, w, tokens) / self.z_med[:s, None]
        return weights @ (v_tok + self.value_pos[:s])


def make_bag(aff: Affine, w: LayerWeights, head: int, sequences, scale_p, causal: bool, n: int) -> Bag:
    """The bag-of-tokens approximation of ``head`` from corpus ``sequences`` (for the query means and the median
    normaliser) and the position scales ``scale_p [n]``."""
    s_bar = float(np.median(scale_p))
    pos = torch.arange(n)
    pi = aff.linear(aff.position[pos] + aff.constant) / torch.as_tensor(scale_p[:n])[:, None]
    b = aff.bias()
    every = torch.cat([torch.as_tensor(seq[:n]) for seq in sequences])
    q_e = ((aff.linear(aff.token[every]) / s_bar) @ w.W_Q[head]).mean(0)  # the corpus mean of the query's token part
    q_p = pi @ w.W_Q[head]  # [n, d]
    q_b = b @ w.W_Q[head] + w.b_Q[head]
    k_pb = pi @ w.W_K[head] + (b @ w.W_K[head] + w.b_K[head])  # [n, d]
    s_pos = (q_e + q_p + q_b) @ k_pb.T * w.scaling  # [n, n]
    value_pos = ((pi + b) @ w.W_V[head] + w.b_V[head]) @ w.W_O[head]
    bag = Bag(head, s_pos, q_e + q_p.mean(0) + q_b, value_pos, torch.ones(n, dtype=torch.float64), s_bar, causal)
    z = torch.full((len(sequences), n), float("nan"), dtype=torch.float64)
    for k, seq in enumerate(sequences):
        seq = torch.as_tensor(seq[:n])
        z[k, : len(seq)] = bag.weights(aff, w, seq).sum(-1)
    bag.z_med = torch.nanmedian(z, dim=0).values
    return bag


def extended_embeddings(aff: Affine, w: LayerWeights, bags: list[Bag], tokens, chunk: int = 4096) -> torch.Tensor:
    """``[n, D]``: each token's extended embedding - what one occurrence of it adds through the contextual heads:
    ``exp(s_tok(t)) e_t W_V W_O`` times the head's typical weight of one key (the median over destinations ``i`` of
    the mean over visible keys ``j`` of ``exp(s_pos(i, j)) / Z_med(i)``), summed over the heads."""
    tokens = torch.as_tensor(tokens)
    out = torch.zeros(len(tokens), w.W_O.shape[-1], dtype=torch.float64)
    typical = []
    for bag in bags:
        n = bag.s_pos.shape[0]
        e_pos = torch.exp(bag.s_pos)
        visible = torch.arange(1, n + 1, dtype=torch.float64) if bag.causal else torch.full((n,), float(n))
        per_key = (e_pos.tril() if bag.causal else e_pos).sum(-1) / visible / bag.z_med[:n]
        typical.append(float(torch.nanmedian(per_key)))
    for s in range(0, len(tokens), chunk):
        linear = aff.linear(aff.token[tokens[s:s + chunk]])  # the same for every head
        for bag, weight in zip(bags, typical):
            f, v = bag.token_factor(aff, w, None, linear)
            out[s:s + chunk] += weight * f[:, None] * v
    return out
