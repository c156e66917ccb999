"""Layers x heads heatmaps in the paper's style (Blues, fixed 0-1 scale, layers as rows)."""

from __future__ import annotations

import numpy as np
import seaborn as sns

from attnlab.figures.style import plt, save


def head_heatmap(values, title: str, path, *, vmin=0.0, vmax=1.0, cmap="Blues", cbar_label=None,
                 center=None, norm=None, cbar_ticks=None, annot=False, nan_color=None, hatch=None,
                 hatch_label=None):
    """values: [layers, heads]. Size grows with the grid so a 24 x 16 map stays legible.

    ``annot`` writes each value in its cell (only for grids of at most 16 heads); ``nan_color`` fills
    missing cells; ``hatch`` ([layers, heads] bool) hatches cells (e.g. unstable estimates), explained by
    ``hatch_label`` under the map. Saves to ``path`` when given, else returns the Figure.
    """
    values = np.asarray(values, dtype=float)
    layers, heads = values.shape
    width = max(6.0, 0.45 * heads + 2.5)
    height = max(4.5, 0.38 * layers + 1.5)
    fig, ax = plt.subplots(figsize=(width, height))
    kwargs = dict(cmap=cmap, linewidths=0.5, linecolor="white", square=False, ax=ax,
                  cbar_kws={"label": cbar_label} if cbar_label else None)
    if annot and heads <= 16:
        kwargs.update(annot=True, fmt=".3g", annot_kws={"fontsize": 7})
    if nan_color:
        ax.set_facecolor(nan_color)
    if norm is not None:
        kwargs["norm"] = norm
    else:
        kwargs.update(vmin=vmin, vmax=vmax, center=center)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing map is drawn grey, not warned about
        sns.heatmap(values, **kwargs)
    if cbar_ticks is not None:
        cbar = ax.collections[0].colorbar
        cbar.set_ticks(cbar_ticks)
        cbar.set_ticklabels([f"{t:g}" for t in cbar_ticks])
        cbar.minorticks_off()
    ax.set_xlabel("Head", fontsize=13)
    ax.set_ylabel("Layer", fontsize=13)
    ax.set_title(title, fontsize=12)
    ax.set_xticks(np.arange(heads) + 0.5, [str(h) for h in range(heads)], rotation=0)
    ax.set_yticks(np.arange(layers) + 0.5, [str(layer) for layer in range(layers)], rotation=0)
    if hatch is not None:
        from matplotlib.patches import Rectangle

        for layer, head in zip(*np.nonzero(np.asarray(hatch))):
            ax.add_patch(Rectangle((head, layer), 1, 1, fill=False, hatch="///", edgecolor="#444444", lw=0))
        if hatch_label:
            ax.text(0, 1.0, hatch_label, transform=ax.transAxes, fontsize=8, va="bottom", ha="left",
                    color="#444444")
    if path is None:
        return fig
    save(fig, path)
    return None
