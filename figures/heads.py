"""Head scores as small multiples, and the Olsson-style story figure (prefix matching vs copying, coloured
by what ablation costs)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import TwoSlopeNorm

from attnlab.figures.style import plt, save

LABELS = {
    "ov_copying": "OV copying score", "induction": "prefix matching (corrected)", "dla": "direct logit attribution",
    "ablation_copying_gain": "ablation: change in copying gain", "previous_token": "previous token (corrected)",
    "masked_induction": "induction at a [MASK]: after the earlier instance of the previous token (corrected)",
}


def score_maps(scores: dict, title: str, path=None):
    """One layers x heads map per score, each on its own diverging scale centred on 0."""
    names = list(scores)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    layers, heads = next(iter(scores.values())).shape
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, (0.22 * layers + 1.4) * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        values = np.asarray(scores[name], dtype=float)
        extent = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        mesh = ax.pcolormesh(values, cmap="RdBu_r", vmin=-(extent or 1), vmax=extent or 1)
        ax.set_ylim(layers, 0)
        ax.set_title(LABELS.get(name, name.replace("_", " ")), fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(mesh, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if path is None:
        return fig
    save(fig, path)
    return None


def story_figure(scores: dict, title: str, path=None):
    """Per head: prefix matching (x) vs OV copying (y); colour = ablation delta of the copying gain (else DLA,
    else none). Induction heads in the sense of Olsson et al. sit top right, and ablating them costs the gain.
    Prefix matching is read at a [MASK]'s level (``masked_induction``: the token after the earlier instance of
    the preceding token), the form it takes in a masked LM."""
    x = np.asarray(scores["masked_induction"], dtype=float).ravel()
    y = np.asarray(scores["ov_copying"], dtype=float).ravel()
    layers, heads = np.asarray(scores["masked_induction"]).shape
    colour_name = next((n for n in ("ablation_copying_gain", "dla") if n in scores), None)
    fig, ax = plt.subplots(figsize=(7.5, 5.8))
    if colour_name:
        c = np.asarray(scores[colour_name], dtype=float).ravel()
        extent = float(np.nanmax(np.abs(c))) or 1e-9
        sc = ax.scatter(x, y, c=c, cmap="RdBu_r", norm=TwoSlopeNorm(0, -extent, extent), s=36, edgecolors="#333333",
                        linewidths=0.4)
        fig.colorbar(sc, ax=ax, label=LABELS[colour_name])
    else:
        ax.scatter(x, y, c="#999999", s=36)
        ax.text(0.02, 0.02, "no masked-LM head: no ablation or DLA to colour by", transform=ax.transAxes, fontsize=8)
    for i in np.argsort(np.nan_to_num(x, nan=-np.inf))[::-1][:5]:  # name the strongest prefix matchers
        ax.annotate(f"L{i // heads}H{i % heads}", (x[i], y[i]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("prefix matching: attention to the token after the earlier instance of the previous token (minus chance)",
                  fontsize=8)
    ax.set_ylabel("OV copying score (+1: copies the attended token)")
    ax.set_title(title, fontsize=11)
    if path is None:
        return fig
    save(fig, path)
    return None
