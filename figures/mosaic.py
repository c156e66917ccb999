"""The mosaic's summary: each model's strongest induction head against its size."""

from __future__ import annotations

import numpy as np

from attnlab.figures.style import plt, save


def best_vs_parameters(points, path=None):
    """``points``: ``[(label, parameters, best score, causal)]``. Log-scaled parameter axis; masked LMs and
    causal models in two colours. Saves to ``path`` when given, else returns the Figure."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for causal, colour, name in ((False, "#1f77b4", "masked LM: [MASK] -> previous instance"),
                                 (True, "#d95f02", "causal LM: prefix matching")):
        chosen = [p for p in points if p[3] == causal and p[1] and np.isfinite(p[2])]
        if not chosen:
            continue
        ax.scatter([p[1] for p in chosen], [p[2] for p in chosen], s=46, color=colour, label=name, zorder=3)
        for label, params, score, _ in chosen:
            ax.annotate(label, (params, score), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("parameters")
    ax.set_ylabel("strongest head's mean attention to its target")
    ax.set_title("Induction across models: the strongest head of each")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    if path is None:
        return fig
    save(fig, path)
    return None
