"""How well query-key *distance* tracks the *dot product* as queries and keys are rescaled (Figure 2).

Scaling convention (used everywhere in attnlab, stated once here):

    q' = c * q              queries are MULTIPLIED by c (the paper's text; its code divides them)
    k' = k / c + t          keys are divided by c, then translated by one constant vector t

so every dot product q'.k' = q.k + c q.t: the logits of one query move by the same amount for every key,
and softmax ignores that, so every attention pattern is unchanged (``tests/test_geometry.py`` checks it).
With ``translate=True`` (the default) t = c * mean(q) - mean(k) / c, which puts the key centroid on the
query centroid; then q' - k' = c (q - mean q) - (k - mean k) / c, i.e. distances are between *centred*
vectors. Translating the queries instead would add q_t.k to each logit - a different amount for every key
- and change the pattern; that is why only keys are moved.

The dot product the metrics compare distance with is the attention logit q.k (up to the model's constant
1/sqrt(d_head), which no correlation sees). It does not depend on c, so only the distance side moves.

Per head, pairs are query-key pairs within one sentence (for causal models only keys at or before the
query's position). Everything is vectorised over pairs, heads and constants: per pair we precompute
``|q~|^2``, ``|k~|^2``, ``q~.k~`` once, and the distance at any c is

    d(c)^2 = c^2 |q~|^2 + |k~|^2 / c^2 - 2 q~.k~         (q~, k~: centred, or raw without translation)

Shapes: G heads (layers * heads, flattened layer-major), P pairs, C constants, N sentences, S tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.core.errors import InputError
from attnlab.geometry.experiment import METRIC_TITLES, METRICS, PAPER_CONSTANTS  # noqa: F401  (the config's names)

PERCENTILE = 0.5  # the threshold: the 0.5th percentile of a head's query-key distances
MIN_PAIRS = 3  # a weighted correlation of fewer pairs under the threshold is reported as missing (NaN)


def check_constants(constants) -> torch.Tensor:
    c = torch.as_tensor(constants, dtype=torch.float64)
    if c.ndim == 0:
        c = c[None]
    if c.numel() == 0:
        raise InputError("no scaling constants given; pass positive numbers, e.g. 0.2,0.4,0.8,1,1.25,2.5,5")
    if not torch.isfinite(c).all() or (c <= 0).any():
        raise InputError(f"scaling constants must be finite and > 0 (queries are multiplied by c, keys divided "
                         f"by c); got {c.tolist()}")
    return c


def transform_qk(q, k, c: float, *, translate: bool = True, mean_q=None, mean_k=None):
    """The convention above applied to vectors: ``q [..., d] -> c q``, ``k [..., d] -> k / c + t``.

    ``mean_q``/``mean_k`` default to the means over all leading dimensions of ``q``/``k``.
    """
    q2, k2 = q * c, k / c
    if translate:
        mean_q = q.reshape(-1, q.shape[-1]).mean(0) if mean_q is None else mean_q
        mean_k = k.reshape(-1, k.shape[-1]).mean(0) if mean_k is None else mean_k
        k2 = k2 + (c * mean_q - mean_k / c)
    return q2, k2


def token_mask(lengths, width: int) -> torch.Tensor:
    """``[N, width]``: True at the real tokens of each sentence (positions below its length)."""
    return torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]


def pair_index(lengths, causal: bool):
    """Every within-sentence query-key pair as index tensors ``(sentence, query_pos, key_pos)`` [P] each."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    width = int(lengths.max())
    tokens = token_mask(lengths, width)
    valid = tokens[:, :, None] & tokens[:, None, :]  # [N, query, key]
    if causal:
        pos = torch.arange(width)
        valid &= pos[None, None, :] <= pos[None, :, None]
    return valid.nonzero(as_tuple=True)


