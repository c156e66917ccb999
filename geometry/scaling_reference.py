"""The slow, obvious reference for :mod:`attnlab.geometry.scaling` (protocol ``text``): per-pair Python loops.

It computes *our reading of the paper's words* - one query-key pair at a time, lists of distances and dot
products, ``np.percentile``, then a weighted correlation - with our scaling convention (queries multiplied by
c, keys translated). It is NOT the paper's notebook, which computes something else (a per-query mean, one
threshold pooled over constants, weights from a stale 12, no translation, future keys for GPT-2): that one
is transcribed line by line in ``geometry/notebook_reference.py`` (protocol ``notebook``). Tests compare the
vectorised metrics with this loop on small random data; ``benchmarks/bench_scaling.py`` times it against
them. Nothing else uses it: it is far too slow.

Inputs per head: a list of sentences, each a pair ``(Q [S, d], K [S, d])`` of numpy float64 arrays.
"""

from __future__ import annotations

import numpy as np


def _centroids(sentences):
    all_q = np.concatenate([q for q, _ in sentences])
    all_k = np.concatenate([k for _, k in sentences])
    return all_q.mean(0), all_k.mean(0)


def pairs_of_head(sentences, c: float, causal: bool, translate: bool = True):
    """Lists (distances, dot products) over every within-sentence pair, query-major like the fast code."""
    mean_q, mean_k = _centroids(sentences)
    shift = c * mean_q - mean_k / c if translate else 0.0
    dists, dots = [], []
    for q_mat, k_mat in sentences:
        for i in range(len(q_mat)):
            for j in range(len(k_mat)):
                if causal and j > i:
                    continue
                q_scaled = c * q_mat[i]
                k_scaled = k_mat[j] / c + shift
                dists.append(float(np.linalg.norm(q_scaled - k_scaled)))
                dots.append(float(np.dot(q_mat[i], k_mat[j])))
    return dists, dots


def weighted_corr(x, y, w):
    """Weighted Pearson correlation, the textbook formula, pair by pair."""
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    cov = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y)) / sw
    vx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x)) / sw
    vy = sum(wi * (yi - my) ** 2 for wi, yi in zip(w, y)) / sw
    if vx <= 0 or vy <= 0:
        return float("nan")
    return cov / np.sqrt(vx * vy)


def weighted_correlation(sentences, c: float, causal: bool, translate: bool = True, percentile: float = 0.5,
                         min_pairs: int = 3):
    """Metric 1 of one head at one constant: (correlation, pairs under the threshold)."""
    dists, dots = pairs_of_head(sentences, c, causal, translate)
    threshold = np.percentile(dists, percentile)
    xs, ys, ws = [], [], []
    for d_i, dot in zip(dists, dots):
        if d_i < threshold:
            xs.append(dot)
            ys.append(d_i)
            ws.append((threshold - d_i) ** 2)
    if len(xs) < min_pairs:
        return float("nan"), len(xs)
    return weighted_corr(xs, ys, ws), len(xs)


def scaled_weighted_correlation(heads, c: float, causal: bool, translate: bool = True, percentile: float = 0.5):
    """Metric 2 for every head at one constant (see ``scaling.scaled_weighted_correlation`` for the reading)."""
    per_head = [pairs_of_head(s, c, causal, translate)[0] for s in heads]
    threshold = np.percentile(np.concatenate(per_head), percentile)
    counts = [sum(1 for d_i in dists if d_i < threshold) for dists in per_head]
    total = sum(counts)
    out = []
    for sentences, n in zip(heads, counts):
        corr, _ = weighted_correlation(sentences, c, causal, translate, percentile)
        out.append(corr * n / total if n else float("nan"))  # no pair under the pooled threshold: no value
    return out, counts


def norm_ratio(sentences, c: float):
    """Metric 3: median |c q| / median |k / c| (np.median: the mean of the two middle values for an even count)."""
    q_norms = [np.linalg.norm(q) for q_mat, _ in sentences for q in q_mat]
    k_norms = [np.linalg.norm(k) for _, k_mat in sentences for k in k_mat]
    return float(np.median([c * n for n in q_norms]) / np.median([n / c for n in k_norms]))
