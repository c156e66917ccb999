"""The mosaic's summary: each model's largest lift (attention minus the null) against its size."""

from __future__ import annotations

import numpy as np

from attnlab.figures.style import plt, save_or_return


def best_vs_parameters(points, path=None):
    """``points``: ``[(label, parameters, largest lift, causal)]``. Log-scaled parameter axis; masked LMs and
    causal models in two colours; 0 (no lift over the null) marked. Saves to ``path`` when given, else returns the Figure."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for causal, colour, name in ((False, "#1f77b4", "masked LM: [MASK] -> previous instance"),
                                 (True, "#d95f02", "causal LM: prefix matching")):
        chosen = [p for p in points if p[3] == causal and p[1] and np.isfinite(p[2])]
        if not chosen:
            continue
        ax.scatter([p[1] for p in chosen], [p[2] for p in chosen], s=46, color=colour, label=name, zorder=3)
        # labels of neighbouring points alternate above and below their point, so that they do not overprint
        for k, (label, params, score, _) in enumerate(sorted(chosen, key=lambda p: (p[1], p[2]))):
            ax.annotate(label, (params, score), textcoords="offset points", xytext=(5, 5 if k % 2 == 0 else -12),
                        fontsize=8)
    ax.set_xscale("log")
    low = min([0.0] + [p[2] for p in points if np.isfinite(p[2])])
    ax.set_ylim(low - 0.05, 1.05)
    ax.axhline(0, color="grey", lw=1, ls="--")
    ax.set_xlabel("parameters")
    ax.set_ylabel("largest lift: attention to the target minus the null")
    ax.set_title("Induction across models: the head with the largest lift in each")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return save_or_return(fig, path)
