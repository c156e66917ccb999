"""Pattern/message projections as a picture: per word and kind, heads x top tokens, coloured by similarity."""

from __future__ import annotations

import warnings

import numpy as np

from attnlab.figures.style import plt, save_or_return


def patterns_figure(rows, words, kinds, title: str, path=None, *, heads_shown: int = 10, tokens_shown: int = 5):
    """rows: (input, layer, head, kind, rank, token, similarity). One panel per (word, kind): the
    ``heads_shown`` heads whose best token is most similar, their ``tokens_shown`` best tokens as cell text,
    cosine similarity as colour. Saves to ``path`` when given, else returns the Figure."""
    table: dict = {}
    for word, layer, head, kind, rank, token, sim in rows:
        if rank <= tokens_shown:
            table.setdefault((word, kind), {}).setdefault((layer, head), []).append((rank, token, sim))
    fig, axes = plt.subplots(len(words), len(kinds), figsize=(6.5 * len(kinds), 0.42 * heads_shown * len(words) + 1.5),
                             squeeze=False)
    for i, word in enumerate(words):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            cells = table.get((word, kind), {})
            best = sorted(cells.items(), key=lambda kv: -max(s for _, _, s in kv[1]))[:heads_shown]
            sims = np.full((len(best), tokens_shown), np.nan)
            for r, (_, entries) in enumerate(best):
                for rank, token, sim in sorted(entries):
                    sims[r, rank - 1] = sim
                    ax.text(rank - 1 + 0.5, r + 0.5, token, ha="center", va="center", fontsize=8)
            ax.pcolormesh(sims if len(best) else np.zeros((1, tokens_shown)), cmap="Greens", vmin=0, vmax=1)
            ax.set_ylim(max(len(best), 1), 0)
            ax.set_yticks(np.arange(len(best)) + 0.5, [f"L{layer}H{head}" for (layer, head), _ in best], fontsize=8)
            ax.set_xticks(np.arange(tokens_shown) + 0.5, [f"#{k + 1}" for k in range(tokens_shown)], fontsize=8)
            what = "looks for (pattern)" if kind == "pattern" else "writes (message)"
            ax.set_title(f"'{word}': what the head {what}", fontsize=10)
    fig.suptitle(title + "\ncell colour: cosine similarity with the vocabulary token", fontsize=11)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # tokens in other scripts
        fig.tight_layout()
    return save_or_return(fig, path)


def plot(folder, meta: dict) -> dict:
    """patterns.png from a patterns run's saved patterns.csv: ``{"patterns": file name}``."""
    import csv

    from attnlab.core.names import model_label

    with open(folder / "patterns.csv", newline="", encoding="utf-8") as fh:
        rows = [(r["input"], int(r["layer"]), int(r["head"]), r["kind"], int(r["rank"]), r["token"],
                 float(r["similarity"])) for r in csv.DictReader(fh)]
    cfg = meta["config"]
    patterns_figure(rows, list(cfg["words"]), list(cfg["kinds"]),
                    f"Pattern and message projections: {model_label(cfg['model'])}", folder / "patterns.png")
    return {"patterns": "patterns.png"}
