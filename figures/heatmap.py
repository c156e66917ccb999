"""Layers x heads heatmaps in the paper's style (Blues, fixed 0-1 scale, layers as rows)."""

from __future__ import annotations

import textwrap

import numpy as np

from attnlab.figures.style import centred_ticks, plt, save_or_return


def heatmap(ax, values, *, cmap="Blues", vmin=None, vmax=None, norm=None, cbar_label=None, annot=False,
            fmt=".3g", annot_size=7.0):
    """A layers x heads map ``values [layers, heads]`` drawn as seaborn's ``heatmap`` draws it (cells with white
    0.5-pt edges, missing values left out so the axes' face shows, the first row on top, a colorbar without an
    outline, no spines; ``annot`` writes each value, dark on light cells and white on dark ones), with matplotlib
    alone. Returns the mesh.

    Why not seaborn itself: importing it costs about 3 s on this CPU (pandas, scipy.stats), and its heatmap draws the
    whole figure once more to check whether tick labels overlap; both figures override its ticks anyway."""
    data = np.ma.masked_invalid(np.asarray(values, dtype=float))
    for spine in ax.spines.values():
        spine.set_visible(False)
    scale = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
    mesh = ax.pcolormesh(data, cmap=cmap, linewidths=0.5, edgecolor="white", **scale)
    ax.set(xlim=(0, data.shape[1]), ylim=(0, data.shape[0]))
    ax.invert_yaxis()
    bar = ax.figure.colorbar(mesh, ax=ax, **({"label": cbar_label} if cbar_label else {}))
    bar.outline.set_linewidth(0)
    if annot:
        mesh.update_scalarmappable()
        rgb = mesh.get_facecolors()[:, :3]
        lum = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4) @ [0.2126, 0.7152, 0.0722]
        missing = np.ma.getmaskarray(data)
        for (r, c), light in zip(np.ndindex(*data.shape), lum > 0.408):  # the mesh has a colour for every cell
            if not missing[r, c]:
                ax.text(c + 0.5, r + 0.5, format(float(data[r, c]), fmt), ha="center", va="center",
                        color=".15" if light else "w", fontsize=annot_size)
    return mesh


