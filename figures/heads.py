"""Head scores as small multiples, and the Olsson-style story figure (prefix matching vs copying, coloured
by what ablation costs)."""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib.colors import TwoSlopeNorm

from attnlab.figures.style import centred_ticks, plt, save_or_return

LABELS = {
    "ov_copying": "OV copying score", "prefix_matching": "prefix matching (minus chance)",
    "dla": "direct logit attribution", "ablation_copying_gain": "ablation: change in copying gain",
    "previous_token": "previous token (minus chance)",
    "induction_at_mask": "induction at [MASK]: attention to the previous instance (minus chance)",
}


def score_maps(scores: dict, title: str, path=None):
    """One layers x heads map per score, each on its own diverging scale centred on 0; hatched grey where a score is
    NaN (a layer that never sees the detector's template)."""
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
        mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-(extent or 1), vmax=extent or 1)
        if not np.isfinite(values).all():  # hatched grey, not white (= 0): a layer that never sees the template
            ax.set_facecolor("#d9d9d9")
            ax.patch.set_hatch("//")
            ax.patch.set_edgecolor("#bdbdbd")
        ax.set_ylim(layers, 0)
        # wrapped to the panel's width so that a long title never runs into its neighbour
        ax.set_title(textwrap.fill(LABELS.get(name, name.replace("_", " ")), 38), fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        centred_ticks(ax, layers, heads)
        ax.tick_params(labelsize=7)
        fig.colorbar(mesh, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_or_return(fig, path)


def story_figure(scores: dict, title: str, path=None):
    """Per head: induction at [MASK] (x) vs OV copying (y); colour = ablation delta of the copying gain (else
    DLA, else none). Induction heads in the sense of Olsson et al. sit top right, and ablating them costs the
    gain. The x score is read at the [MASK] only (``induction_at_mask``: attention to the token after the earlier
    instance of the preceding token, i.e. the induction map's "previous instance" target), minus chance."""
    x = np.asarray(scores["induction_at_mask"], dtype=float).ravel()
    y = np.asarray(scores["ov_copying"], dtype=float).ravel()
    layers, heads = np.asarray(scores["induction_at_mask"]).shape
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
    ax.set_xlabel("induction at [MASK]: attention to the previous instance of the masked token (minus chance)",
                  fontsize=8)
    ax.set_ylabel("OV copying score (+1: copies the attended token)")
    ax.set_title(title, fontsize=11)
    return save_or_return(fig, path)


def _read_scores(path) -> dict:
    """heads.csv -> {score name: [L, H] array}."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    layers = 1 + max(int(r["layer"]) for r in rows)
    heads = 1 + max(int(r["head"]) for r in rows)
    out: dict = {}
    for r in rows:
        value = float(r["value"]) if r["value"] else np.nan  # empty: the layer never sees the detector's template
        out.setdefault(r["score"], np.full((layers, heads), np.nan))[int(r["layer"]), int(r["head"])] = value
    return out


def plot(folder, meta: dict) -> dict:
    """heads.png and story.png from a heads run's saved heads.csv; paths.png from its paths.csv when it traced paths."""
    from attnlab.core.names import model_label

    scores = _read_scores(folder / "heads.csv")
    label = model_label(meta["config"]["model"])
    score_maps(scores, f"Head scores: {label}", folder / "heads.png")
    out = {"maps": "heads.png"}
    if "induction_at_mask" in scores and "ov_copying" in scores:
        story_figure(scores, f"{label}: does an induction-like head also copy, and is it used?", folder / "story.png")
        out["story"] = "story.png"
    if (folder / "paths.csv").is_file():
        paths_figure(folder / "paths.csv", f"{label}: which earlier heads feed each induction-like head",
                     folder / "paths.png")
        out["paths"] = "paths.png"
    return out


def paths_figure(csv_path, title: str, path=None):
    """From a heads run's ``paths.csv``: per receiver, the share of its attention to the target that zeroing each
    earlier head removes through its keys (K) and its queries (Q) (bars, with the bootstrap 95% CI and the rule's 25%
    line), the share of its layer's part that each head restores alone (diamonds), and the senders the rule names
    marked."""
    import csv

    from attnlab.circuits.paths import MIN_LOST, MIN_RESTORED

    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    receivers = list(dict.fromkeys(r["receiver"] for r in rows))
    fig, axes = plt.subplots(len(receivers), 1, squeeze=False,
                             figsize=(max(7.0, 0.22 * len(rows) / len(receivers) + 3) + 2.5, 3.6 * len(receivers)))
    for ax, receiver in zip(axes[:, 0], receivers):
        mine = [r for r in rows if r["receiver"] == receiver]
        senders = list(dict.fromkeys(r["sender"] for r in mine))
        x = np.arange(len(senders))
        top, bottom = 1.0, 0.0
        for offset, (kind, colour) in zip((-0.2, 0.2), (("K", "#1f77b4"), ("Q", "#ff7f0e"))):
            by = {r["sender"]: r for r in mine if r["path"] == kind}
            lost = np.array([float(by[s]["lost"]) for s in senders])
            lo = np.array([float(by[s]["ci_low"]) for s in senders])
            hi = np.array([float(by[s]["ci_high"]) for s in senders])
            ax.bar(x + offset, lost, 0.4, color=colour, label=f"{kind}: its {'keys' if kind == 'K' else 'queries'}",
                   yerr=np.nan_to_num([lost - lo, hi - lost]), capsize=2, error_kw={"lw": 0.8})
            restored = np.array([float(by[s]["restored"] or "nan") for s in senders])  # empty: the layer carries
            # too little of the path for a share of it
            drawn = np.clip(restored, -0.5, 1.5)
            if np.isfinite(restored).any():
                ax.plot(x + offset, drawn, "D", ms=4.5, mfc="white", mec=colour, mew=1.2,
                        label=f"{kind}: restored alone in its layer", ls="none")
            top = max(top, np.nanmax(hi), np.nanmax(np.r_[drawn, 0]))
            bottom = min(bottom, np.nanmin(lo), np.nanmin(np.r_[drawn, 0]))
            for i, s in enumerate(senders):
                if by[s]["named"] == "1":
                    ax.text(i + offset, np.nanmax([lost[i], hi[i], restored[i]]) + 0.03, "*", ha="center",
                            fontsize=12)
        ax.set_ylim(bottom - 0.08, top + 0.15)  # room for the stars above the bars
        ax.axhline(MIN_LOST, color="#888888", lw=0.8, ls="--")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, senders, rotation=90 if len(senders) > 16 else 0, fontsize=9)
        ax.set_ylabel("share of its attention\nto the target", fontsize=9.5)
        ax.set_title(f"into {receiver}: bars, removed when each earlier head is zeroed; diamonds, restored by it alone "
                     f"in its layer\n* = a feeder by the rule (removes >= {MIN_LOST:.0%} or restores >= "
                     f"{MIN_RESTORED:.0%}, CI above 0, no trial over half)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a star
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_or_return(fig, path)


def plot_ablation(folder, meta: dict) -> dict:
    """A scan's layers x heads map of each metric's delta, from its saved ablation.csv (none for a head set)."""
    import csv

    from attnlab.core.names import model_label
    from attnlab.figures.heatmap import head_heatmap

    cfg = meta["config"]
    if not cfg["scan"]:
        return {}
    with open(folder / "ablation.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    layers = 1 + max(int(r["layer"]) for r in rows)
    heads = 1 + max(int(r["head"]) for r in rows)
    out = {}
    for metric in dict.fromkeys(r["metric"] for r in rows):
        delta = np.full((layers, heads), np.nan)
        for r in rows:
            if r["metric"] == metric:
                delta[int(r["layer"]), int(r["head"])] = float(r["delta"])
        extent = float(np.nanmax(np.abs(delta))) or 1e-9
        name = f"ablation_{metric}.png"
        head_heatmap(delta, f"{model_label(cfg['model'])}: change in {metric.replace('_', ' ')} when each head is "
                     f"{'zeroed' if cfg['mode'] == 'zero' else 'mean-ablated'} alone\nrrt task, {cfg['trials']} trials "
                     "(red: the metric rises, blue: it falls)", folder / name, cmap="RdBu_r", vmin=-extent,
                     vmax=extent, cbar_label=f"delta {metric}", annot=True)
        out[metric] = name
    return out
