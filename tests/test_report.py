"""The HTML report: escaping of user text, the summary, train-only labels, skipped questions."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

import scae
from scae.embeddings import TSNEConfig
from scae.plots import loss_curves
from scae.report import _q1_summary, _Race, build_report, figure_plan, summary_lines
from scae.results import DEFAULT_RUNS, StudyConfig

SCRIPT = "<script>alert(1)</script>"
QUOTED = 'a & b "c"'
BOLD = "T <b>cells</b>"
NAME = f"{SCRIPT} data & {QUOTED}"
# autoescaping (markupsafe) writes &, <, >, " and ' as these entities
SCRIPT_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
QUOTED_ESCAPED = "a &amp; b &#34;c&#34;"
BOLD_ESCAPED = "T &lt;b&gt;cells&lt;/b&gt;"
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "b", "code", "section",
    "ul", "li", "div", "table", "thead", "tbody", "tr", "th", "td", "figure", "img", "figcaption",
}
FAST_TSNE = TSNEConfig(early_exaggeration_iter=30, n_iter=30)


def study(runs=DEFAULT_RUNS):
    """A 1-epoch study of 300 cells × 40 genes whose labels and name are hostile HTML."""
    ds = scae.simulate_dataset(300, 40, 3, 0)
    hostile = {"pop0": SCRIPT, "pop1": QUOTED, "pop2": BOLD}
    data = scae.make_dataset(ds.X, [hostile[label] for label in ds.labels], name=NAME)
    config = StudyConfig(epochs=1, progress=False, max_embed_cells=300, kmeans_seeds=1, tsne=FAST_TSNE,
                         hidden=(16,), runs=runs)
    return scae.run_study(data, None, config)


@pytest.fixture(scope="module")
def result():
    return study()


@pytest.fixture(scope="module")
def metrics(result) -> dict:
    return result.metrics()


@pytest.fixture(scope="module")
def images(result) -> dict[str, bytes]:
    """A stand-in PNG for every figure the report embeds (its bytes name the figure)."""
    return {stem: f"png of {stem}".encode() for stem in figure_plan(result)}


@pytest.fixture(scope="module")
def page(result, metrics, images) -> str:
    return build_report(result, metrics, images)


@pytest.fixture(scope="module")
def page_without_ae2() -> str:
    result = study(tuple(spec for spec in DEFAULT_RUNS if spec.name != "ae2"))
    return build_report(result, result.metrics(), {})


class TagCollector(HTMLParser):
    """The names of every start tag of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)


def tags_of(page: str) -> set[str]:
    parser = TagCollector()
    parser.feed(page)
    return parser.tags


def summary_items(page: str) -> list[str]:
    """The summary's lines as text (tags removed, entities kept)."""
    match = re.search(r'<section class="summary">(.*?)</section>', page, re.DOTALL)
    assert match, "the page has no summary"
    return [re.sub(r"<[^>]+>", "", item).strip() for item in re.findall(r"<li>(.*?)</li>", match.group(1), re.DOTALL)]


# ---------------------------------------------------------------- escaping
def test_hostile_labels_and_name_are_escaped_never_markup(page):
    assert "<script" not in page.lower()
    assert QUOTED not in page and "<b>cells</b>" not in page
    assert tags_of(page) <= PAGE_TAGS  # no tag the page itself does not write
    labels_line = f"labels: {SCRIPT_ESCAPED}: "
    assert labels_line in page and f"{QUOTED_ESCAPED}: " in page and f"{BOLD_ESCAPED}: " in page
    name = f"{SCRIPT_ESCAPED} data &amp; {QUOTED_ESCAPED}"
    assert f"<title>scae study: {name}</title>" in page
    assert f"data: <b>{name}</b>" in page


def test_figures_are_embedded_inline(page, images):
    import base64

    assert page.count("<img ") == len(images)
    for stem, data in images.items():
        assert f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"' in page
        assert f"figures/{stem}.png" in page


def test_page_opens_with_the_summary(page):
    body = page[page.index("<body>"):]
    assert body.index('<section class="summary">') < body.index("<p>") < body.index("<h2>Q1 ")


# ---------------------------------------------------------------- summary
def test_summary_has_one_line_per_question_with_its_numbers(page, metrics):
    items = summary_items(page)
    assert [item.split(" — ")[0] for item in items] == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    q1, q2, q3, q4, q5 = items
    runs, reps = metrics["runs"], metrics["representations"]

    assert "ae10" in q1 and "ae50" in q1
    assert "95% of" in q1 and f"by epoch {runs['ae10']['convergence_epoch']}" in q1
    assert f"by epoch {runs['ae50']['convergence_epoch']}" in q1

    mse_runs = sorted(["ae10", "ae50", "ae2"], key=lambda n: runs[n]["errors"]["test"]["mse"])
    assert q2.startswith(f"Q2 — {mse_runs[0]} reconstructs best")
    for name in mse_runs:
        assert f"{runs[name]['errors']['test']['mse']:.4g}" in q2
    pca = metrics["pca_baselines"][f"pca{runs[mse_runs[0]]['latent_dim']}"]["test"]["mse"]
    assert f"components: {pca:.4g}" in q2

    rec, orig = reps["ae10_reconstruction"]["ari"], reps["original"]["ari"]
    assert f"k-means ARI {rec:.3f} on the reconstruction vs {orig:.3f} on the original" in q3
    assert ("survive" in q3) == (orig - rec <= 0.05)

    acc, pcs = reps["ae2_latent"]["linear_accuracy"], reps["original_pca2"]["linear_accuracy"]
    assert f"is {acc:.3f} (chance {1 / 3:.3f}; in the first two PCs {pcs:.3f})" in q4

    for kind in ("latent", "reconstruction"):
        a, b = reps[f"ae10_nonzero_{kind}"]["ari"], reps[f"ae10_{kind}"]["ari"]
        assert f"{a:.3f} vs {b:.3f} ({kind})" in q5
    nonzero = [runs[n]["errors"]["test"]["nonzero_mse"] for n in ("ae10_nonzero", "ae10")]
    assert f"test nonzero MSE {nonzero[0]:.4g} vs {nonzero[1]:.4g}" in q5


