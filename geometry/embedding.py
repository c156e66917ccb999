"""Joint 2-D UMAP embeddings of one head's scaled, key-translated queries and keys (Figures 3-4)."""

from __future__ import annotations

import warnings

import numpy as np


def joint_embedding(queries, keys, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """UMAP (cosine metric) of the points ``[queries; keys]``: ``[n_q + n_k, 2]``, queries first.

    queries ``[n_q, d]``, keys ``[n_k, d]``, already scaled and translated (``scaling.transform_qk``: its
    centroids must come from every token, not just the plotted ones). Seeded: UMAP then runs single-threaded
    and is reproducible. Cosine distance sees direction from the origin, so both the scaling and the key
    translation move points.
    """
    import umap

    points = np.concatenate([np.asarray(queries, dtype=np.float64), np.asarray(keys, dtype=np.float64)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and numba chatter
        reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=min(n_neighbors, len(points) - 1),
                            min_dist=min_dist, random_state=seed)
        return reducer.fit_transform(points).astype(np.float32)


def subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``cap`` of ``n`` points, seeded and sorted (all of them when cap is None)."""
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
