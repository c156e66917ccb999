"""Weight-based head scores (Elhage et al. 2021) and attention-pattern detectors for bidirectional attention.

Conventions (row vectors, as ``attnlab.head_weights``): a head reads x W_Q, x W_K, x W_V ([d_model, d_head])
and writes z W_O ([d_head, d_model]); W_QK = W_Q W_K^T and W_OV = W_V W_O are [d_model, d_model] of rank d_head.

**OV copying score**: sum(eig) / sum(|eig|) of the full OV circuit W_E W_V W_O W_U ([vocab, vocab]); +1 when
the circuit maps every token onto itself (a copying head), -1 when it suppresses it. Its nonzero eigenvalues
are those of the cyclic permutation W_O (W_U W_E) W_V ([d_head, d_head]), which is what is computed - never the
vocab x vocab matrix. For BERT, W_E is the token embedding matrix (no position or type embeddings, no
embedding LayerNorm) and W_U = W_E^T: the MLM decoder is tied to the embeddings; the MLM head's transform
(dense, GELU, LayerNorm) is skipped because it is nonlinear - the score asks whether the head writes a token's
own embedding direction, which is the direction the tied decoder reads.

**Composition scores** of an earlier head 1 and a later head 2: Q = ||W_OV1 W_QK2||_F, K = ||W_OV1 W_QK2^T||_F,
V = ||W_OV1 W_OV2||_F, each divided by ||W_OV1||_F ||W_X2||_F (TransformerLens's convention), minus the mean
score of random Gaussian matrices of the same shapes (the baseline a random pair would get). LayerNorms
between the heads are ignored, as is standard. Computed from the d_head factors: no d_model x d_model product.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------- OV copying


def ov_copying_scores(w_v, w_o, w_e, w_u=None) -> torch.Tensor:
    """w_v ``[..., d_model, d_head]``, w_o ``[..., d_head, d_model]``, w_e ``[vocab, d_model]``, w_u
    ``[d_model, vocab]`` (default: w_e^T, tied) -> score ``[...]`` in [-1, 1]."""
    w_e = w_e.double()
    gram = w_e.T @ w_e if w_u is None else w_u.double() @ w_e  # W_U W_E: [d_model, d_model]
    m = w_o.double() @ gram @ w_v.double()  # [..., d_head, d_head], same nonzero spectrum as the V x V circuit
    eig = torch.linalg.eigvals(m)
    return eig.sum(-1).real / eig.abs().sum(-1)


# ---------------------------------------------------------------- composition


def _fro2(left_a, left_b, right_a, right_b):
    """||(A1 B1)(A2 B2)||_F^2 for factors A [.., d, k], B [.., k, d]: tr(M^T G1 M G2) = sum((G1 M) * (M G2))
    with M = B1 A2, G1 = A1^T A1, G2 = B2 B2^T (both symmetric): k x k work only."""
    m = left_b @ right_a  # [.., k, k]
    g1 = left_a.transpose(-1, -2) @ left_a
    g2 = right_b @ right_b.transpose(-1, -2)
    return ((g1 @ m) * (m @ g2)).sum((-1, -2)).clamp_min(0)


def factored_norm(a, b) -> torch.Tensor:
    """||A B||_F for A [.., d, k], B [.., k, d], from k x k Gram matrices."""
    ga = a.transpose(-1, -2) @ a
    gb = b @ b.transpose(-1, -2)
    return torch.sqrt((ga * gb).sum((-1, -2)).clamp_min(0))


def composition(ov1, qk_or_ov2, kind: str):
    """Raw composition scores of every head pair. ov1 = (W_V1, W_O1) ``[G1, d, k]``, ``[G1, k, d]``;
    qk_or_ov2 = (W_Q2, W_K2) or (W_V2, W_O2) ``[G2, d, k]``. Returns ``[G1, G2]``."""
    v1, o1 = (t.double()[:, None] for t in ov1)  # [G1, 1, ...]
    a2, b2 = (t.double()[None] for t in qk_or_ov2)  # [1, G2, ...]
    if kind == "Q":  # W_OV1 W_QK2 = V1 O1 Q2 K2^T
        right_a, right_b = a2, b2.transpose(-1, -2)
    elif kind == "K":  # W_OV1 W_QK2^T = V1 O1 K2 Q2^T
        right_a, right_b = b2, a2.transpose(-1, -2)
    elif kind == "V":  # W_OV1 W_OV2 = V1 O1 V2 O2
        right_a, right_b = a2, b2
    else:
        raise ValueError(kind)
    num = torch.sqrt(_fro2(v1, o1, right_a, right_b))
    return num / (factored_norm(v1, o1) * factored_norm(right_a, right_b))


def random_baseline(d_model: int, d_head: int, kind: str, samples: int = 32, seed: int = 0) -> float:
    """Mean composition score of random Gaussian factors of the same shapes (the chance level)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ov1 = (r(samples, d_model, d_head), r(samples, d_head, d_model))
    second = (r(samples, d_model, d_head), r(samples, d_head, d_model)) if kind == "V" else \
        (r(samples, d_model, d_head), r(samples, d_model, d_head))
    return float(composition(ov1, second, kind).diagonal().mean())


