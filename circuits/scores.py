"""Weight-based head scores (Elhage et al. 2021) and attention-pattern detectors for bidirectional attention.

Conventions (row vectors, as ``attnlab.head_weights``): a head reads x W_Q, x W_K, x W_V ([d_model, d_head])
and writes z W_O ([d_head, d_model]); W_QK = W_Q W_K^T and W_OV = W_V W_O are [d_model, d_model] of rank d_head.

**OV copying score**: sum(eig) / sum(|eig|) of the full OV circuit W_E W_V W_O W_U ([vocab, vocab]); +1 when
the circuit maps every token onto itself (a copying head), -1 when it suppresses it. Its nonzero eigenvalues
are those of the cyclic permutation W_O (W_U W_E) W_V ([d_head, d_head]), which is what is computed - never the
vocab x vocab matrix. W_E is each token's embedding as it enters the residual stream (``core.weights.token_embedding``:
factorised embeddings through their projection; no position or type embeddings, no embedding LayerNorm) and W_U
is the model's own read-out (``core.weights.unembedding``): the LM head's linear part when it is loaded (an MLM
head's nonlinear transform - dense, GELU, LayerNorm - is skipped; a factorised head's dense layer and decoder are
multiplied), the transposed embeddings for a tied model without its head, and nothing for an untied one without
its head (then the score is not computed).

**Composition scores** of an earlier head 1 and a later head 2: Q = ||W_OV1 W_QK2||_F, K = ||W_OV1 W_QK2^T||_F,
V = ||W_OV1 W_OV2||_F, each divided by ||W_OV1||_F ||W_X2||_F (TransformerLens's convention), minus the mean
score of random Gaussian matrices of the same shapes (the baseline a random pair would get, sampled until its
standard error is below 1% of the median corrected score). LayerNorms between the heads are ignored, as is
standard. A score is not bounded by 1/sqrt(d_head): trained heads that write and read a shared low-rank
subspace score far above it. Computed from the d_head factors: no d_model x d_model product.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------- OV copying


def ov_copying_scores(w_v, w_o, w_e, w_u=None) -> torch.Tensor:
    """w_v ``[..., d_model, d_head]``, w_o ``[..., d_head, d_model]``, w_e ``[vocab, d_model]``, w_u
    ``[d_model, vocab]`` (default: w_e^T, tied) -> score ``[...]`` in [-1, 1]; 0 for a head whose full OV circuit
    is exactly zero (it writes nothing the unembedding reads, so it copies nothing)."""
    w_e = w_e.double()
    gram = w_e.T @ w_e if w_u is None else w_u.double() @ w_e  # W_U W_E: [d_model, d_model]
    m = w_o.double() @ gram @ w_v.double()  # [..., d_head, d_head], same nonzero spectrum as the V x V circuit
    eig = torch.linalg.eigvals(m)
    total = eig.abs().sum(-1)
    return torch.where(total > 0, eig.sum(-1).real / torch.where(total > 0, total, 1.0), 0.0)


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
    if kind not in ("Q", "K", "V"):
        raise ValueError(kind)
    v1, o1 = (t.double()[:, None] for t in ov1)  # [G1, 1, ...]
    a2, b2 = (t.double()[None] for t in qk_or_ov2)  # [1, G2, ...]
    return _pair_scores(v1, o1, a2, b2, kind)


def random_baseline(d_model: int, d_head: int, kind: str, *, target_se: float = 0.0, seed: int = 0,
                    min_samples: int = 256, max_samples: int = 4096, batch: int = 64) -> dict:
    """The chance level of a composition score: its mean over random Gaussian factors of the same shapes.

    Samples are drawn ``batch`` at a time until the standard error of the mean is at most ``target_se`` (at
    least ``min_samples``, at most ``max_samples``). Returns ``{"mean", "se", "samples"}``.

    A score needs the factors only through their Gram matrices (:func:`_fro2`, :func:`factored_norm`): W_V1^T W_V1,
    the Gram of the stacked [W_O1^T, R_a] (which holds O1 O1^T, O1 R_a and R_a^T R_a) and R_b R_b^T, where R_a, R_b
    are head 2's factors in the product's order. For i.i.d. N(0, 1) factors these are independent Wishart matrices
    W_k(d_model), W_2k(d_model), W_k(d_model), drawn here by Bartlett's decomposition: k^2 numbers each instead of
    d_model x k (12x fewer for d_model = 384, d_head = 32), the same distribution (tested against the factors). It is
    the same for Q, K and V. Below d_model = 2 d_head the factors themselves are drawn."""
    return _BaselineStream(d_model, d_head, kind, seed, batch).estimate(target_se, min_samples, max_samples)


class _BaselineStream:
    """The random pairs' scores of one (shape, kind, seed), drawn once in batches and read by every estimate: a
    second estimate with a smaller target reads the first one's samples again instead of redrawing them, and Q, K
    and V share one stream where their distribution is the same (the Wishart draw)."""

    def __init__(self, d_model: int, d_head: int, kind: str, seed: int, batch: int = 64):
        import numpy as np

        if kind not in ("Q", "K", "V"):
            raise ValueError(kind)
        self.shape, self.kind, self.batch = (d_model, d_head), _draw_kind(d_model, d_head, kind), batch
        self.rng = np.random.default_rng(seed)
        self.batches: list = []

    def _batch(self, i: int) -> torch.Tensor:
        while len(self.batches) <= i:
            d, k = self.shape
            self.batches.append(_wishart_scores(self.rng, self.batch, d, k) if self.kind == "QKV" else
                                _factor_scores(self.rng, self.batch, d, k, self.kind))
        return self.batches[i]

    def estimate(self, target_se: float, min_samples: int, max_samples: int) -> dict:
        """What :func:`random_baseline` returns, from this stream's first batches."""
        x, i = self._batch(0), 0
        while True:
            se = float(x.std(unbiased=True) / math.sqrt(len(x)))
            if len(x) >= max_samples or (len(x) >= min_samples and se <= target_se):
                return {"mean": float(x.mean()), "se": se, "samples": len(x)}
            i += 1
            x = torch.cat([x, self._batch(i)])  # the samples so far, in order: each batch joined once


