"""Histogram of per-trial ICL score differences (the paper's Figure 5), with mean and CI marked."""

from __future__ import annotations

import numpy as np

from attnlab.figures.style import plt, save


def icl_histogram(diffs, mean: float, ci: tuple[float, float], title: str, path) -> None:
    diffs = np.asarray(diffs, dtype=float)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.hist(diffs, bins="auto" if len(diffs) > 20 else 10, color="#1f77b4")
    ax.axvline(mean, color="black", lw=2, label=f"mean {mean:.3f}")
    if np.isfinite(ci).all():
        ax.axvspan(ci[0], ci[1], color="orange", alpha=0.3, label=f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]")
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_xlabel("loss(50-token context) - loss(500-token context)")
    ax.set_ylabel("trials")
    ax.set_title(title)
    ax.legend()
    save(fig, path)