def head_heatmap(values, title: str, path, *, vmin=0.0, vmax=1.0, cmap="Blues", cbar_label=None,
                 norm=None, cbar_ticks=None, annot=False, nan_color=None, hatch=None, hatch_label=None):
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
    if nan_color:
        ax.set_facecolor(nan_color)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing map is drawn grey, not warned about
        mesh = heatmap(ax, values, cmap=cmap, cbar_label=cbar_label, annot=annot and heads <= 16,
                       **({"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}))
    if cbar_ticks is not None:
        cbar = mesh.colorbar
        cbar.set_ticks(cbar_ticks)
        cbar.set_ticklabels([f"{t:g}" for t in cbar_ticks])
        cbar.minorticks_off()
    ax.set_xlabel("Head", fontsize=13)
    ax.set_ylabel("Layer", fontsize=13)
    ax.set_title(title, fontsize=12)
    ax.set_xticks(np.arange(heads) + 0.5, [str(h) for h in range(heads)], rotation=0)
    ax.set_yticks(np.arange(layers) + 0.5, [str(layer) for layer in range(layers)], rotation=0, va="center")
    if hatch is not None:
        from matplotlib.patches import Rectangle

        for layer, head in zip(*np.nonzero(np.asarray(hatch))):
            ax.add_patch(Rectangle((head, layer), 1, 1, fill=False, hatch="///", edgecolor="#444444", lw=0))
        if hatch_label:
            ax.text(0, 1.0, hatch_label, transform=ax.transAxes, fontsize=8, va="bottom", ha="left",
                    color="#444444")
    return save_or_return(fig, path)


def induction_map(mean, sem, title: str, path=None, *, outline=(), finding: str = "",
                  cbar_label: str = "mean attention"):
    """The paper-style map (Blues, fixed 0-1) beside an auto-scaled copy, both ``[layers, heads]``.

    The fixed scale keeps maps comparable with the paper and with each other; weak maps (values of a few
    hundredths) are blank on it, so the companion panel spans 0..max. Only the heads in ``outline`` (those a
    verdict named) are outlined and annotated with mean +- SEM; ``finding`` says what the verdict found. Saves
    to ``path`` when given, else returns the Figure.
    """
    import math
    import warnings

    from matplotlib.patches import Rectangle

    mean = np.asarray(mean, dtype=float)
    sem = np.asarray(sem, dtype=float)
    layers, heads = mean.shape
    width = max(5.0, 0.42 * heads + 2.2)
    height = max(4.2, 0.36 * layers + 1.6)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, height))
    # the report shows the figure ~1,070 px wide: 9.5 pt at 150 dpi stays >= 9 px on screen up to 14.6 inches;
    # wider figures (many heads) get larger type to match
    k = max(1.0, 2 * width / 14.6)
    small = 9.5 * k
    finite = mean[np.isfinite(mean)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1e-12
    lo_text = "0" if lo < 1e-4 * abs(hi) else f"{lo:.3g}"  # not a denormal's digits
    for ax, vmin, vmax, label in ((axes[0], 0.0, 1.0, "fixed scale 0-1 (as in the paper)"),
                                  (axes[1], lo, hi, f"auto-scaled {lo_text} .. {hi:.3g}")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mesh = heatmap(ax, mean, vmin=vmin, vmax=vmax, cbar_label=cbar_label)
        for layer, head in outline:
            value, err = mean[layer, head], sem[layer, head]
            text = f"{value:.2g}" + (f"\n±{err:.1g}" if math.isfinite(err) else "")
            shade = (value - vmin) / (vmax - vmin) if vmax > vmin else 0
            ax.text(head + 0.5, layer + 0.5, text, ha="center", va="center", fontsize=small,
                    color="white" if shade > 0.6 else "black", fontweight="bold")
            ax.add_patch(Rectangle((head, layer), 1, 1, fill=False, edgecolor="#d95f02", lw=1.6))
        ax.set_xlabel("Head", fontsize=12 * k)
        ax.set_ylabel("Layer", fontsize=12 * k)
        ax.set_title(label, fontsize=11 * k)
        ax.set_xticks(np.arange(heads) + 0.5, [str(h) for h in range(heads)], rotation=0, fontsize=small)
        ax.set_yticks(np.arange(layers) + 0.5, [str(layer) for layer in range(layers)], rotation=0, fontsize=small,
                      va="center")
        mesh.colorbar.ax.tick_params(labelsize=small)
        mesh.colorbar.ax.yaxis.label.set_size(11 * k)
    note = f"\noutlined: {finding}" if outline else (f"\n{finding}" if finding else "")
    fig.suptitle(title + note, fontsize=11 * k)
    fig.tight_layout()
    return save_or_return(fig, path)


def small_multiples(panels, title: str, path=None, *, cbar_label: str = "mean attention", ncols: int = 5,
                    subtitles=None, outlines=None, outline_note: str = ""):
    """One panel per model (``panels``: ``[(label, values [layers, heads])]``), layers drawn at their relative
    depth (0 = first layer, 1 = last) so models of different depth line up, one colour scale shared by all
    (0 to the largest value of any panel; values below 0 are drawn as 0), ``ncols`` panels a row.
    ``subtitles``: extra lines per panel; ``outlines``: per panel the ``(layer, head)`` cells to outline (default:
    each panel's largest value), explained by ``outline_note``. Saves to ``path`` when given, else returns the
    Figure."""
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    vmax = max((float(np.nanmax(v)) for _, v in panels if np.isfinite(v).any()), default=1.0)
    norm = Normalize(0.0, vmax if vmax > 0 else 1.0, clip=True)
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1.2, 4.4 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    mesh = None
    for i, (ax, (label, values)) in enumerate(zip(flat, panels)):
        values = np.asarray(values, dtype=float)
        layers, heads = values.shape
        mesh = ax.pcolormesh(np.arange(heads + 1), np.linspace(0, 1, layers + 1), values, cmap="Blues", norm=norm,
                             edgecolors="white", linewidth=0.3 if heads * layers <= 1200 else 0)
        ax.set_ylim(1, 0)
        extra = f"\n{subtitles[i]}" if subtitles else ""
        ax.set_title(f"{textwrap.fill(label, 30)}\n{layers} layers x {heads} heads{extra}", fontsize=9)
        ax.set_xlabel("head")
        centred_ticks(ax, layers, heads, depth=True, most=8)
        if outlines is not None:
            cells = outlines[i]
        else:
            cells = [np.unravel_index(np.nanargmax(values), values.shape)] if np.isfinite(values).any() else []
        for layer, head in cells:
            ax.add_patch(Rectangle((head, layer / layers), 1, 1 / layers, fill=False, edgecolor="#d95f02", lw=1.5))
        if i % ncols == 0:
            ax.set_ylabel("layer (drawn at relative depth)")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.subplots_adjust(top=1 - 0.24 / nrows, hspace=0.7, wspace=0.35, right=0.86)
    fig.colorbar(mesh, ax=flat, label=cbar_label, shrink=0.9)
    note = outline_note or "outlined: each model's strongest head"
    fig.suptitle(title + f"\n{note}; one colour scale for all", fontsize=11, y=0.995)
    return save_or_return(fig, path)
