"""Joint 2-D UMAP embeddings of one head's scaled, key-translated queries and keys (Figures 3-4).

What makes a grid of six fits cost seconds rather than a minute, each measured in ``benchmarks/bench_umap.py``:

- **exact neighbours from matrix products**: for fewer than 4,096 points umap-learn computes every pairwise
  distance with a per-pair call and sorts every row; the same exact cosine neighbours come from chunked matrix
  products and a top-k in milliseconds, handed to umap-learn as ``precomputed_knn`` (at any size: exact always);
- **a warm start**: the two middle constants' layouts start from umap's spectral initialisation of the upper one,
  each other constant's from its inner neighbour's layout (neighbouring constants move points a little), and 200
  epochs suffice (umap's default for small data is 500; the two middle panels run 350); the panels are then also
  aligned with each other;
- **two halves at once**: the constants below and above the middle form two independent chains of equal length,
  fitted in two threads (the compiled epochs release the GIL);
- **compiled once, ever**: umap-learn compiles its numba functions in every new process (about 7 s); attnlab turns
  on numba's on-disk cache for them (``~/.cache/attnlab/numba-nogil``, or ``ATTNLAB_CACHE``/``NUMBA_CACHE_DIR``).
  pynndescent, which umap-learn imports, is left to its own cache: recompiling its functions for attnlab's cache
  took a first run 26 s more.

Quality is held: sklearn's ``trustworthiness`` (k = 10) of every panel stays within 0.01 of umap-learn's defaults on
the same points and seed (the benchmark reports both). Every fit is single-threaded and seeded: reproducible, and
the same with one thread or two.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

EPOCHS = 200  # a warm-started panel's epochs
# the middle panel's, from the spectral layout. umap-learn's default for small data is 500; 350 holds trustworthiness
# as well on the benchmark's 12 panels (worst -0.0042 against its defaults, -0.0051 with 500; 300 epochs with 120
# warm ones: -0.0084) and takes 1.1 s less out of a fresh process's grid
BASE_EPOCHS = 350


@contextmanager
def cached_numba():
    """numba compiles with its on-disk cache on (where no other cache directory is set) while umap-learn is imported
    and fitted, so its functions compile once per machine instead of once per process; they also release the GIL.
    Not thread-safe itself (it patches ``numba.njit`` and the warning filters): enter it once, around the threads."""
    import numba
    from numba.core import config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # pynndescent (imported by umap-learn; unused here: the neighbours are precomputed) compiles dozens of
        # functions as it is imported. Imported before the patch, they load from the library's own cache as it
        # ships them; under it, they were compiled again for the nogil cache: 26 s instead of 3.4 on a first run
        import pynndescent  # noqa: F401
    if not os.environ.get("NUMBA_CACHE_DIR"):
        root = os.environ.get("ATTNLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnlab")
        # its own folder: numba's cache index does not tell GIL-releasing builds from others
        config.CACHE_DIR = str(Path(root) / "numba-nogil")
    original = numba.njit

    def njit(*args, **kwargs):
        kwargs.setdefault("cache", True)
        kwargs.setdefault("nogil", True)  # array code only: two fits can then run in two threads at once
        return original(*args, **kwargs)

    numba.njit = njit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cache that cannot be written only costs time; umap's chatter
            yield
    finally:
        numba.njit = original


def warm() -> None:
    """Import umap-learn and load the compiled functions a grid's fits call (numba's on-disk cache), with a grid of
    two tiny panels through the same code: what the first real grid of a fresh process would otherwise pay (about
    3.5 s). The fit worker (:mod:`attnlab.geometry.fitworker`) does this while the parent loads the model."""
    points = np.random.default_rng(0).standard_normal((2, 64, 8))
    fit_panels(list(points), seed=0, n_neighbors=15, min_dist=0.1, n_epochs=11, base_epochs=11, threads=None)


def cosine_neighbours(points, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest neighbours of every point by cosine distance, the point itself first:
    ``(indices [n, k] int64, distances [n, k] float64)``, ascending. points ``[n, d]``; rows in chunks of ``chunk``
    (memory ``chunk x n``). The distances are umap-learn's cosine distance, 1 - cos, clipped to [0, 2]."""
    import torch

    points = torch.as_tensor(np.asarray(points, dtype=np.float64))
    unit = points / points.norm(dim=1, keepdim=True).clamp_min(1e-300)
    n = len(points)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float64)
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n))
        d = (1.0 - unit[rows] @ unit.T).clamp_(0.0, 2.0)
        d[torch.arange(len(rows)), rows] = 0.0
        # one more than needed, so that a tie at the k-th distance is broken by index below, not by topk's order
        near, part = torch.topk(d, min(k + 1, n), dim=1, largest=False, sorted=True)
        near, part = near.numpy(), part.numpy()
        order = np.lexsort((part, near), axis=1)[:, :k]  # by distance, ties by index: the same on every machine
        idx[s:s + len(rows)], dist[s:s + len(rows)] = (np.take_along_axis(part, order, 1),
                                                       np.take_along_axis(near, order, 1))
    return idx, dist