def _draw_kind(d_model: int, d_head: int, kind: str) -> str:
    """What a baseline stream's draw depends on: "QKV" for the Wishart draw (d_model >= 2 d_head), the same for all
    three kinds; else the kind, whose factors differ."""
    return "QKV" if d_model >= 2 * d_head else kind


def _wishart(rng, n: int, p: int, dof: int) -> torch.Tensor:
    """``[n, p, p]`` Wishart W_p(I, dof) matrices, X^T X of a [dof, p] standard normal X, by Bartlett: L L^T with L
    lower triangular, L_ii^2 ~ chi^2(dof - i), L_ij ~ N(0, 1) below the diagonal."""
    import numpy as np

    lower = np.zeros((n, p, p))
    i, j = np.tril_indices(p, -1)
    lower[:, i, j] = rng.standard_normal((n, len(i)))
    lower[:, np.arange(p), np.arange(p)] = np.sqrt(rng.chisquare(dof - np.arange(p), size=(n, p)))
    lower = torch.from_numpy(lower)
    return lower @ lower.transpose(-1, -2)


def _wishart_scores(rng, n: int, d: int, k: int) -> torch.Tensor:
    """``[n]`` composition scores of random Gaussian head pairs, from their Gram matrices (see random_baseline)."""
    g1, stacked, g2 = _wishart(rng, n, k, d), _wishart(rng, n, 2 * k, d), _wishart(rng, n, k, d)
    oo, m, rr = stacked[:, :k, :k], stacked[:, :k, k:], stacked[:, k:, k:]
    num = torch.sqrt(((g1 @ m) * (m @ g2)).sum((-1, -2)).clamp_min(0))
    return num / (torch.sqrt((g1 * oo).sum((-1, -2))) * torch.sqrt((rr * g2).sum((-1, -2))))


def _factor_scores(rng, n: int, d: int, k: int, kind: str) -> torch.Tensor:
    """``[n]`` composition scores of random Gaussian head pairs, from the factors themselves."""
    r = lambda *s: torch.from_numpy(rng.standard_normal(s))  # noqa: E731
    v1, o1 = r(n, d, k), r(n, k, d)
    a2, b2 = (r(n, d, k), r(n, k, d)) if kind == "V" else (r(n, d, k), r(n, d, k))
    return _pair_scores(v1, o1, a2, b2, kind)


