"""Shared figure plumbing: a headless backend and atomic PNG saving."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are files for reports; never open a window

import matplotlib.pyplot as plt  # noqa: E402

from attnlab.core.outputs import atomic_path  # noqa: E402


def save(fig, path, dpi: int = 150) -> None:
    import warnings

    with atomic_path(path) as tmp, warnings.catch_warnings():
        # vocabulary tokens in scripts the default font lacks are drawn as boxes; that is not worth a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