def _fit(points, *, seed: int, n_neighbors: int, min_dist: float, init, n_epochs: int) -> np.ndarray:
    """One UMAP fit of ``points [n, d]`` -> ``[n, 2]`` float32 (inside :func:`cached_numba`)."""
    import umap

    k = min(n_neighbors, len(points) - 1)
    knn = cosine_neighbours(points, k)  # exact, where umap-learn would sort every row of a distance matrix
    reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=k, min_dist=min_dist, random_state=seed,
                        n_epochs=n_epochs, init="spectral" if init is None else np.asarray(init, dtype=np.float64),
                        precomputed_knn=knn, force_approximation_algorithm=True)
    return reducer.fit_transform(points).astype(np.float32)


def _joint(queries, keys) -> np.ndarray:
    return np.concatenate([np.asarray(queries, dtype=np.float64), np.asarray(keys, dtype=np.float64)])


def joint_embedding(queries, keys, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1, init=None,
                    n_epochs: int = EPOCHS) -> np.ndarray:
    """UMAP (cosine distances) of the points ``[queries; keys]``: ``[n_q + n_k, 2]``, queries first.

    queries ``[n_q, d]``, keys ``[n_k, d]``, already scaled and translated (``scaling.transform_qk``: its centroids
    must come from every token, not just the plotted ones). ``init``: a previous layout ``[n_q + n_k, 2]`` to start
    from (default: umap's spectral initialisation). Seeded: UMAP runs single-threaded and is reproducible.
    Cosine distance sees direction from the origin, so both the scaling and the key translation move points.
    """
    with cached_numba():
        return _fit(_joint(queries, keys), seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, init=init,
                    n_epochs=n_epochs)


def panel_embeddings(panels, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int = EPOCHS,
                     base_epochs: int = BASE_EPOCHS, threads: int | None = None) -> list[np.ndarray]:
    """:func:`joint_embedding` of every panel ``[(queries, keys), ...]`` (ascending constants), aligned.

    The two middle panels (``len // 2 - 1`` and ``len // 2``) both start from umap-learn's spectral layout of the
    upper one and are fitted for ``base_epochs``; the panels on each side then start from their inner neighbour's
    layout, outwards, for ``n_epochs`` (every panel inherits a base's layout, so the bases get the full schedule).
    Starting both bases from one layout keeps the panels aligned with each other, and it splits the grid into two
    independent halves of equal length, fitted in two threads where there are two cores (the fits release the
    GIL): a grid of six costs one base fit and two warm ones in time, not one and three. Every fit is
    single-threaded and seeded, so the result does not depend on ``threads``.
    The fits run in the fit worker's process where one was started (:func:`attnlab.geometry.fitworker.start`,
    before the model loads: it has imported umap-learn meanwhile), else here; the layouts are the same.
    Returns ``[n_q + n_k, 2]`` per panel, in the panels' order."""
    from attnlab.geometry import fitworker

    points = [_joint(q, k) for q, k in panels]
    kwargs = dict(seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs, base_epochs=base_epochs,
                  threads=threads)
    layouts = fitworker.fit_remote(points, kwargs) if points else None
    return layouts if layouts is not None else fit_panels(points, **kwargs)


def fit_panels(points, *, seed: int, n_neighbors: int, min_dist: float, n_epochs: int, base_epochs: int,
               threads: int | None) -> list[np.ndarray]:
    """:func:`panel_embeddings` of the joint points ``[n_i, d]`` float64 of each panel, in this process."""
    from concurrent.futures import ThreadPoolExecutor

    out: list = [None] * len(points)
    if not points:
        return out
    mid = len(points) // 2
    fit = dict(seed=seed, n_neighbors=n_neighbors, min_dist=min_dist)

    def half(order):  # order[0] is a base, fitted from the shared start; each later panel from the one before
        previous = start
        for j, i in enumerate(order):
            previous = out[i] = _fit(points[i], init=previous, n_epochs=base_epochs if j == 0 else n_epochs, **fit)

    with cached_numba():
        # umap-learn's own spectral initialisation (noise and scaling included), without optimising it
        start = _fit(points[mid], init=None, n_epochs=0, **fit) if len(points) > 1 else None
        halves = [range(mid - 1, -1, -1), range(mid, len(points))]
        workers = threads if threads is not None else min(2, os.cpu_count() or 1)
        if workers > 1 and len(points) > 1:
            with ThreadPoolExecutor(2) as pool:
                for future in [pool.submit(half, side) for side in halves]:
                    future.result()
        else:
            for side in halves:
                half(side)
    return out


def subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``cap`` of ``n`` points, seeded and sorted (all of them when cap is None)."""
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