def _pair_scores(v1, o1, a2, b2, kind):
    """Composition scores of the (broadcast) pairs of first-head factors (W_V1, W_O1) and second-head factors:
    Q: W_OV1 W_QK2 = V1 O1 Q2 K2^T; K: W_OV1 W_QK2^T = V1 O1 K2 Q2^T; V: W_OV1 W_OV2 = V1 O1 V2 O2."""
    if kind == "Q":
        right_a, right_b = a2, b2.transpose(-1, -2)
    elif kind == "K":
        right_a, right_b = b2, a2.transpose(-1, -2)
    else:
        right_a, right_b = a2, b2
    num = torch.sqrt(_fro2(v1, o1, right_a, right_b))
    return num / (factored_norm(v1, o1) * factored_norm(right_a, right_b))


def composition_scores(weights, *, relative_se: float = 0.01, seed: int = 0, max_samples: int = 4096
                       ) -> tuple[list, dict]:
    """Rows (layer1, head1, layer2, head2, kind, score, baseline, corrected) for every earlier -> later head pair,
    and the baseline of each kind: ``{kind: {"mean", "se", "samples", "median_corrected"}}``.

    The random baseline is sampled until its standard error is at most ``relative_se`` of the median absolute
    corrected score of that kind (or ``max_samples``; the SE is reported either way), so the chance level does not
    move the scores it corrects.

    weights: :class:`attnlab.HeadWeights` (W_Q, W_K, W_V ``[L, H, d, k]``, W_O ``[L, H, k, d]``)."""
    n_layers, n_heads, d_model, d_head = weights.W_Q.shape
    raw = {kind: [] for kind in "QKV"}
    for l1 in range(n_layers - 1):
        ov1 = (weights.W_V[l1], weights.W_O[l1])
        for l2 in range(l1 + 1, n_layers):
            for kind, second in (("Q", (weights.W_Q[l2], weights.W_K[l2])), ("K", (weights.W_Q[l2], weights.W_K[l2])),
                                 ("V", (weights.W_V[l2], weights.W_O[l2]))):
                raw[kind].append((l1, l2, composition(ov1, second, kind)))
    base = {}
    streams: dict = {}  # one per distinct draw: Q, K and V share the Wishart one
    for kind in "QKV":
        scores = torch.cat([m.flatten() for _, _, m in raw[kind]]) if raw[kind] else torch.zeros(0)
        draw = _draw_kind(d_model, d_head, kind)
        if draw not in streams:
            streams[draw] = _BaselineStream(d_model, d_head, kind, seed)
        stream = streams[draw]
        first = stream.estimate(0.0, 256, 256)
        median = float((scores - first["mean"]).abs().median()) if len(scores) else 0.0
        b = stream.estimate(relative_se * median, 256, max_samples)
        base[kind] = {**b, "median_corrected": float((scores - b["mean"]).abs().median()) if len(scores) else 0.0}
    rows = []
    for l1 in range(n_layers - 1):
        for l2 in range(l1 + 1, n_layers):
            for kind in "QKV":
                matrix = next(m for a, b, m in raw[kind] if (a, b) == (l1, l2))
                for h1 in range(n_heads):
                    for h2 in range(n_heads):
                        value = float(matrix[h1, h2])
                        rows.append((l1, h1, l2, h2, kind, value, base[kind]["mean"], value - base[kind]["mean"]))
    return rows, base


# ---------------------------------------------------------------- attention-pattern detectors


#: detectors read at the ordinary (unmasked) queries; the last is read at the [MASK] only
DETECTORS = ("previous_token", "next_token", "self", "duplicate_token", "prefix_matching", "suffix_matching", "cls",
             "sep", "mask", "induction_at_mask")
AT_MASK = ("induction_at_mask",)


