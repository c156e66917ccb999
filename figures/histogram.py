"""Histogram of per-trial ICL score differences (the paper's Figure 5), with mean and CI marked."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from attnlab.figures.style import plt, save_or_return


def icl_histogram(diffs, mean: float, ci: tuple[float, float], title: str, path, paper_mean: float | None = None):
    """Counts of trials (integer ticks); mean as a solid line, the 95% CI as two dashed lines (not a band
    over the bars), the paper's reported mean dotted when given. Saves to ``path``, or returns the Figure."""
    diffs = np.asarray(diffs, dtype=float)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.hist(diffs, bins="auto" if len(diffs) > 20 else 10, color="#9ecae1", edgecolor="#3182bd")
    ax.axvline(mean, color="black", lw=2, label=f"mean {mean:.3f}")
    if np.isfinite(np.asarray(ci, dtype=float)).all():
        ax.axvline(ci[0], color="#d95f02", lw=1.5, ls="--", label=f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]")
        ax.axvline(ci[1], color="#d95f02", lw=1.5, ls="--")
    if paper_mean is not None:
        ax.axvline(paper_mean, color="#7570b3", lw=1.5, ls=":", label=f"paper's mean {paper_mean:g}")
    ax.axvline(0, color="grey", lw=1, ls="-", alpha=0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("loss(50-token context) - loss(500-token context)")
    ax.set_ylabel("trials")
    ax.set_title(title)
    ax.legend()
    return save_or_return(fig, path)


def plot_icl(folder, meta: dict) -> dict:
    """The ICL run's histogram, from its saved icl.csv and summary: ``{"histogram": file name}``."""
    import csv

    from attnlab.core.names import model_label
    from attnlab.experiments.paper import REPORTED_ICL_MEAN
    from attnlab.icl.experiment import LONG, SHORT

    with open(folder / "icl.csv", newline="", encoding="utf-8") as fh:
        diffs = [float(row["difference"]) for row in csv.DictReader(fh)]
    s, cfg = meta["summary"], meta["config"]
    ci = tuple(float("nan") if v is None else v for v in s["ci95"])
    icl_histogram(diffs, s["mean"], ci, f"Loss({SHORT} tokens) - Loss({LONG} tokens), {len(diffs)} trials\n"
                  f"{model_label(cfg['model'])}, protocol {cfg['protocol']}", folder / "icl_histogram.png",
                  paper_mean=REPORTED_ICL_MEAN if cfg["protocol"] == "paper" else None)
    return {"histogram": "icl_histogram.png"}