@dataclass
class PairTerms:
    """Per-pair quantities of G heads over the same P pairs (float64).

    q_sq, k_sq, cross  [G, P]   |q~|^2, |k~|^2, q~.k~ (centred vectors with translation, raw without)
    dot                [G, P]   q.k, the raw attention logit (unscaled)
    """

    q_sq: torch.Tensor
    k_sq: torch.Tensor
    cross: torch.Tensor
    dot: torch.Tensor


def pair_terms(queries, keys, lengths, *, causal: bool, translate: bool = True, index=None) -> PairTerms:
    """queries, keys: ``[N, S, G, d]`` (zeros beyond ``lengths [N]``) -> :class:`PairTerms` of the pairs."""
    q, k = queries.double(), keys.double()
    n_idx, i_idx, j_idx = pair_index(lengths, causal) if index is None else index
    width = q.shape[1]
    valid = token_mask(lengths, width)  # [N, S]
    dot = torch.einsum("nigd,njgd->gnij", q, k)[:, n_idx, i_idx, j_idx]
    if translate:
        q = q - q[valid].mean(0)  # [G, d] centroids over every token of every sentence
        k = k - k[valid].mean(0)
        cross = torch.einsum("nigd,njgd->gnij", q, k)[:, n_idx, i_idx, j_idx]
    else:
        cross = dot
    q_sq = (q * q).sum(-1).permute(2, 0, 1)[:, n_idx, i_idx]  # [G, P]
    k_sq = (k * k).sum(-1).permute(2, 0, 1)[:, n_idx, j_idx]
    return PairTerms(q_sq, k_sq, cross, dot)


def scaled_distances(terms: PairTerms, constants) -> torch.Tensor:
    """|q' - k'| for every head, constant and pair: ``[G, C, P]``. ``constants``: ``[C]`` or per head ``[G, C]``."""
    c2 = torch.as_tensor(constants, dtype=torch.float64) ** 2
    c2 = c2[None, :, None] if c2.ndim == 1 else c2[:, :, None]
    d2 = c2 * terms.q_sq[:, None, :] + terms.k_sq[:, None, :] / c2 - 2 * terms.cross[:, None, :]
    return d2.clamp_min_(0).sqrt_()  # rounding can push a zero distance a hair below 0


def _lerp(a, b, t):
    """numpy's percentile interpolation, operation for operation (so thresholds match np.percentile)."""
    diff = b - a
    return torch.where(torch.as_tensor(t) >= 0.5, b - diff * (1 - t), a + diff * t)


def _percentile_order(n: int, percentile: float) -> tuple[int, int, float]:
    """numpy's 'linear' percentile of n sorted values: v[lo] + t (v[hi] - v[lo]); returns (lo, hi, t)."""
    pos = percentile / 100 * (n - 1)
    lo = math.floor(pos)
    return lo, min(lo + 1, n - 1), pos - lo


def lowest_with_percentile(values, percentile: float = PERCENTILE):
    """The smallest values along the last axis (ascending) that a low percentile can depend on, their
    indices, and the percentile itself (numpy's default 'linear' method). values ``[..., P]``."""
    lo, hi, t = _percentile_order(values.shape[-1], percentile)
    small, idx = torch.topk(values, hi + 1, dim=-1, largest=False, sorted=True)
    return small, idx, _lerp(small[..., lo], small[..., hi], t)


def weighted_pearson(x, y, w):
    """Weighted Pearson correlation along the last axis; NaN where a variance or the weight sum is 0."""
    sw = w.sum(-1)
    mx = (w * x).sum(-1) / sw
    my = (w * y).sum(-1) / sw
    dx, dy = x - mx[..., None], y - my[..., None]
    cov = (w * dx * dy).sum(-1)
    vx, vy = (w * dx * dx).sum(-1), (w * dy * dy).sum(-1)
    r = cov / torch.sqrt(vx * vy)
    return torch.where((vx > 0) & (vy > 0) & (sw > 0), r, torch.nan)


