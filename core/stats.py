"""Uncertainty, once: the percentile bootstrap every experiment uses for its confidence intervals."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, seed: int, n_boot: int = 10000, level: float = 0.95, chunk: int = 2000):
    """Percentile bootstrap CI of the mean over the first axis of ``values`` (``[T]`` or ``[T, ...]``).

    Returns ``(low, high)``, each a float for ``[T]`` input or an array of ``values.shape[1:]``; NaN when there
    are fewer than two trials. Resamples are drawn from ``numpy.random.default_rng(seed + 1)`` (the stream
    attnlab's runs have always used, so seeded results stay the same) and applied as count weights, ``[B, T] x
    [T, K]``, a chunk of resamples at a time: memory stays ``chunk x (T + K)`` whatever the size of ``values``.
    """
    values = np.asarray(values, dtype=np.float64)
    shape = values.shape[1:]
    t = values.shape[0] if values.ndim else 0
    if t < 2:
        nan = np.full(shape, np.nan)
        return (float("nan"), float("nan")) if not shape else (nan, nan.copy())
    flat = values.reshape(t, -1)
    rng = np.random.default_rng(seed + 1)
    idx = rng.integers(t, size=(n_boot, t))
    means = np.empty((n_boot, flat.shape[1]))
    for s in range(0, n_boot, chunk):
        rows = idx[s:s + chunk]
        counts = np.zeros((len(rows), t))
        np.add.at(counts, (np.repeat(np.arange(len(rows)), t), rows.ravel()), 1.0)
        means[s:s + chunk] = counts @ flat / t
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    if not shape:
        return float(lo[0]), float(hi[0])
    return lo.reshape(shape), hi.reshape(shape)


def top_share(values) -> np.ndarray:
    """Share of the sum over the first axis carried by its single largest entry (``[T, ...]`` -> ``[...]``;
    NaN where the sum is not positive). 1/T when every trial gives the same; 1 when one trial gives everything."""
    values = np.asarray(values, dtype=np.float64)
    total = values.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, values.max(0) / np.where(total > 0, total, 1.0), np.nan)


def bootstrap_ratio_ci(numerators, denominators, seed: int, n_boot: int = 10000, level: float = 0.95):
    """Percentile bootstrap CI of ``sum(numerators) / sum(denominators)`` over groups (e.g. an accuracy over
    sentences: correct words and words per sentence), resampling the groups; NaN for fewer than two groups."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed + 1)
    idx = rng.integers(len(num), size=(n_boot, len(num)))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-300)
    lo_n, hi_n = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo_n), float(hi_n)
