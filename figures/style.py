"""Shared figure plumbing: atomic PNG saving.

No backend is chosen at import (a library must not override its user's): figures are drawn with pyplot and
saved to files. The command line selects the headless Agg backend (``MPLBACKEND``) before anything imports
pyplot; headless machines without a display fall back to Agg by themselves.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from attnlab.core.outputs import atomic_path


def save(fig, path, dpi: int = 150, close: bool = True) -> None:
    """Write ``fig`` as a PNG atomically (tight bounding box); ``close=False`` keeps it for the next frame."""
    import warnings

    with atomic_path(path) as tmp, warnings.catch_warnings():
        # vocabulary tokens in scripts the default font lacks are drawn as boxes; that is not worth a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    if close:
        plt.close(fig)