def weighted_correlation_from_distances(dist, dot, percentile: float = PERCENTILE, min_pairs: int = MIN_PAIRS):
    """Metric 1 from distances ``[G, C, P]`` and logits ``[G, P]``.

    Threshold d = the ``percentile`` of the head's distances (at that constant); pairs with d_i < d, weights
    (d - d_i)^2; weighted Pearson correlation of dot product with distance. Returns ``(corr [G, C],
    n_under [G, C])``; corr is NaN where fewer than ``min_pairs`` pairs lie under the threshold.
    """
    small, idx, thr = lowest_with_percentile(dist, percentile)
    under = small < thr[..., None]
    w = torch.where(under, (thr[..., None] - small) ** 2, 0.0)
    x = dot[:, None, :].expand(-1, dist.shape[1], -1).gather(-1, idx)
    n_under = under.sum(-1)
    corr = weighted_pearson(x, small, w)
    return torch.where(n_under >= min_pairs, corr, torch.nan), n_under


def scaled_weighted_correlation(corr, pooled_counts):
    """Metric 2 - our exact reading of the paper's "normalised by the count of pairs under threshold,
    counted across all heads for that constant":

        value[h, c] = corr[h, c] * n[h, c] / sum_h' n[h', c]

    where corr is metric 1 and n[h, c] counts head h's pairs under ONE threshold shared by all heads at
    constant c: the ``PERCENTILE`` of the pooled distances of every head (:func:`pooled_counts`). Why this
    reading: with a per-head threshold every head has the same number of pairs under it (all heads share
    the same pairs), so any normalisation by that count would be a constant and change nothing. Read
    this way, a head's correlation is weighted by its share of the model's closest query-key pairs at
    that c. Values lie in [-1, 1]; the best constant is the most negative (closest to -1).

    corr, pooled_counts: ``[G, C]``. Returns ``[G, C]``: NaN where corr is NaN or where none of the head's
    pairs lies under the pooled threshold (its share would be 0, and 0 is not a correlation).
    """
    total = pooled_counts.sum(0, keepdim=True).double()
    share = torch.where(pooled_counts > 0, pooled_counts.double() / total, torch.nan)
    return corr * share


