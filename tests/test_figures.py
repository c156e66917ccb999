"""Figures at the pixel level: what a reader sees on the fixed and auto-scaled panels, the ICL histogram's marks."""

import numpy as np


def _pixel(fig, ax, layer, head, dx=0.15):
    """RGB of a cell near its left edge (clear of the annotation text), in display coordinates."""
    rgba = np.asarray(fig.canvas.buffer_rgba())
    x, y = ax.transData.transform((head + dx, layer + 0.5))
    return rgba[int(rgba.shape[0] - y), int(x), :3].astype(int)


def test_planted_map_is_visible_on_both_panels_and_weak_maps_on_the_companion():
    """Image-level checks of the induction figure: a planted head is dark on the fixed 0-1 panel; a weak map
    (values of a few thousandths) is blank there but shows its strongest head on the auto-scaled panel."""
    from attnlab.figures.heatmap import induction_map

    planted = np.full((3, 4), 0.01)
    planted[1, 2] = 0.95
    fig = induction_map(planted, np.full((3, 4), 0.01), "planted")
    fig.canvas.draw()
    fixed, auto = [ax for ax in fig.axes if ax.get_xlabel() == "Head"]
    assert _pixel(fig, fixed, 1, 2).sum() < 250 and _pixel(fig, fixed, 0, 0).sum() > 700  # dark vs near white
    weak = np.full((3, 4), 0.002)
    weak[2, 3] = 0.006
    fig = induction_map(weak, np.full((3, 4), np.nan), "weak", outline=[(2, 3)])
    fig.canvas.draw()
    fixed, auto = [ax for ax in fig.axes if ax.get_xlabel() == "Head"]
    assert _pixel(fig, fixed, 2, 3).sum() > 700  # invisible on the paper's scale...
    assert _pixel(fig, auto, 2, 3).sum() < 250 and _pixel(fig, auto, 0, 0).sum() > 700  # ...clear on the companion
    texts = [t.get_text() for t in fixed.texts]
    assert "0.006" in texts  # the named heads annotated (no SEM when unknown)
    fig = induction_map(weak, np.full((3, 4), np.nan), "weak", finding="no head passes the verdict")
    assert not fig.axes[0].texts and not fig.axes[0].patches  # nothing named: nothing outlined
    assert "no head passes the verdict" in fig._suptitle.get_text()


def test_icl_histogram_has_integer_counts_ci_lines_and_the_paper_mean():
    from attnlab.figures.histogram import icl_histogram

    fig = icl_histogram(np.array([0.1, 0.2, 0.25, 0.4, 0.3]), 0.25, (0.15, 0.35), "t", None, paper_mean=0.23)
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    assert all(float(t).is_integer() for t in ticks)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "paper's mean 0.23" in labels and any(lab.startswith("95% CI") for lab in labels)
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 2  # the CI as two lines, not a band
    from matplotlib.patches import Polygon

    assert not any(isinstance(p, Polygon) for p in ax.patches)


def test_induction_maps_stay_legible_at_the_reports_width(tmp_path):
    """The report shows a map about 1,070 px wide: its smallest text (the named heads' annotations, the ticks) must
    be at least 9 px there, for 12 heads and for 32 (a wider figure gets larger type)."""
    from PIL import Image

    from attnlab.figures.heatmap import induction_map
    from attnlab.figures.style import MIN_TEXT_KEY

    for layers, heads in ((12, 12), (24, 32)):
        mean = np.random.default_rng(0).uniform(0, 0.5, (layers, heads))
        path = tmp_path / f"map{heads}.png"
        induction_map(mean, mean / 10, "planted", path, outline=[(1, 2), (3, 4)], finding="two heads")
        image = Image.open(path)
        smallest = float(image.info[MIN_TEXT_KEY]) * min(1.0, 1070 / image.size[0])
        assert smallest >= 9, (heads, smallest)


def test_a_tight_box_measured_once_saves_the_next_frame_as_the_tight_save_does(tmp_path):
    """The attention grids save every layer's frame with the box measured on the first (one draw instead of two):
    the PNG must be the tight save's, pixel for pixel."""
    from PIL import Image

    from attnlab.figures.style import plt, save, tight_box

    fig, axes = plt.subplots(2, 2, figsize=(5, 4))
    for i, ax in enumerate(axes.flat):
        ax.imshow(np.random.default_rng(i).random((6, 6)))
        ax.set_xticks(range(6), [f"token{k}" for k in range(6)], rotation=90)
        ax.set_title(f"L0H{i}")
    fig.suptitle("a grid whose labels reach past the axes")
    save(fig, tmp_path / "first.png", close=False)
    box = tight_box(fig)
    for i, ax in enumerate(axes.flat):  # the next frame: other images and titles, the same artists
        ax.images[0].set_data(np.random.default_rng(10 + i).random((6, 6)))
        ax.set_title(f"L1H{i}")
    save(fig, tmp_path / "tight.png", close=False)
    save(fig, tmp_path / "boxed.png", box=box)
    tight, boxed = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("tight", "boxed"))
    assert tight.shape == boxed.shape and (tight == boxed).all()


