"""Matplotlib figures of the study (object API only: no pyplot state, no display needed)."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


@dataclass(frozen=True)
class Panel:
    """One scatter panel: 2-D coordinates with a title and axis names."""

    title: str
    coords: np.ndarray
    xlabel: str = ""
    ylabel: str = ""


def label_colors(classes: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per class (tab10 / tab20, then evenly spaced hues)."""
    n = len(classes)
    if n <= 10:
        cmap, values = colormaps["tab10"], range(n)
        return {c: cmap(v) for c, v in zip(classes, values)}
    if n <= 20:
        cmap = colormaps["tab20"]
        return {c: cmap(i) for i, c in enumerate(classes)}
    cmap = colormaps["turbo"]
    return {c: cmap(i / max(1, n - 1)) for i, c in enumerate(classes)}


def scatter_panels(panels: Sequence[Panel], labels: np.ndarray, title: str) -> Figure:
    """Side-by-side scatter plots of the same cells, coloured by their known label."""
    labels = np.asarray(labels)
    classes = list(np.unique(labels))
    colors = label_colors(classes)
    layout = _PanelLayout(len(panels), width_in=3.9, height_in=3.7, gap_in=0.65)
    fig, axes = layout.figure()
    size = float(np.clip(30_000 / max(1, labels.size), 0.5, 12))
    order = np.random.default_rng(0).permutation(labels.size)  # no class painted last on top
    for ax, panel in zip(axes, panels):
        xy = np.asarray(panel.coords)[order]
        point_colors = [colors[c] for c in labels[order]]
        ax.scatter(xy[:, 0], xy[:, 1], c=point_colors, s=size, linewidths=0, rasterized=True)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [  # "$" would start matplotlib mathtext in a user's label
        axes[0].scatter([], [], color=colors[c], s=25, label=str(c).replace("$", r"\$")) for c in classes
    ]
    legend = fig.legend(handles=handles, loc="center left", fontsize=8, frameon=False, title="label",
                        ncols=1 if len(classes) <= 20 else 2)
    # the figure widens to the legend's measured width (one text layout, not every text's)
    with _missing_glyphs_quiet():
        legend_in = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer()).width / fig.dpi
    layout.right_in = legend_in + 0.35
    layout.place(fig, axes)
    legend.set_bbox_to_anchor((1 - (legend_in + 0.2) / fig.get_size_inches()[0], 0.5))
    fig.suptitle(title, fontsize=11)
    return fig


@dataclass
class _PanelLayout:
    """``n`` axes in a row, each ``width_in`` × ``height_in`` inches, on fixed margins (inches).

    A fixed layout instead of matplotlib's constrained one, which measured every text's extent
    and took half the drawing time of the study's figures.
    """

    n: int
    width_in: float
    height_in: float
    gap_in: float
    left_in: float = 0.6
    right_in: float = 0.2
    bottom_in: float = 0.5
    top_in: float = 0.65

    def figure(self) -> tuple[Figure, list]:
        fig = Figure()
        axes = [fig.add_axes((0, 0, 1, 1)) for _ in range(self.n)]
        self.place(fig, axes)
        return fig, axes

    def place(self, fig: Figure, axes: list) -> None:
        """Size ``fig`` and position ``axes`` for the current margins."""
        width = self.left_in + self.n * self.width_in + (self.n - 1) * self.gap_in + self.right_in
        height = self.bottom_in + self.height_in + self.top_in
        fig.set_size_inches(width, height)
        for i, ax in enumerate(axes):
            left = self.left_in + i * (self.width_in + self.gap_in)
            ax.set_position((left / width, self.bottom_in / height, self.width_in / width, self.height_in / height))


def loss_curves(histories: dict[str, list[dict]], keys: Sequence[str], title: str) -> Figure:
    """One panel per history key (e.g. ``train_loss``, ``test_loss``), one line per run.

    The y axis is logarithmic when a panel's values span more than a factor of 20; the epoch
    axis has whole-number ticks only.
    """
    fig, axes = _PanelLayout(len(keys), width_in=4.2, height_in=3.0, gap_in=1.1, left_in=0.95).figure()
    for ax, key in zip(axes, keys):
        for name, history in histories.items():
            epochs = [row["epoch"] for row in history if key in row]
            values = [row[key] for row in history if key in row]
            ax.plot(epochs, values, marker="o", markersize=2.5, linewidth=1.3, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(key.replace("_", " "), fontsize=10)
        values = [row[key] for h in histories.values() for row in h if key in row]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


def figure_png(kind: str, *args) -> bytes:
    """Draw and render one figure: ``kind`` ``"scatter"`` takes :func:`scatter_panels`'s
    arguments, ``"loss"`` :func:`loss_curves`'s (plain data, so a worker process can draw it)."""
    draw = {"scatter": scatter_panels, "loss": loss_curves}[kind]
    return png_bytes(draw(*args))


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG (zlib level 1: 7% larger files than the default level 6, a
    quarter less time to write)."""
    buffer = io.BytesIO()
    with _missing_glyphs_quiet():
        fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


@contextlib.contextmanager
def _missing_glyphs_quiet() -> Iterator[None]:
    """A character the font lacks (an emoji in a label) is drawn as a box, without matplotlib's
    warning for each one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        yield


def benchmark_bars(rows: Sequence[dict], scores: Sequence[tuple[str, str]], title: str) -> Figure:
    """Grouped bars, one group per dataset and one bar per method, mean ± sd over seeds.

    ``rows`` are :func:`scae.benchmark.summarize` records; ``scores`` the (key, axis label)
    pairs drawn, one panel each.
    """
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = label_colors(methods)
    by_key = {(r["dataset"], r["method"]): r for r in rows}
    fig = Figure(figsize=(max(6.0, 1.2 * len(datasets) * max(1, len(methods)) / 3 + 2), 3.4 * len(scores)),
                 layout="constrained")
    axes = fig.subplots(len(scores), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(methods))
    for ax, (key, label) in zip(axes, scores):
        for j, name in enumerate(methods):
            xs, ys, sds = [], [], []
            for i, data_name in enumerate(datasets):
                row = by_key.get((data_name, name))
                if row is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(row[key])
                    sds.append(row[f"{key}_sd"])
            ax.bar(xs, ys, width, yerr=sds, color=colors[name], label=name.replace("$", r"\$"), capsize=2)
        ax.set_xticks(range(len(datasets)), [d.replace("$", r"\$") for d in datasets], fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8, frameon=False, ncols=min(len(methods), 6), loc="lower left", bbox_to_anchor=(0, 1.02))
    fig.suptitle(title, fontsize=11)
    return fig