def templates(ids: torch.Tensor, specials: dict) -> dict:
    """Boolean templates ``[B, S, S]`` (query, key) of every detector for token ids ``[B, S]``.

    prefix_matching (Olsson et al.'s induction): the token after an earlier instance of the query's token;
    induction_at_mask: the token after an earlier instance of the token *before* the query - what an induction
    head does at a [MASK], whose own token is hidden (the induction map's "previous instance" target);
    suffix_matching: the token before a later instance; duplicate_token: any other instance."""
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
        "prefix_matching": torch.nn.functional.pad((other & (k < q))[:, :, :-1], (1, 0)),
        # key j - 1 where token[j] == token[q], j > q
        "suffix_matching": torch.nn.functional.pad((other & (k > q))[:, :, 1:], (0, 1)),
        # key j + 1 where token[j] == token[q - 1], j + 1 < q
        "induction_at_mask": torch.nn.functional.pad((other & (k < q))[:, :-1, :-1], (1, 0, 1, 0)),
    }
    for name in ("cls", "sep", "mask"):
        token = specials.get(name)
        hit = (ids == token) if token is not None else torch.zeros_like(ids, dtype=torch.bool)
        out[name] = hit[:, None, :].expand(b, s, s)
    return out


def detector_scores(attention: torch.Tensor, ids: torch.Tensor, specials: dict, *, causal: bool = False,
                    query_positions: torch.Tensor | None = None, names=DETECTORS,
                    visible: torch.Tensor | None = None) -> dict:
    """Chance-corrected detector scores per head: ``{name: (score [L, H], chance [L], corrected [L, H])}``.

    attention ``[B, Q, L, H, S]``: the rows of the queries at ``query_positions [B, Q]`` (default: every
    position, Q = S, as the extractor returns with query_positions=None). ``visible`` ``[B, Q, L, S]``: the keys
    each row could see in each layer (the extractor's ``visible``, read from the model's own masks; default: every
    key, or those at or before the query when ``causal``). Each detector is read at the queries it is defined for -
    ``induction_at_mask`` at [MASK] queries, every other at the other queries - and, per layer, only where its
    template holds a key the query can see there. score = mean attention mass on the template keys; chance = the
    same for uniform attention over the keys the query can see in that layer (``|template| / |visible|``, so a
    uniform head scores exactly its chance: a sliding-window layer's previous-token chance is 1 / its window, not
    1 / S); corrected = score - chance."""
    b, s = ids.shape
    n_layers = attention.shape[2]
    if query_positions is None:
        query_positions = torch.arange(s).expand(b, s)
    rows = torch.arange(b)[:, None]
    tpl = templates(ids, specials)
    if visible is None:
        every = torch.ones(s, s, dtype=torch.bool) if not causal else torch.ones(s, s, dtype=torch.bool).tril()
        visible = every[query_positions][:, :, None, :].expand(-1, -1, n_layers, -1)  # [B, Q, L, S]
    visible = visible.to(attention.device)
    seen = visible.sum(-1).double()  # [B, Q, L]
    mask_id = specials.get("mask")
    at_mask = (ids[rows, query_positions] == mask_id) if mask_id is not None else torch.zeros_like(query_positions,
                                                                                                   dtype=torch.bool)
    out = {}
    for name in names:
        t = tpl[name][rows, query_positions][:, :, None, :] & visible  # [B, Q, L, S]
        wanted = at_mask if name in AT_MASK else ~at_mask
        has = (t.sum(-1) > 0) & wanted[:, :, None]  # [B, Q, L]
        if not has.any():
            nan = torch.full(attention.shape[2:4], math.nan)
            out[name] = (nan, torch.full((n_layers,), math.nan, dtype=torch.float64), nan.clone())
            continue
        mass = torch.einsum("bqlhk,bqlk->bqlh", attention, t.to(attention.dtype))  # [B, Q, L, H]
        w = has.to(mass.dtype)
        count = w.sum((0, 1))  # [L] queries scored per layer
        score = (mass * w[..., None]).sum((0, 1)) / count[:, None]  # [L, H]; NaN for a layer that never sees it
        share = torch.where(has, t.sum(-1).double() / seen.clamp_min(1), 0.0)
        chance = share.sum((0, 1)) / count.double()  # [L]
        out[name] = (score, chance, score - chance[:, None].to(score.dtype))
    return out