def test_the_heatmap_draws_what_seaborns_heatmap_draws_pixel_for_pixel():
    """``figures.heatmap.heatmap`` replaces seaborn's (3 s of imports, one extra full draw per map): for every option
    the figures use - fixed and automatic limits, a norm, missing cells on a coloured face, the
    values written in the cells, a colorbar label - the canvas equals seaborn's, pixel for pixel."""
    import warnings

    import pytest

    sns = pytest.importorskip("seaborn")
    from matplotlib.colors import LogNorm

    from attnlab.figures.heatmap import heatmap
    from attnlab.figures.style import plt

    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 7))
    holes = values.copy()
    holes[1, 2] = holes[4, 0] = np.nan
    cases = [
        (values, dict(vmin=0.0, vmax=1.0)),
        (values, dict(vmin=None, vmax=None)),
        (holes, dict(vmin=-1.0, vmax=2.0)),
        (np.abs(values) + 0.01, dict(norm=LogNorm(0.01, 3.0))),
        (holes, dict(vmin=None, vmax=None, annot=True)),
        (values, dict(vmin=-2.0, vmax=2.0, annot=True, cbar_label="delta")),
    ]

    def canvas(draw):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.set_facecolor("#dddddd")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            draw(ax)
        ax.set_xticks(np.arange(7) + 0.5, [str(h) for h in range(7)], rotation=0)
        ax.set_yticks(np.arange(5) + 0.5, [str(h) for h in range(5)], rotation=0, va="center")
        fig.canvas.draw()
        out = np.asarray(fig.canvas.buffer_rgba()).copy()
        plt.close(fig)
        return out

    for data, opts in cases:
        ours = dict(opts)
        theirs = {k: v for k, v in opts.items() if k not in ("cbar_label", "annot")}
        if opts.get("annot"):
            theirs.update(annot=True, fmt=".3g", annot_kws={"fontsize": 7})
        if opts.get("cbar_label"):
            theirs["cbar_kws"] = {"label": opts["cbar_label"]}
        expected = canvas(lambda ax: sns.heatmap(data, cmap="Blues", linewidths=0.5, linecolor="white", ax=ax,
                                                 **theirs))
        got = canvas(lambda ax: heatmap(ax, data, cmap="Blues", **ours))
        assert got.shape == expected.shape and np.array_equal(got, expected), opts


def test_a_tight_save_is_one_draw_cropped_and_equals_savefig_with_the_same_box(tmp_path):
    """``save`` draws a figure once and crops the canvas to its tight box (matplotlib's tight save draws it twice). For
    each path - a crop inside the canvas, padding past the canvas's edge filled with the figure's face, and a title
    past the edge (drawn again on a larger canvas) - the PNG equals ``savefig(bbox_inches=tight_box(fig))`` pixel
    for pixel."""
    from unittest.mock import patch

    from matplotlib.figure import Figure
    from PIL import Image

    from attnlab.figures.heatmap import induction_map
    from attnlab.figures.style import plt, save, tight_box, tight_pixels

    def inside():  # a layers x heads map: colorbar, annotations, tight layout
        mean = np.random.default_rng(0).uniform(0, 0.5, (6, 8))
        return induction_map(mean, mean / 10, "planted", None, outline=[(1, 2)], finding="one head")

    def padding_past_the_edge():
        fig = plt.figure(figsize=(3, 2), facecolor="#ffe4b5")
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(np.random.default_rng(1).random((4, 6)), aspect="auto")
        ax.set_axis_off()
        return fig

    def title_past_the_edge():
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.imshow(np.random.default_rng(2).random((5, 5)))
        fig.text(0.5, 1.04, "a title above the canvas", ha="center")
        return fig

    for make, path in ((inside, "crop"), (padding_past_the_edge, "pad"), (title_past_the_edge, "larger canvas")):
        fig = make()
        box, pixels = tight_pixels(fig)
        assert (pixels is None) == (path == "larger canvas"), path
        if path == "pad":
            assert pixels.shape[1] > 3 * 150 and (pixels[0, 0] == (255, 228, 181, 255)).all()
        assert np.allclose(box.extents, tight_box(fig).extents)
        fig.savefig(tmp_path / f"{path}-savefig.png", dpi=150, bbox_inches=box)
        with patch.object(Figure, "draw", autospec=True, side_effect=Figure.draw) as draws:
            save(fig, tmp_path / f"{path}.png")
        assert draws.call_count == (1 if pixels is not None else 2), path
        ours, theirs = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in (path, f"{path}-savefig"))
        assert ours.shape == theirs.shape and (ours == theirs).all(), path