def composition_scores(weights) -> list[tuple]:
    """Rows (layer1, head1, layer2, head2, kind, score, baseline, corrected) for every earlier -> later head pair.

    weights: :class:`attnlab.HeadWeights` (W_Q, W_K, W_V ``[L, H, d, k]``, W_O ``[L, H, k, d]``)."""
    n_layers, n_heads, d_model, d_head = weights.W_Q.shape
    base = {kind: random_baseline(d_model, d_head, kind) for kind in "QKV"}
    rows = []
    for l1 in range(n_layers - 1):
        ov1 = (weights.W_V[l1], weights.W_O[l1])
        for l2 in range(l1 + 1, n_layers):
            for kind, second in (("Q", (weights.W_Q[l2], weights.W_K[l2])), ("K", (weights.W_Q[l2], weights.W_K[l2])),
                                 ("V", (weights.W_V[l2], weights.W_O[l2]))):
                scores = composition(ov1, second, kind)
                for h1 in range(n_heads):
                    for h2 in range(n_heads):
                        s = float(scores[h1, h2])
                        rows.append((l1, h1, l2, h2, kind, s, base[kind], s - base[kind]))
    return rows


# ---------------------------------------------------------------- attention-pattern detectors


DETECTORS = ("previous_token", "next_token", "self", "duplicate_token", "induction", "masked_induction",
             "suffix_matching", "cls", "sep", "mask")


def templates(ids: torch.Tensor, specials: dict) -> dict:
    """Boolean templates ``[B, S, S]`` (query, key) of every detector for token ids ``[B, S]``.

    induction = prefix matching (Olsson et al.): the token after an earlier instance of the query's token;
    masked_induction: the token after an earlier instance of the token *before* the query - what an induction
    head does at a [MASK], whose own token is hidden (the paper's "previous instance" target); suffix_matching:
    the token before a later instance; duplicate_token: any other instance. Both directions are allowed."""
    b, s = ids.shape
    q = torch.arange(s)[:, None]
    k = torch.arange(s)[None, :]
    same = ids[:, :, None] == ids[:, None, :]  # [B, q, k]
    other = same & (q != k)
    out = {
        "previous_token": (k == q - 1).expand(b, s, s),
        "next_token": (k == q + 1).expand(b, s, s),
        "self": (k == q).expand(b, s, s),
        "duplicate_token": other,
        # key j + 1 where token[j] == token[q], j < q
        "induction": torch.nn.functional.pad((other & (k < q))[:, :, :-1], (1, 0)),
        # key j + 1 where token[j] == token[q - 1], j + 1 < q
        "masked_induction": torch.nn.functional.pad((other & (k < q))[:, :-1, :-1], (1, 0, 1, 0)),
        # key j - 1 where token[j] == token[q], j > q
        "suffix_matching": torch.nn.functional.pad((other & (k > q))[:, :, 1:], (0, 1)),
    }
    for name in ("cls", "sep", "mask"):
        token = specials.get(name)
        hit = (ids == token) if token is not None else torch.zeros_like(ids, dtype=torch.bool)
        out[name] = hit[:, None, :].expand(b, s, s)
    return out


def detector_scores(attention: torch.Tensor, ids: torch.Tensor, specials: dict) -> dict:
    """Chance-corrected detector scores per head: ``{name: (score [L, H], chance, corrected [L, H])}``.

    attention ``[B, S(query), L, H, S(key)]`` (every query row, as the extractor returns with
    query_positions=None, one sequence length). For each detector, queries whose template is empty are
    skipped; score = mean over the other queries of the attention mass on the template keys; chance = the
    same for uniform attention over the keys (|template| / S); corrected = score - chance."""
    tpl = templates(ids, specials)
    n_keys = ids.shape[1]
    out = {}
    for name, t in tpl.items():
        t = t.to(attention.dtype)
        has = t.sum(-1) > 0  # [B, q]
        if not has.any():
            out[name] = (torch.full(attention.shape[2:4], math.nan), math.nan, torch.full(attention.shape[2:4], math.nan))
            continue
        mass = torch.einsum("bqlhk,bqk->bqlh", attention, t)  # [B, q, L, H]
        score = mass[has].mean(0)
        chance = float((t.sum(-1)[has] / n_keys).mean())
        out[name] = (score, chance, score - chance)
    return out