class PooledThreshold:
    """Streams head chunks and keeps, per constant, the lowest distances of all heads seen so far (with
    their head), enough to find the pooled percentile and each head's count under it at the end."""

    def __init__(self, n_heads_total: int, n_pairs: int, n_constants: int, percentile: float = PERCENTILE):
        self.n_heads, self.n_pairs = n_heads_total, n_pairs
        self.percentile = percentile
        self.keep = _percentile_order(n_heads_total * n_pairs, percentile)[1] + 1
        self.values = torch.empty(n_constants, 0, dtype=torch.float64)
        self.heads = torch.empty(n_constants, 0, dtype=torch.long)

    def add(self, dist, first_head: int) -> None:
        g, c, p = dist.shape
        flat = dist.permute(1, 0, 2).reshape(c, g * p)
        values = torch.cat([self.values, flat], dim=1)
        heads = torch.cat([self.heads, (torch.arange(g * p) // p + first_head).expand(c, -1)], dim=1)
        k = min(self.keep, values.shape[1])
        self.values, order = torch.topk(values, k, dim=-1, largest=False, sorted=True)
        self.heads = heads.gather(1, order)

    def counts(self) -> torch.Tensor:
        """``[G_total, C]``: pairs of each head under the pooled threshold of each constant."""
        lo, hi, t = _percentile_order(self.n_heads * self.n_pairs, self.percentile)
        thr = _lerp(self.values[:, lo], self.values[:, hi], t)
        out = torch.zeros(self.values.shape[0], self.n_heads, dtype=torch.long)
        for ci in range(self.values.shape[0]):  # a loop over constants, not pairs
            under = self.heads[ci][self.values[ci] < thr[ci]]
            out[ci] = torch.bincount(under, minlength=self.n_heads)
        return out.T


def norm_ratio_values(median_q, median_k, constants):
    """Metric 3: median |c q| / median |k / c| = c^2 mq / mk per head and constant ``[G, C]``; best = closest
    to 1. The continuous optimum is c* = sqrt(mk / mq) (with our convention; the paper's code, dividing
    queries by c, writes it sqrt(mq / mk))."""
    c = torch.as_tensor(constants, dtype=torch.float64)
    return c[None, :] ** 2 * (median_q / median_k)[:, None]


def norm_ratio_optimum(median_q, median_k):
    return torch.sqrt(median_k / median_q)


NO_VALUE, TIE = -1, -2
TIE_TOLERANCE = 1e-9  # values this close to the best are ties: such differences are rounding, not evidence


def _badness(values, metric: str) -> torch.Tensor:
    """How far each value is from the metric's ideal (-1 for correlations, 1 for the norm ratio); inf if NaN."""
    if metric in ("weighted_corr", "scaled_weighted_corr"):
        badness = (values + 1).abs()  # closest to -1
    elif metric == "norm_ratio":
        badness = values.log().abs()  # closest to 1
    else:
        raise InputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return torch.where(torch.isnan(badness), torch.inf, badness)


def best_index(values, metric: str) -> torch.Tensor:
    """Index of the best constant per head ``[G]``: ``NO_VALUE`` (-1) where every value is missing,
    ``TIE`` (-2) where two constants are equally good to within ``TIE_TOLERANCE`` (the choice would be
    decided by rounding). A two-key correlation is exactly +-1, so ties do occur on real data."""
    badness = _badness(values, metric)
    least = badness.min(-1, keepdim=True).values
    idx = badness.argmin(-1)
    tied = (badness - least <= TIE_TOLERANCE).sum(-1) > 1
    idx = torch.where(tied, TIE, idx)
    return torch.where(torch.isinf(least[:, 0]), NO_VALUE, idx)


def best_status(values, metric: str, constants) -> list[str]:
    """Why each head has (or has no) optimum: "ok", "no value at any constant", or which constants tie."""
    badness = _badness(values, metric)
    out = []
    for g, i in enumerate(best_index(values, metric).tolist()):
        if i >= 0:
            out.append("ok")
        elif i == NO_VALUE:
            out.append("no value at any constant")
        else:
            least = badness[g].min().item()
            tied = [f"{c:g}" for c, b in zip(constants.tolist(), badness[g].tolist()) if b - least <= TIE_TOLERANCE]
            out.append(f"tie between constants {', '.join(tied)}: no single optimum")
    return out


@dataclass
class ScalingMetrics:
    """Every metric of every head at every constant. Heads flattened layer-major: g = layer * H + head.

    constants [C] (attnlab's convention: queries x c); values[metric] [G, C]; n_under [G, C] pairs under the
    head's own threshold (protocol ``notebook``: queries with 2+ keys under it); pooled_counts [G, C] (pairs
    under the pooled threshold; ``notebook``: queries with 2+ keys within distance 12); median_q_norm,
    median_k_norm [G]; n_pairs (per head); continuous: {metric: [G]} optimum on a continuous scale, or None.
    """

    constants: torch.Tensor
    values: dict
    n_under: torch.Tensor
    pooled_counts: torch.Tensor
    median_q_norm: torch.Tensor
    median_k_norm: torch.Tensor
    n_pairs: int
    continuous: dict | None = None
    protocol: str = "text"

    def best(self, metric: str) -> torch.Tensor:
        """Best grid constant per head ``[G]`` (NaN where the metric is missing everywhere, or tied)."""
        idx = best_index(self.values[metric], metric)
        return torch.where(idx >= 0, self.constants[idx.clamp_min(0)], torch.nan)

    def status(self, metric: str) -> list[str]:
        return best_status(self.values[metric], metric, self.constants)


def _flat_heads(x):
    """``[N, S, L, H, d]`` -> ``[N, S, L*H, d]`` (layer-major)."""
    n, s, layers, heads, d = x.shape
    return x.reshape(n, s, layers * heads, d)


def median(x, dim: int = 0) -> torch.Tensor:
    """NumPy's median: the mean of the two middle values for an even count (``torch.median`` takes the lower)."""
    n = x.shape[dim]
    ordered = x.sort(dim).values
    lo = ordered.narrow(dim, (n - 1) // 2, 1)
    hi = ordered.narrow(dim, n // 2, 1)
    return ((lo + hi) / 2).squeeze(dim)


def median_norms(queries, keys, lengths):
    """Median |q| and |k| per head over every token ``[G]`` each (raw vectors, before any transform)."""
    q, k = _flat_heads(queries), _flat_heads(keys)
    valid = token_mask(lengths, q.shape[1])
    return median(q[valid].double().norm(dim=-1)), median(k[valid].double().norm(dim=-1))


def head_chunks(queries, keys, lengths, *, causal: bool, translate: bool, heads_per_chunk: int, index=None):
    """Yield ``(g0, g1, PairTerms of heads g0..g1-1)`` over every head, a chunk at a time to bound memory.

    queries, keys: ``[N, S, L, H, d]``; heads are flattened layer-major. ``index``: :func:`pair_index`, if known.
    """
    q_all, k_all = _flat_heads(queries), _flat_heads(keys)
    index = pair_index(lengths, causal) if index is None else index
    n_heads = q_all.shape[2]
    for g0 in range(0, n_heads, heads_per_chunk):
        g1 = min(g0 + heads_per_chunk, n_heads)
        yield g0, g1, pair_terms(q_all[:, :, g0:g1], k_all[:, :, g0:g1], lengths, causal=causal,
                                 translate=translate, index=index)


def continuous_grid(low: float = 0.05, high: float = 20.0, points: int = 25) -> torch.Tensor:
    return torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)


def _golden_refine(terms: PairTerms, grid, grid_corr, refine_steps: int, percentile: float, min_pairs: int):
    """Golden-section search on log c between the grid neighbours of each head's best grid point.

    grid ``[K]``, grid_corr ``[g, K]`` (weighted_corr on the grid) -> optimum ``[g]`` (NaN where the grid has none);
    never worse than the grid: the grid point is kept where the search did not improve on it."""
    best = best_index(grid_corr, "weighted_corr")
    k = grid.shape[0]
    log_grid = grid.log()
    lo = log_grid[(best.clamp_min(0) - 1).clamp(0, k - 1)]
    hi = log_grid[(best.clamp_min(0) + 1).clamp(0, k - 1)]
    ratio = (math.sqrt(5) - 1) / 2

    def badness(log_c):  # [g] -> [g]; the golden search minimises |corr + 1| = corr + 1
        corr, _ = weighted_correlation_from_distances(scaled_distances(terms, log_c.exp()[:, None]), terms.dot,
                                                      percentile, min_pairs)
        return torch.nan_to_num(corr[:, 0] + 1, nan=torch.inf)

    a, b = lo.clone(), hi.clone()
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = badness(x1), badness(x2)
    for _ in range(refine_steps):
        left = f1 <= f2  # the minimum lies in [a, x2]: drop [x2, b]; else drop [a, x1]
        a, b = torch.where(left, a, x1), torch.where(left, x2, b)
        x1, x2 = (torch.where(left, b - ratio * (b - a), x2), torch.where(left, x1, a + ratio * (b - a)))
        f_new = badness(torch.where(left, x1, x2))
        f1, f2 = torch.where(left, f_new, f2), torch.where(left, f1, f_new)
    mid = (a + b) / 2
    grid_best = log_grid[best.clamp_min(0)]
    refined = torch.where(badness(mid) <= badness(grid_best), mid, grid_best).exp()
    return torch.where(best >= 0, refined, torch.nan)


def scaling_metrics(queries, keys, lengths, constants=PAPER_CONSTANTS, *, causal: bool, translate: bool = True,
                    heads_per_chunk: int | None = None, percentile: float = PERCENTILE, min_pairs: int = MIN_PAIRS,
                    continuous: bool = False, low: float = 0.05, high: float = 20.0, grid_points: int = 25,
                    refine_steps: int = 24, memory_mb: float = 512) -> ScalingMetrics:
    """All three metrics for every head (protocol ``text``). queries, keys: ``[N, S, L, H, d]`` (zeros beyond
    ``lengths [N]``).

    ``continuous=True`` also finds each head's optimum on a continuous scale (``.continuous``): the best of a
    ``grid_points`` log grid on [low, high], refined per head by golden-section search on log c for
    weighted_corr; the grid best for scaled_weighted_corr (its pooled threshold ties heads together); the
    closed form sqrt(mk / mq) for norm_ratio. The grid rides along with ``constants`` in the same pass over
    each head chunk's pair terms, and the search reuses those terms: one pass serves everything.
    """
    constants = check_constants(constants)
    grid = continuous_grid(low, high, grid_points) if continuous else torch.empty(0, dtype=torch.float64)
    every = torch.cat([constants, grid])
    n_c = len(constants)
    n_heads = queries.shape[2] * queries.shape[3]
    index = pair_index(lengths, causal)
    n_pairs = int(index[0].numel())
    if n_pairs == 0:
        raise InputError("no query-key pairs: every sentence is empty")
    if heads_per_chunk is None:  # distances [chunk, C, P] float64 and a few temporaries within memory_mb
        heads_per_chunk = max(1, min(16, int(memory_mb * 2**20 // (len(every) * n_pairs * 8 * 4))))
    corr = torch.empty(n_heads, len(every), dtype=torch.float64)
    n_under = torch.empty(n_heads, len(every), dtype=torch.long)
    refined = torch.full((n_heads,), torch.nan, dtype=torch.float64)
    pooled = PooledThreshold(n_heads, n_pairs, len(every), percentile)
    for g0, g1, terms in head_chunks(queries, keys, lengths, causal=causal, translate=translate,
                                     heads_per_chunk=heads_per_chunk, index=index):
        dist = scaled_distances(terms, every)
        corr[g0:g1], n_under[g0:g1] = weighted_correlation_from_distances(dist, terms.dot, percentile, min_pairs)
        pooled.add(dist, g0)
        del dist
        if continuous:
            refined[g0:g1] = _golden_refine(terms, grid, corr[g0:g1, n_c:], refine_steps, percentile, min_pairs)
        del terms
    counts = pooled.counts()
    mq, mk = median_norms(queries, keys, lengths)
    scaled = scaled_weighted_correlation(corr, counts)
    values = {
        "weighted_corr": corr[:, :n_c],
        "scaled_weighted_corr": scaled[:, :n_c],
        "norm_ratio": norm_ratio_values(mq, mk, constants),
    }
    cont = None
    if continuous:
        grid_best = best_index(scaled[:, n_c:], "scaled_weighted_corr")
        cont = {"weighted_corr": refined,
                "scaled_weighted_corr": torch.where(grid_best >= 0, grid[grid_best.clamp_min(0)], torch.nan),
                "norm_ratio": norm_ratio_optimum(mq, mk)}
    return ScalingMetrics(constants, values, n_under[:, :n_c], counts[:, :n_c], mq, mk, n_pairs, cont)


def continuous_optimum(queries, keys, lengths, *, causal: bool, translate: bool = True, low: float = 0.05,
                       high: float = 20.0, grid_points: int = 25, refine_steps: int = 24,
                       heads_per_chunk: int | None = None) -> dict:
    """The optimum of c per head on a continuous log scale, for every metric: ``{metric: [G]}``
    (see :func:`scaling_metrics` with ``continuous=True``)."""
    return scaling_metrics(queries, keys, lengths, (1.0,), causal=causal, translate=translate,
                           heads_per_chunk=heads_per_chunk, continuous=True, low=low, high=high,
                           grid_points=grid_points, refine_steps=refine_steps).continuous
