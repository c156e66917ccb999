"""Protocol ``notebook``: the three Figure 2 metrics exactly as the paper's notebook computes them, vectorised.

``geometry/scaling.py`` (protocol ``text``, the default) implements our reading of the paper's *words*. The
notebook (``Attention Visualization/correlation_optimization.ipynb``) computes something else; this module
reproduces it, quirks included, and ``tests/test_geometry.py`` checks it against a line-by-line transcription
of the cells (``geometry/notebook_reference.py``) to 1e-9 on real MiniLM queries and keys. The quirks:

1. Scaling: queries are DIVIDED by the notebook's constant s and keys multiplied by it. attnlab reports
   c = 1 / s (its convention multiplies queries by c), so every constant column here is in attnlab's
   convention; the notebook's s is 1 / c. Keys are never translated.
2. Pairs: every query with every key of its sentence, future keys included even for GPT-2 (causal models).
3. Threshold (weighted_corr): ONE per head, the 0.5th percentile of the distances of all pairs of the first
   ``threshold_sentences`` (25) sentences at ALL constants pooled (the notebook's distance list is never reset).
4. Weights: (12 - d)^2, from a variable ``thresh = 12`` left over from an earlier cell, not the threshold.
5. weighted_corr is a mean over *queries*: per query, the weighted correlation of dot product and distance
   over its keys under the threshold; queries with fewer than 2 such keys are skipped; the head's value is
   the mean over contributing queries (NaN where none contributed: the notebook never sets that entry).
6. scaled_weighted_corr (the notebook's other cell): the same with the fixed distance 12 as the cut-off, and
   the per-head sum divided by the number of contributing queries over ALL heads at that constant - a head
   with no contributing query gets the notebook's default 0.
7. norm_ratio: per sentence the mean |q| and mean |k| over its tokens; the ratio of their medians over
   sentences (``statistics.median``: even counts average the two middle values) at c = 1; at other
   constants the ratio scales by c^2 (queries x c, keys / c), best = closest to 1.
The optimum is the most negative correlation (the notebook's ``min``), the norm ratio closest to 1. An exact
tie (e.g. a head whose every value is the notebook's default 0) has no optimum (NaN, with a status).

Shapes: queries, keys ``[N, S, L, H, d]`` with zeros beyond ``lengths [N]``; G = L * H heads, layer-major.
"""

from __future__ import annotations

import torch

from attnlab.core.errors import InputError
from attnlab.geometry.scaling import (
    PAPER_CONSTANTS, ScalingMetrics, _flat_heads, check_constants, lowest_with_percentile, median, token_mask,
    weighted_pearson,
)

NOTEBOOK_FIXED_DISTANCE = 12.0  # the notebook's `thresh = 12`
NOTEBOOK_THRESHOLD_SENTENCES = 25  # cell 19 pools the distances of `sentences[0:25]`
NOTEBOOK_PERCENTILE = 0.5


def _distances(q, k, c):
    """``[G, N, S, S]`` |q c - k / c| computed directly (no |a|^2 + |b|^2 - 2ab expansion, which would lose the
    digits that decide whether a pair falls under a threshold)."""
    g, n, s, d = q.shape
    out = torch.cdist((q * c).reshape(g * n, s, d), (k / c).reshape(g * n, s, d),
                      compute_mode="donot_use_mm_for_euclid_dist")
    return out.reshape(g, n, s, s)


def _per_query_corr(dist, dot, under, fixed):
    """Sum over contributing queries of their weighted correlations, and their count: ``([G], [G])``.

    A query contributes when more than one of its keys is ``under``; weights (fixed - d)^2."""
    w = torch.where(under, (fixed - dist) ** 2, 0.0)
    corr = weighted_pearson(dot, dist, w)  # [G, N, S] per query over its keys
    contributing = under.sum(-1) > 1
    total = torch.where(contributing, corr, 0.0).sum((1, 2))  # a NaN of a contributing query propagates
    return total, contributing.sum((1, 2))


