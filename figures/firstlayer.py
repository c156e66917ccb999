"""The first-layer analysis's figures, from its saved results: positional patterns as grids and against offset."""

from __future__ import annotations

import csv
import math

import numpy as np

from attnlab.figures.style import plt, save


def _grid_of(row: np.ndarray, width: int = 20) -> np.ndarray:
    """A destination's pattern over source positions, reshaped into rows of ``width`` (NaN-padded)."""
    rows = math.ceil(len(row) / width)
    out = np.full(rows * width, np.nan)
    out[: len(row)] = row
    return out.reshape(rows, width)


def plot(folder, meta: dict) -> dict:
    from attnlab.core.names import model_label

    z = np.load(folder / "positional_patterns.npz")
    pattern = z["pattern"]  # [H, N, N]
    h, n, _ = pattern.shape
    layer = meta["config"]["layer"]
    label = model_label(meta["config"]["model"])
    classes = meta["classes"]
    cols = min(4, h)
    rows = math.ceil(h / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows + 0.8), squeeze=False)
    dest = n - 1
    for head, ax in enumerate(axes.flat):
        if head >= h:
            ax.axis("off")
            continue
        grid = _grid_of(pattern[head, dest])
        im = ax.imshow(grid, cmap="Blues", vmin=0, aspect="equal")
        ax.set_title(f"L{layer}H{head}: {classes.get(f'L{layer}H{head}', '?')}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.75)
    fig.suptitle(f"{label}: positional pattern of each head at destination position {dest} ('{meta['dest_token']}' "
                 f"everywhere)\nsource positions in rows of 20 (top left = position 0); {meta['pattern_method']}",
                 fontsize=10)
    fig.tight_layout()
    save(fig, folder / "positional_patterns.png")

    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows + 0.8), squeeze=False, sharex=True)
    offsets = np.arange(-(n - 1), n)
    start = n // 4
    p = pattern.astype(np.float64)
    for head, ax in enumerate(axes.flat):
        if head >= h:
            ax.axis("off")
            continue
        prof = np.full(len(offsets), np.nan)
        i = np.arange(start, n)
        for k, d in enumerate(offsets):
            j = i + d
            ok = (j >= 0) & (j < n)
            if ok.any():
                prof[k] = p[head, i[ok], j[ok]].mean()
        ax.semilogy(offsets, np.clip(prof, 1e-12, None), lw=1)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_title(f"L{layer}H{head}: {classes.get(f'L{layer}H{head}', '?')}", fontsize=9)
        ax.set_xlabel("source - destination position", fontsize=8)
    fig.suptitle(f"{label}: mean positional pattern against relative offset (destinations {start}..{n - 1})",
                 fontsize=10)
    fig.tight_layout()
    save(fig, folder / "offsets.png")
    out = {"patterns": "positional_patterns.png", "offsets": "offsets.png"}
    if (folder / "normalisers.csv").exists():
        with open(folder / "normalisers.csv", newline="") as fh:
            rows_ = list(csv.DictReader(fh))
        fig, ax = plt.subplots(figsize=(6, 4.5))
        heads = sorted({int(r["head"]) for r in rows_})
        for head in heads:
            mine = [r for r in rows_ if int(r["head"]) == head and r["spread_log_z"] and r["predicted_spread"]]
            ax.scatter([float(r["predicted_spread"]) for r in mine], [float(r["spread_log_z"]) for r in mine], s=4,
                       label=f"H{head}")
        lim = ax.get_xlim()
        ax.plot(lim, lim, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("independent model: CV of the token factor / sqrt(effective tokens)")
        ax.set_ylabel("measured spread of log Z across texts")
        ax.set_title(f"{label}: softmax normalisers, measured vs the independent model", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        save(fig, folder / "normalisers.png")
        out["normalisers"] = "normalisers.png"
    return out
