"""Shared figure plumbing: atomic PNG saving.

No backend is chosen at import (a library must not override its user's): figures are drawn with pyplot and
saved to files. The command line selects the headless Agg backend (``MPLBACKEND``) before anything imports
pyplot; headless machines without a display fall back to Agg by themselves.
"""

from __future__ import annotations

from contextlib import contextmanager

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
    """The box (inches) that ``save``'s tight bounding box gives ``fig`` at ``dpi``, measured now (matplotlib's tight
    box padded by ``savefig.pad_inches``, rounded out to whole pixels). A figure saved again with the same artists
    in the same places (the next frame) can pass it as ``save(..., box=...)``, which draws it once."""
    from matplotlib.transforms import Bbox

    with _at_dpi(fig, dpi):
        _, (x0, y0, x1, y1) = _tight_pixels(fig, fig.canvas.get_renderer(), dpi)
    return Bbox.from_extents(x0 / dpi, y0 / dpi, x1 / dpi, y1 / dpi)


@contextmanager
def _at_dpi(fig, dpi: int):
    """``fig`` at ``dpi`` inside the block (as savefig sets it), its own dpi again after."""
    old = fig.dpi
    try:
        fig.dpi = dpi
        yield
    finally:
        fig.dpi = old


def _tight_pixels(fig, renderer, dpi: int) -> tuple[tuple, tuple]:
    """``fig``'s tight bounding box at ``dpi`` in pixels from the lower left, rounded out to whole ones (so that a
    crop is the figure shifted by whole pixels): ``((x0, y0, x1, y1) unpadded, (x0, y0, x1, y1) padded by
    savefig.pad_inches)``."""
    import math

    import matplotlib

    def pixels(box):
        return (math.floor(box.x0 * dpi + 1e-6), math.floor(box.y0 * dpi + 1e-6),
                math.ceil(box.x1 * dpi - 1e-6), math.ceil(box.y1 * dpi - 1e-6))

    inner = fig.get_tightbbox(renderer)
    return pixels(inner), pixels(inner.padded(matplotlib.rcParams["savefig.pad_inches"]))


def save(fig, path, dpi: int = 150, close: bool = True, box=None) -> None:
    """Write ``fig`` as a PNG atomically (tight bounding box, or ``box`` from :func:`tight_box`), recording its
    smallest text size in the PNG's metadata (:data:`MIN_TEXT_KEY`); ``close=False`` keeps it for the next
    frame. The tight box is rounded out to whole pixels, so that one draw can be cropped to it
    (:func:`tight_pixels`): matplotlib's own tight save draws the whole figure twice, once to measure the box."""
    import warnings

    import matplotlib.image

    metadata = {MIN_TEXT_KEY: f"{min_text_px(fig, dpi):.2f}"}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # vocabulary tokens in scripts the default font lacks are drawn as boxes; that is not worth a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        pixels = None
        if box is None and _croppable(fig):
            box, pixels = tight_pixels(fig, dpi)
        if pixels is None:  # the box reaches past the canvas (matplotlib draws it on a larger one), or not croppable
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight" if box is None else box, format="png", metadata=metadata)
        else:
            matplotlib.image.imsave(tmp, pixels, format="png", origin="upper", dpi=dpi, metadata=metadata)
    if close:
        plt.close(fig)


def _croppable(fig) -> bool:
    """Whether a draw of ``fig`` on its canvas is what savefig draws: Agg's canvas, no savefig colours or
    transparency set in rcParams."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rc = matplotlib.rcParams
    return (isinstance(fig.canvas, FigureCanvasAgg) and not rc["savefig.transparent"]
            and rc["savefig.facecolor"] == "auto" and rc["savefig.edgecolor"] == "auto")


def tight_pixels(fig, dpi: int = 150):
    """``(box, pixels)``: ``fig`` drawn once at ``dpi`` on its (Agg) canvas, its tight box (:func:`tight_box`, inches)
    and the canvas cropped to it, an ``(H, W, 4)`` uint8 array: the pixels ``fig.savefig(bbox_inches=box)`` writes.
    The padding is the figure's face colour where it reaches past the canvas. ``pixels`` is None where an artist
    itself reaches past the canvas: only a larger canvas holds it."""
    import numpy as np
    from matplotlib.colors import to_rgba
    from matplotlib.transforms import Bbox

    with _at_dpi(fig, dpi):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (a0, b0, a1, b1), (x0, y0, x1, y1) = _tight_pixels(fig, renderer, dpi)
        rgba = np.asarray(renderer.buffer_rgba())
    box = Bbox.from_extents(x0 / dpi, y0 / dpi, x1 / dpi, y1 / dpi)
    height, width = rgba.shape[:2]
    if a0 < 0 or b0 < 0 or a1 > width or b1 > height:
        return box, None
    # only the padding may reach past the canvas: there it is the figure's face, as savefig draws it
    out = np.empty((y1 - y0, x1 - x0, 4), np.uint8)
    out[:] = np.round(np.asarray(to_rgba(fig.get_facecolor())) * 255).astype(np.uint8)
    c0, d0, c1, d1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    # rows count from the top, display y from the bottom
    out[y1 - d1:y1 - d0, c0 - x0:c1 - x0] = rgba[height - d1:height - d0, c0:c1]
    return box, out


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
