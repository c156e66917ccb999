"""Shared figure plumbing: atomic PNG saving.

No backend is chosen at import (a library must not override its user's): figures are drawn with pyplot and
saved to files. The command line selects the headless Agg backend (``MPLBACKEND``) before anything imports
pyplot; headless machines without a display fall back to Agg by themselves.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from attnlab.core.outputs import atomic_path


MIN_TEXT_KEY = "attnlab:min_text_px"  # PNG text chunk: the smallest text's height in the image, in pixels


def min_text_px(fig, dpi: int) -> float:
    """The smallest font size of any visible, non-empty text in ``fig``, in pixels of a PNG saved at ``dpi``.
    A page that shows the PNG at ``w`` of its ``W`` pixels shows that text at ``min_text_px * w / W`` px: the
    report's browser test checks that this is at least 9 px."""
    from matplotlib.text import Text

    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * dpi / 72 if sizes else float("nan")


def tight_box(fig, dpi: int = 150):
    """The box (inches) that ``save``'s tight bounding box gives ``fig`` at ``dpi``, measured now. A figure saved
    again with the same artists in the same places (the next frame) can pass it as ``save(..., box=...)``:
    matplotlib's tight save draws the whole figure once to measure this and again to render."""
    import matplotlib

    old = fig.dpi
    try:
        fig.dpi = dpi
        return fig.get_tightbbox(fig.canvas.get_renderer()).padded(matplotlib.rcParams["savefig.pad_inches"])
    finally:
        fig.dpi = old


def save(fig, path, dpi: int = 150, close: bool = True, box=None) -> None:
    """Write ``fig`` as a PNG atomically (tight bounding box, or ``box`` from :func:`tight_box`), recording its
    smallest text size in the PNG's metadata (:data:`MIN_TEXT_KEY`); ``close=False`` keeps it for the next
    frame."""
    import warnings

    with atomic_path(path) as tmp, warnings.catch_warnings():
        # vocabulary tokens in scripts the default font lacks are drawn as boxes; that is not worth a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight" if box is None else box, format="png",
                    metadata={MIN_TEXT_KEY: f"{min_text_px(fig, dpi):.2f}"})
    if close:
        plt.close(fig)


def save_or_return(fig, path):
    """A figure function's ending: ``fig`` itself when ``path`` is None (a notebook shows it), else None after
    :func:`save` wrote it there."""
    if path is None:
        return fig
    save(fig, path)
    return None


def centred_ticks(ax, layers: int, heads: int, *, depth: bool = False, most: int = 16) -> None:
    """Layer and head ticks at the centres of a ``pcolormesh``'s cells (not on their edges), at most ``most`` a side
    (every k-th when there are more). ``depth``: the y axis is relative depth 0..1 (``layers`` rows spanning it)."""
    import numpy as np

    def every(n):
        return max(1, -(-n // most))

    hs = np.arange(0, heads, every(heads))
    ax.set_xticks(hs + 0.5, [str(h) for h in hs])
    ls = np.arange(0, layers, every(layers))
    centres = (ls + 0.5) / layers if depth else ls + 0.5
    ax.set_yticks(centres, [str(layer) for layer in ls])
