"""Figures: PNG output and robustness to user label text."""

from __future__ import annotations

import numpy as np
import pytest

from scae.plots import Panel, label_colors, loss_curves, png_bytes, scatter_panels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_scatter_and_loss_figures_render_png():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 10)
    fig = scatter_panels([Panel("one", rng.normal(size=(30, 2)), "x", "y"), Panel("two", rng.normal(size=(30, 2)))],
                         labels, "title")
    assert len(fig.axes) == 2
    assert png_bytes(fig)[:8] == PNG_MAGIC
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "test_loss": 1.2 / (e + 1)} for e in range(4)]
    fig = loss_curves({"run": history}, ["train_loss", "test_loss"], "loss")
    assert len(fig.axes) == 2
    assert png_bytes(fig)[:8] == PNG_MAGIC


@pytest.mark.parametrize("names", [
    ["naive thymus-derived CD4-positive, alpha-beta T cell", "B cell"],  # a Cell Ontology name
    ["W" * 60, "x"],
    [f"type {i} $x$" for i in range(25)],  # two legend columns
    ["0", "1"],
])
def test_legend_fits_beside_the_panels(names):
    """The figure widens to its legend, which neither leaves the figure nor covers a panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rng = np.random.default_rng(0)
    labels = np.array(names)[rng.integers(0, len(names), 200)]
    fig = scatter_panels([Panel("a", rng.normal(size=(200, 2))), Panel("b", rng.normal(size=(200, 2)))], labels, "t")
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    figure = fig.bbox
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 - 5
    assert legend.x0 > max(ax.get_window_extent(renderer).x1 for ax in fig.axes)
    assert fig.get_size_inches()[0] < 2 * 4.6 + 0.6 + legend.width / fig.dpi + 1


@pytest.mark.parametrize("n", [3, 10, 15, 30])
def test_label_colors_distinct(n):
    colors = label_colors([f"c{i}" for i in range(n)])
    assert len(colors) == n
    assert len(set(colors.values())) == n


def test_labels_with_dollar_signs_do_not_break_figures():
    rng = np.random.default_rng(1)
    labels = np.array(["$\\x{$"] * 10 + ["T cells"] * 10)
    fig = scatter_panels([Panel("p", rng.normal(size=(20, 2)))], labels, "title")
    assert png_bytes(fig)[:8] == PNG_MAGIC


def test_labels_with_characters_the_font_lacks_draw_without_warnings():
    import warnings

    rng = np.random.default_rng(2)
    labels = np.array(["T cells \U0001F9EC"] * 10 + ["B cells \u2603\U0001F52C"] * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned once per missing glyph
        fig = scatter_panels([Panel("p", rng.normal(size=(20, 2)))], labels, "title \U0001F9EC")
        assert png_bytes(fig)[:8] == PNG_MAGIC


@pytest.mark.parametrize("epochs", [1, 3])
def test_loss_curves_have_whole_number_epoch_ticks(epochs):
    history = [{"epoch": e, "test_mse": 2.0 / (e + 1)} for e in range(epochs + 1)]
    fig = loss_curves({"a": history, "b": history}, ["test_mse"], "loss")  # ticks read before rendering
    (ax,) = fig.axes
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [float(e) for e in range(epochs + 1)]
    assert ax.xaxis.get_major_formatter().format_ticks(ticks) == [str(e) for e in range(epochs + 1)]


def test_scatter_panels_have_no_tick_marks_like_scanpy_embeddings():
    """Embedding coordinates (t-SNE, PCA, latent) are drawn without ticks, as scanpy draws them:
    their values mean nothing on their own, and tick labels were half the drawing time."""
    rng = np.random.default_rng(0)
    fig = scatter_panels([Panel("a", rng.normal(size=(20, 2)), "tSNE1", "tSNE2")] * 2, np.array(["x", "y"] * 10), "t")
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("tSNE1", "tSNE2")
