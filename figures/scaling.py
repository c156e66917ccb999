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


def _grid(rows, layers: int, heads: int, column: int) -> np.ndarray:
    out = np.full((layers, heads), np.nan)
    for row in rows:
        if row[column] is not None:
            out[row[0], row[1]] = row[column]
    return out


def plot_scaling(folder, meta: dict) -> dict:
    """Figure 2 from a scaling run's saved optima: one map per metric, ``{metric: file name}``."""
    from attnlab.core.names import model_label
    from attnlab.geometry.experiment import METRIC_TITLES

    cfg = meta["config"]
    layers, heads = meta["layers"], meta["heads"]
    out = {}
    for metric, rows in meta["optima"].items():
        best = _grid(rows, layers, heads, 2)
        stab = _grid(rows, layers, heads, 3) if cfg["bootstrap"] else None
        note = (f"\nhatched: unstable (< {meta['unstable_below']:.0%} of {cfg['bootstrap']} sentence resamples "
                "agree); grey: none" if cfg["bootstrap"] else "")
        name = f"figure2_{metric}.png"
        optimum_heatmap(best, cfg["constants"],
                        f"Optimal scaling constant: {METRIC_TITLES[metric]} (protocol {cfg['protocol']})\n"
                        f"{model_label(cfg['model'])}, {cfg['sentences']} sentences, {meta['n_pairs']} query-key "
                        f"pairs per head{meta.get('qk_short', '')}{note}", folder / name, stability=stab,
                        unstable_below=meta["unstable_below"])
        out[metric] = name
    return out


def plot_umap(folder, meta: dict) -> dict:
    """Figures 3-4 from a UMAP run's saved embeddings: ``{"umap": file name}``."""
    from attnlab.core.names import model_label
    from attnlab.geometry.experiment import METRIC_TITLES

    cfg = meta["config"]
    name = f"umap_L{cfg['layer']}H{cfg['head']}"
    z = np.load(folder / f"{name}.npz")
    n_q = int(z["n_queries"])
    panels = [(float(c), z[f"c_{float(c):g}"], n_q) for c in z["constants"]]
    optimum = meta.get("optimum")
    translate = cfg["translate_keys"] and cfg["protocol"] == "text"
    opt_text = f"{optimum:g}" if optimum is not None else "none"
    umap_grid(panels, optimum,
              f"{model_label(cfg['model'])} layer {cfg['layer']} head {cfg['head']}: queries and keys, joint UMAP "
              f"(cosine)\nqueries x c, keys / c{' + t' if translate else ''}; optimal c by "
              f"{METRIC_TITLES[cfg['metric']]} (protocol {cfg['protocol']}) = {opt_text}{meta.get('qk_short', '')}",
              folder / f"{name}.png")
    return {"umap": f"{name}.png"}
