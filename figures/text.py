"""Figures of the experiments on a researcher's own text, from their saved results: a grid of every head's map per
layer with the tokens as ticks, the interactive token page, and the lens's layers x positions picture and KL."""

from __future__ import annotations

import csv
import math
import warnings
from contextlib import contextmanager

import numpy as np

from attnlab.figures.style import plt, save, tight_box


REPORT_WIDTH_IN = 14.6  # inches at 150 dpi that the report shows at ~1,070 px: 9.5 pt stays >= 9 px on screen
TICK_PT = 9.5


@contextmanager
def _token_text():
    """Tokens in scripts the default font lacks are drawn as boxes; that is not worth a warning per glyph."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield


def _ticks(ax, tokens, every: int, *, x: bool = True, y: bool = True) -> None:
    """Token ticks; labelled only where asked (the outer panels of a grid: every panel shares the tokens)."""
    idx = np.arange(0, len(tokens), every)
    labels = [tokens[i] for i in idx]
    ax.set_xticks(idx, labels if x else [], rotation=90, fontsize=TICK_PT)
    ax.set_yticks(idx, labels if y else [], fontsize=TICK_PT)


def plot_attention(folder, meta: dict) -> dict:
    """attention_L<l>.png (every head's map, tokens as ticks) per layer, and attention.html."""
    with _token_text():
        return _plot_attention(folder, meta)


def _plot_attention(folder, meta: dict) -> dict:
    from attnlab.core.names import model_label
    from attnlab.core.outputs import write_text
    from attnlab.experiments.view import text_attention_page

    z = np.load(folder / "attention.npz")
    att, tokens = z["attention"], [str(t) for t in z["tokens"].tolist()]
    layers, heads, s, _ = att.shape
    cols = min(4, heads)
    rows = math.ceil(heads / cols)
    label = model_label(meta["config"]["model"])
    out = {}
    # at most REPORT_WIDTH_IN wide, so that the report (about 1,070 px) shows its TICK_PT type at >= 9 px; as many
    # token ticks as fit at that size
    size = max(2.5, min(REPORT_WIDTH_IN / cols, 0.12 * s + 1.5))
    every = max(1, math.ceil(s / max(1, int(size * 72 / (TICK_PT * 1.5)))))
    height = size * rows + 0.6
    # one figure for every layer: its axes, ticks and labels are built once, and each layer only swaps the images
    # and titles (building them was most of the time); a fixed layout, as tight_layout costs a full draw
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, height), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.04, top=1 - 0.6 / height, wspace=0.08, hspace=0.18)
    images = []
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        images.append(ax.imshow(att[0, h], cmap="Blues", vmin=0, vmax=1))
        row, col = divmod(h, cols)
        _ticks(ax, tokens, every, x=row == rows - 1 or h + cols >= heads, y=col == 0)
    box = None
    for layer in range(layers):
        for h, (ax, image) in enumerate(zip(axes.flat, images)):
            image.set_data(att[layer, h])
            image.set_clim(0, max(float(att[layer, h].max()), 1e-9))
            ax.set_title(f"L{layer}H{h}", fontsize=TICK_PT)
        fig.suptitle(f"{label}: layer {layer}, attention from each token (rows) to each token (columns)",
                     fontsize=TICK_PT + 1.5)
        name = f"attention_L{layer}.png"
        save(fig, folder / name, close=layer == layers - 1, box=box)
        if box is None and layer < layers - 1:  # the next layers' figures differ only in images and digits
            box = tight_box(fig)
        out[f"L{layer}"] = name
    write_text(folder / "attention.html", text_attention_page(folder, meta))
    out["page"] = "attention.html"
    return out


def plot_lens(folder, meta: dict) -> dict:
    """lens.png: for each lens, layers x positions coloured by the top-1 probability, the top-1 token written in each
    cell (up to 40 positions); kl.png: the mean KL to the final distribution by layer, logit vs tuned lens."""
    with _token_text():
        return _plot_lens(folder, meta)


def _plot_lens(folder, meta: dict) -> dict:
    from attnlab.core.names import model_label

    with open(folder / "lens.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    label = model_label(meta["config"]["model"])
    lenses = list(dict.fromkeys(r["lens"] for r in rows))
    layers = 1 + max(int(r["layer"]) for r in rows)
    queries = list(dict.fromkeys((r["position"], r["token"]) for r in rows if r["lens"] == lenses[0]))[:40]
    index = {q: i for i, q in enumerate(queries)}
    fig, axes = plt.subplots(len(lenses), 1, figsize=(max(6, 0.55 * len(queries) + 2), (0.45 * layers + 1.6) * len(lenses)),
                             squeeze=False)
    for ax, lens in zip(axes[:, 0], lenses):
        prob = np.full((layers, len(queries)), np.nan)
        text = [["" for _ in queries] for _ in range(layers)]
        for r in rows:
            q = index.get((r["position"], r["token"]))
            if r["lens"] != lens or q is None:
                continue
            top = r["top_tokens"].split(" ")[0] if r["top_tokens"] else ""
            prob[int(r["layer"]), q] = float(r["top_probs"].split(" ")[0]) if r["top_probs"] else np.nan
            text[int(r["layer"])][q] = top
        ax.imshow(prob, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
        for layer in range(layers):
            for q in range(len(queries)):
                ax.text(q, layer, text[layer][q][:8], ha="center", va="center", fontsize=6,
                        color="white" if prob[layer, q] > 0.6 else "black")
        ax.set_xticks(range(len(queries)), [t or p for p, t in queries], rotation=60, fontsize=7, ha="right")
        ax.set_ylabel("layer (0: embeddings)")
        ax.set_title(f"{lens} lens: top-1 token and its probability", fontsize=10)
    fig.suptitle(f"{label}: what each layer would predict ({meta.get('target', '')})", fontsize=11)
    fig.tight_layout()
    save(fig, folder / "lens.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for lens, values in meta["kl_by_layer"].items():
        ax.plot(range(len(values)), values, marker="o", label=f"{lens} lens")
    ax.set_xlabel("layer (0: embeddings)")
    ax.set_ylabel("KL(final || lens), nats (mean over positions)")
    ax.set_title(f"{label}: how far each layer is from the final distribution", fontsize=10)
    ax.legend()
    fig.tight_layout()
    save(fig, folder / "kl.png")
    return {"lens": "lens.png", "kl": "kl.png"}
