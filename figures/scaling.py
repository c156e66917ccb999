"""Figure 2 (optimal scaling constant per head) and Figures 3-4 (UMAP grids of queries and keys)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import LogNorm

from attnlab.figures.heatmap import head_heatmap
from attnlab.figures.style import plt, save

QUERY_COLOR = "#1b9e77"  # teal-green and orange: distinct, and readable by most colour-blind readers
KEY_COLOR = "#d95f02"


def optimum_heatmap(optimum, constants, title: str, path, *, stability=None, unstable_below: float = 0.5):
    """optimum ``[layers, heads]``: a diverging log-scale map centred on c = 1 (grey: no value); with
    ``stability`` ([layers, heads], share of resamples agreeing), cells below ``unstable_below`` are hatched."""
    constants = [float(c) for c in constants]
    extent = max(max(constants), 1 / min(constants), 1.0001)
    finite = np.asarray(optimum, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size:
        extent = max(extent, float(finite.max()), 1 / float(finite.min()))
    ticks = sorted(set(constants) | {1.0})
    hatch = None
    if stability is not None:
        stability = np.asarray(stability, dtype=float)
        hatch = np.isfinite(np.asarray(optimum, dtype=float)) & ~(stability >= unstable_below)
    return head_heatmap(optimum, title, path, cmap="RdBu_r", norm=LogNorm(vmin=1 / extent, vmax=extent),
                        cbar_label="optimal c (queries x c, keys / c)", cbar_ticks=ticks, annot=True,
                        nan_color="#d0d0d0", hatch=hatch)


def umap_grid(panels, optimal: float | None, title: str, path) -> None:
    """panels: list of ``(c, embedding [n_q + n_k, 2], n_q)``; the panel whose c equals ``optimal`` is framed."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (c, emb, n_q) in zip(axes.flat, panels):
        ax.scatter(emb[n_q:, 0], emb[n_q:, 1], s=4, c=KEY_COLOR, alpha=0.6, linewidths=0, label="keys")
        ax.scatter(emb[:n_q, 0], emb[:n_q, 1], s=4, c=QUERY_COLOR, alpha=0.6, linewidths=0, label="queries")
        ax.set_xticks([])
        ax.set_yticks([])
        best = optimal is not None and math.isclose(c, optimal, rel_tol=1e-9)
        ax.set_title(f"c = {c:g}" + ("  (optimal)" if best else ""), fontsize=12,
                     fontweight="bold" if best else "normal")
        for spine in ax.spines.values():
            spine.set_linewidth(3.5 if best else 0.8)
            spine.set_edgecolor("black" if best else "#999999")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="lower center", ncol=2, markerscale=4, frameon=False)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save(fig, path)