def test_summary_repeats_the_sections_answers(page, result):
    """Each summary line's answer is the one its section's findings give."""
    lines = {line.question: line for line in summary_lines(result)}
    reps = result.representations
    q3_finding = ("The clusters survive reconstruction" if reps["original"]["ari"] - reps["ae10_reconstruction"]["ari"] <= 0.05
                  else "The reconstruction loses cluster structure")
    assert q3_finding in page
    assert ("survive" in lines["Q3"].answer) == q3_finding.startswith("The clusters survive")
    verdict = lines["Q4"].answer.removeprefix("the 2-D latent of ae2 is ")
    assert f"The 2-D latent space is {verdict}: " in page


def test_question_without_its_run_is_skipped(page_without_ae2):
    items = summary_items(page_without_ae2)
    assert [item.split(" — ")[0] for item in items] == ["Q1", "Q2", "Q3", "Q5"]
    assert "<h2>Q4 " not in page_without_ae2 and "2-D latent" not in page_without_ae2
    for q in ("Q1", "Q2", "Q3", "Q5"):
        assert f"<h2>{q} " in page_without_ae2
    assert "ae2" not in page_without_ae2
    assert "<img " not in page_without_ae2  # no images given: no figure is shown


def stand_in(name: str, convergence: int | None, near_best: int):
    return SimpleNamespace(spec=SimpleNamespace(name=name), convergence_epoch=convergence, near_best_epoch=near_best)


@pytest.mark.parametrize(("epochs", "line"), [
    ((7, 9, 12, 20), "ae10 converges faster: 95% of its test-loss drop by epoch 7 vs 12 for ae50"),
    ((12, 9, 7, 20), "ae50 converges faster: 95% of its test-loss drop by epoch 7 vs 12 for ae10"),
    ((2, 9, 2, 5), ("ae50 converges faster: both make 95% of their test-loss drop by epoch 2, but ae50 is "
                   "within 1% of its lowest test loss by epoch 5 vs 9 for ae10")),
    ((2, 5, 2, 5), ("ae10 and ae50 converge equally fast: both make 95% of their test-loss drop by epoch 2 and "
                   "are within 1% of their lowest test loss by epoch 5")),
    ((None, 1, 3, 4), ("ae50 converges, ae10 does not: ae10's test loss never went below its starting value; "
                      "ae50 made 95% of its test-loss drop by epoch 3")),
    ((None, 1, None, 1), "neither converges: the test loss of neither ae10 nor ae50 went below its starting value"),
])
def test_q1_summary_names_the_faster_run_and_its_epochs(epochs, line):
    a, b = stand_in("ae10", epochs[0], epochs[1]), stand_in("ae50", epochs[2], epochs[3])
    summary = _q1_summary(_Race.of(a, b, "convergence_epoch"), _Race.of(a, b, "near_best_epoch"))
    assert f"{summary.answer}: {summary.evidence}" == line


# ---------------------------------------------------------------- train-only labels
def test_train_only_labels_are_named_with_their_cell_counts(result, metrics, images):
    with_rare = {**metrics, "split": {**metrics["split"], "train_only_labels": {SCRIPT: 1, QUOTED: 2}}}
    page = build_report(result, with_rare, images)
    line = (f"Labels with too few cells for a test share are in the training cells only (none of their cells "
            f"is a test cell): {SCRIPT_ESCAPED} (1 cell), {QUOTED_ESCAPED} (2 cells).")
    assert line in page
    assert page.index("<p>Split: ") < page.index(line) < page.index("<h2>Q1 ")
    assert "<script" not in page.lower()


@pytest.mark.parametrize("value", [None, {}])
def test_no_train_only_line_without_such_labels(result, metrics, images, value):
    split = {**metrics["split"], "train_only_labels": value} if value is not None else metrics["split"]
    page = build_report(result, {**metrics, "split": split}, images)
    assert "too few cells for a test share" not in page


# ---------------------------------------------------------------- figures
def test_one_epoch_loss_figures_have_integer_epoch_ticks(result):
    specs = [spec for spec in figure_plan(result).values() if spec["kind"] == "loss"]
    assert {row["epoch"] for row in result.runs["ae10"].model.history_} == {0, 1}
    assert len(specs) == 2
    for spec in specs:
        fig = loss_curves(spec["histories"], spec["keys"], spec["title"])  # inspected before any rendering
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks == [0.0, 1.0]
            labels = ax.xaxis.get_major_formatter().format_ticks(ticks)
            assert labels == ["0", "1"]
            assert np.all(np.mod(ax.get_xticks(), 1) == 0)