def notebook_metrics(queries, keys, lengths, constants=PAPER_CONSTANTS, *,
                     threshold_sentences: int = NOTEBOOK_THRESHOLD_SENTENCES,
                     fixed_distance: float = NOTEBOOK_FIXED_DISTANCE, percentile: float = NOTEBOOK_PERCENTILE,
                     heads_per_chunk: int | None = None, memory_mb: float = 512) -> ScalingMetrics:
    """The notebook's three metrics for every head (see module docstring). ``constants``: attnlab's c."""
    constants = check_constants(constants)
    q_all, k_all = _flat_heads(queries).double(), _flat_heads(keys).double()  # [N, S, G, d]
    n, s, n_heads, _ = q_all.shape
    if n == 0 or int(torch.as_tensor(lengths).sum()) == 0:
        raise InputError("no query-key pairs: every sentence is empty")
    valid = token_mask(lengths, s)  # [N, S]
    pairs = valid[:, :, None] & valid[:, None, :]  # [N, S, S]: every query with every key (no causal cut)
    n_thr = min(threshold_sentences, n)
    if heads_per_chunk is None:
        heads_per_chunk = max(1, min(16, int(memory_mb * 2**20 // (n * s * s * 8 * 8))))
    n_c = len(constants)
    sum_a = torch.empty(n_heads, n_c, dtype=torch.float64)
    cnt_a = torch.empty(n_heads, n_c, dtype=torch.long)
    sum_b = torch.empty(n_heads, n_c, dtype=torch.float64)
    cnt_b = torch.empty(n_heads, n_c, dtype=torch.long)
    for g0 in range(0, n_heads, heads_per_chunk):
        g1 = min(g0 + heads_per_chunk, n_heads)
        q = q_all[:, :, g0:g1].permute(2, 0, 1, 3).contiguous()  # [G, N, S, d]
        k = k_all[:, :, g0:g1].permute(2, 0, 1, 3).contiguous()
        dot = torch.einsum("gnid,gnjd->gnij", q, k)
        # cells 19 + 27: one threshold per head over the first sentences at every constant
        pooled = torch.cat([_distances(q[:, :n_thr], k[:, :n_thr], float(c))[:, pairs[:n_thr]]
                            for c in constants.tolist()], dim=1)  # [G, pairs x constants]
        threshold = lowest_with_percentile(pooled, percentile)[2]  # numpy's percentile, exactly
        del pooled
        for ci, c in enumerate(constants.tolist()):
            dist = _distances(q, k, c)
            sum_a[g0:g1, ci], cnt_a[g0:g1, ci] = _per_query_corr(
                dist, dot, (dist < threshold[:, None, None, None]) & pairs, fixed_distance)  # cell 29
            sum_b[g0:g1, ci], cnt_b[g0:g1, ci] = _per_query_corr(
                dist, dot, (dist < fixed_distance) & pairs, fixed_distance)  # cell 28
            del dist
    weighted = torch.where(cnt_a > 0, sum_a / cnt_a.clamp_min(1), torch.nan)
    token_count = cnt_b.sum(0, keepdim=True)  # contributing queries of ALL heads, per constant
    scaled = torch.where(token_count > 0, sum_b / token_count.clamp_min(1), torch.nan)
    # cells 44-45: per-sentence mean norms, median over sentences, ratio at c = 1
    count = valid.sum(1).double()[:, None]  # [N, 1]
    q_mean = (q_all.norm(dim=-1) * valid[:, :, None]).sum(1) / count  # [N, G]
    k_mean = (k_all.norm(dim=-1) * valid[:, :, None]).sum(1) / count
    q_med, k_med = median(q_mean, 0), median(k_mean, 0)
    ratio = constants[None, :] ** 2 * (q_med / k_med)[:, None]
    n_pairs = int(pairs.sum())
    return ScalingMetrics(constants, {"weighted_corr": weighted, "scaled_weighted_corr": scaled, "norm_ratio": ratio},
                          cnt_a, cnt_b, q_med, k_med, n_pairs, None, protocol="notebook")
