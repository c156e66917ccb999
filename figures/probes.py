"""The probe figure: accuracy (with its CI), control accuracy and selectivity against layer; the majority baseline."""

from __future__ import annotations

import numpy as np

from attnlab.figures.style import plt, save


def plot(folder, meta: dict) -> dict:
    from attnlab.core.names import model_label

    rows = meta["layers"]
    layer = np.array([r["layer"] for r in rows])
    acc = np.array([r["accuracy"] for r in rows])
    lo = np.array([r["ci_low"] if r["ci_low"] is not None else np.nan for r in rows])
    hi = np.array([r["ci_high"] if r["ci_high"] is not None else np.nan for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.fill_between(layer, lo, hi, color="#3182bd", alpha=0.2, label="95% CI (bootstrap over dev sentences)")
    ax.plot(layer, acc, marker="o", color="#3182bd", label="accuracy")
    ax.plot(layer, [r["control_accuracy"] for r in rows], marker="s", color="#999999", label="control task accuracy")
    ax.plot(layer, [r["selectivity"] for r in rows], marker="^", color="#d95f02", label="selectivity")
    ax.axhline(rows[0]["majority"], color="black", lw=1, ls=":", label="majority class")
    ax.set_xlabel("layer (0: embeddings)")
    ax.set_ylabel("share of dev words")
    ax.set_ylim(min(0, min(r["selectivity"] for r in rows)) - 0.05, 1.05)
    ax.set_xticks(layer)
    ax.set_title(f"{model_label(meta['config']['model'])}: probing '{meta['task']}' ({meta['config']['probe']} probe)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save(fig, folder / "probe.png")
    return {"probe": "probe.png"}
