"""The HTML report: escaping of user text, the summary, train-only labels, skipped questions, the
"Beyond the assignment" section (recommended model, denoising) and 15-NN accuracy."""

from __future__ import annotations

import copy
import html
import re
from dataclasses import replace
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

import scae
from scae.embeddings import TSNEConfig
from scae.plots import loss_curves
from scae.report import (
    _model_description,
    _q1_summary,
    _q3_knn_disagreement,
    _q5_knn_disagreements,
    _Race,
    _section_beyond,
    build_report,
    figure_plan,
    summary_lines,
)
from scae.results import DEFAULT_RUNS, STUDY_RUNS, StudyConfig

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


def study(runs=STUDY_RUNS, counts=True):
    """A 1-epoch study of 300 cells × 40 genes whose labels and name are hostile HTML; with
    ``counts`` the simulated raw counts go along, so the recommended (count) model trains."""
    ds = scae.simulate_dataset(300, 40, 3, 0)
    hostile = {"pop0": SCRIPT, "pop1": QUOTED, "pop2": BOLD}
    data = scae.make_dataset(ds.X, [hostile[label] for label in ds.labels], name=NAME,
                             raw=ds.raw if counts else None)
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
def result_without_ae2():
    """No ae2, and no raw counts: the recommended model is skipped."""
    return study(tuple(spec for spec in STUDY_RUNS if spec.name != "ae2"), counts=False)


@pytest.fixture(scope="module")
def page_without_ae2(result_without_ae2) -> str:
    return build_report(result_without_ae2, result_without_ae2.metrics(), {})


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
    assert [item.split(" — ")[0] for item in items] == ["Q1", "Q2", "Q3", "Q4", "Q5", "Beyond"]
    q1, q2, q3, q4, q5, _ = items
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
    assert ("survive" in q3) == (orig >= 0.05 and orig - rec <= _q3_allowed_drop(reps))

    acc, pcs = reps["ae2_latent"]["linear_accuracy"], reps["original_pca2"]["linear_accuracy"]
    assert f"is {acc:.3f} (chance {1 / 3:.3f}; in the first two PCs {pcs:.3f})" in q4

    labels = {"ari": "k-means ARI", "nmi": "NMI", "silhouette": "silhouette"}
    for kind in ("latent", "reconstruction"):  # the scores beyond their noise, else ARI said to be within it
        a, b = reps[f"ae10_nonzero_{kind}"], reps[f"ae10_{kind}"]
        noise = {"silhouette": 0.01, **{s: max(0.02, a[f"{s}_std"] + b[f"{s}_std"]) for s in ("ari", "nmi")}}
        decisive = [s for s in labels if a[s] > b[s] + noise[s] or a[s] < b[s] - noise[s]]
        shown = ", ".join(f"{labels[s]} {a[s]:.3f} vs {b[s]:.3f}" for s in decisive or ["ari"])
        assert f"{kind}: {shown}{'' if decisive else ', within noise'}" in q5
    nonzero = [runs[n]["errors"]["test"]["nonzero_mse"] for n in ("ae10_nonzero", "ae10")]
    assert f"test nonzero MSE {nonzero[0]:.4g} vs {nonzero[1]:.4g}" in q5


def _q3_allowed_drop(reps: dict) -> float:
    """The report's rule: 0.05, or the k-means seed spread of the two when larger (at least 0.02)."""
    return max(0.05, reps["original"]["ari_std"] + reps["ae10_reconstruction"]["ari_std"])


def test_summary_repeats_the_sections_answers(page, result):
    """Each summary line's answer is the one its section's findings give."""
    lines = {line.question: line for line in summary_lines(result)}
    reps = result.representations
    q3_finding = ("The labels form no k-means clusters" if reps["original"]["ari"] < 0.05
                  else "The clusters survive reconstruction"
                  if reps["original"]["ari"] - reps["ae10_reconstruction"]["ari"] <= _q3_allowed_drop(reps)
                  else "The reconstruction loses cluster structure")
    assert q3_finding in page
    assert ("survive" in lines["Q3"].answer) == q3_finding.startswith("The clusters survive")
    verdict = lines["Q4"].answer.removeprefix("the 2-D latent of ae2 is ")
    assert f"The 2-D latent space is {verdict}: " in page


def test_question_without_its_run_is_skipped(page_without_ae2):
    items = summary_items(page_without_ae2)
    assert [item.split(" — ")[0] for item in items] == ["Q1", "Q2", "Q3", "Q5", "Beyond"]
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


def test_a_test_loss_that_never_fell_below_the_untrained_networks_reads_never(result, metrics, images):
    """No None in the tables, and the lowest test loss is the untrained network's, as the
    "within 1% of best" column already counts it."""
    model = copy.copy(result.runs["ae10"].model)
    model.history_ = [{"epoch": 0, "train_loss": 1.0, "test_loss": 0.184},
                      {"epoch": 1, "train_loss": 0.9, "test_loss": 0.2516},
                      {"epoch": 2, "train_loss": 0.8, "test_loss": 0.1992}]
    run = replace(result.runs["ae10"], model=model, convergence_epoch=None, near_best_epoch=0)
    page = build_report(replace(result, runs={**result.runs, "ae10": run}), metrics, images)
    assert "None" not in page
    q1 = section_html(page, "Q1 ")
    assert ["ae10", "never", "0", "0.8", "0.1992", "0.184 (0, before training)"] in table_rows(q1)
    assert ("lowest test loss 0.1992 at epoch 2 (the untrained network's, at epoch 0, was lower still: 0.184; "
            "training did not improve on it)") in html.unescape(q1)
    assert next(row for row in table_rows(section_html(page, "Q2 ")) if row[0] == "ae10")[-1] == "never"


def test_a_scale_note_on_the_input_is_shown_escaped(result, metrics, images):
    note = f"the values were used as given, but they reach 276.2 {SCRIPT}"
    page = build_report(result, {**metrics, "dataset": {**metrics["dataset"], "scale_note": note}}, images)
    assert f"Note: the values were used as given, but they reach 276.2 {SCRIPT_ESCAPED}." in page
    assert page.index("Note: the values") < page.index("<h2>Q1 ")
    assert "Note: the values" not in build_report(result, metrics, images)  # the built-in data: log-normalised


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


# ---------------------------------------------------------------- helpers for the new parts
def section_html(page: str, heading: str) -> str:
    """The HTML of the section whose <h2> starts with ``heading``."""
    start = page.index(f"<h2>{heading}")
    return page[start:page.index("</section>", start)]


def table_rows(fragment: str, which: int = 0) -> list[list[str]]:
    """Cells (tags removed, entities decoded) of the body rows of the ``which``-th table of ``fragment``."""
    body = re.findall(r"<tbody>(.*?)</tbody>", fragment, re.DOTALL)[which]
    return [[html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.DOTALL)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)]


def text(finding) -> str:
    """A finding (a string, or plain and Strong parts) as plain text."""
    return finding if isinstance(finding, str) else "".join(p if isinstance(p, str) else p.text for p in finding)


def findings_of(result) -> list[str]:
    return [text(item) for item in _section_beyond(result).findings]


def with_scores(result, changes: dict[str, dict]):
    """A copy of ``result`` whose representations differ only by ``changes`` (key → scores)."""
    reps = {key: {**row, **changes.get(key, {})} for key, row in result.representations.items()}
    return replace(result, representations=reps)


def with_denoising(result, changes: dict[str, dict]):
    """A copy of ``result`` whose denoising scores differ only by ``changes`` (method → scores)."""
    scores = {name: {**row, **changes.get(name, {})} for name, row in result.denoising["scores"].items()}
    return replace(result, denoising={**result.denoising, "scores": scores})


def renamed(result, old: str, new: str):
    """A copy of ``result`` with run ``old`` called ``new`` everywhere the report reads it."""
    runs = {(new if name == old else name): (replace(run, spec=replace(run.spec, name=new)) if name == old else run)
            for name, run in result.runs.items()}

    def key(k: str, prefix: str) -> str:
        return prefix + new + k[len(prefix + old):] if k.startswith(prefix + old) else k

    reps = {}
    for k, row in result.representations.items():
        row = {**row, "description": row["description"].replace(old, new)} if k.startswith(f"{old}_") else row
        reps[key(k, "")] = row
    views = {key(k, "X_"): v for k, v in result.views.items()}
    scores = {(new if k == old else k): v for k, v in result.denoising["scores"].items()}
    return replace(result, runs=runs, representations=reps, views=views,
                   denoising={**result.denoising, "scores": scores})


# ---------------------------------------------------------------- beyond the assignment
def test_beyond_section_follows_q5_with_its_score_table(page, result):
    assert page.index("<h2>Q5 ") < page.index("<h2>Beyond the assignment: the recommended model (recommended)</h2>") \
        < page.index("<h2>All representations")
    rows = table_rows(section_html(page, "Beyond the assignment"), 0)
    reps = result.representations
    keys = ["original", "original_pca10", "ae10_latent", "ae10_nonzero_latent", "recommended_latent",
            "ae10_reconstruction", "ae10_nonzero_reconstruction", "recommended_reconstruction"]
    assert [row[0] for row in rows] == [reps[k]["description"] for k in keys]
    for row, k in zip(rows, keys, strict=True):
        r = reps[k]
        assert row[2:6] == [f"{r['ari']:.3f} ± {r['ari_std']:.3f}", f"{r['nmi']:.3f} ± {r['nmi_std']:.3f}",
                            f"{r['silhouette']:.3f}", f"{r['knn_accuracy']:.3f}"]


def test_beyond_summary_line_names_the_latent_verdicts(page, result):
    line = summary_items(page)[-1]
    reps = result.representations
    latent = reps["recommended_latent"]
    assert line.startswith("Beyond — the recommended latent is ")
    assert (f"15-NN accuracy {latent['knn_accuracy']:.3f} vs {reps['original_pca10']['knn_accuracy']:.3f} "
            f"(the top 10 PCs) and {reps['ae10_latent']['knn_accuracy']:.3f} (ae10 latent)") in line
    median = result.denoising["scores"]["recommended"]["median_abs_error"]
    assert f"median |error| on hidden entries {median:.3g}" in line


@pytest.mark.parametrize("moved", [None, "silhouette"])
def test_beyond_summary_cites_the_scores_behind_its_verdict(result, moved):
    """Only a silhouette beyond its noise (0.01): the line cites it, not ARI or 15-NN accuracy within
    theirs; nothing beyond: 15-NN accuracy and ARI, said to be within the noise."""
    reps = copy.deepcopy(result.representations)
    latent, pca, ae10 = reps["recommended_latent"], reps["original_pca10"], reps["ae10_latent"]
    for score in ("ari", "nmi", "silhouette", "knn_accuracy"):
        latent[score] = pca[score] = ae10[score] = 0.5
    for rep in (latent, pca, ae10):
        rep["ari_std"] = rep["nmi_std"] = 0.0
    latent["ari"] = 0.515  # within ARI's noise (0.02) of both
    if moved:
        latent[moved] = 0.55
    line = next(s for s in summary_lines(replace(result, representations=reps)) if s.question == "Beyond")
    if moved:
        assert line.answer == "the recommended latent is better than the top 10 PCs, better than ae10 latent"
        assert line.evidence.startswith("silhouette 0.550 vs 0.500 (the top 10 PCs) and 0.500 (ae10 latent); ")
        assert "ARI" not in line.evidence and "15-NN" not in line.evidence
    else:
        assert line.answer.startswith("the recommended latent is about as good as the top 10 PCs")
        assert line.evidence.startswith("15-NN accuracy 0.500 vs 0.500 (the top 10 PCs) and 0.500 (ae10 latent); "
                                        "k-means ARI 0.515 vs 0.500 (the top 10 PCs) and 0.500 (ae10 latent) "
                                        "(differences within the scores' noise); ")


def test_model_description_comes_from_the_parameters(page, result):
    run = result.runs["recommended"]
    p = run.model.get_params()
    section = html.unescape(section_html(page, "Beyond the assignment"))
    widths = " → ".join(map(str, p["hidden"]))
    assert f"Network: genes → {widths} → {p['latent_dim']} → " in section
    assert ("A variational autoencoder" in section) == bool(p["variational"])
    assert "trained on the raw counts" in section
    if p["early_stopping"]:
        assert f"kept the weights of epoch {run.model.best_epoch_}." in section


def stand_in_run(loss: str, history_epochs: int, best_epoch, **params):
    """A run with the parameters and training record the description reads (nothing else)."""
    defaults = {"latent_dim": 8, "hidden": (64, 32), "activation": "elu", "loss": loss, "variational": False,
                "kl_warmup_epochs": 0, "norm": "none", "dropout": 0.0, "weight_decay": 0.0, "lr_schedule": "none",
                "early_stopping": False, "patience": 10, "validation_fraction": 0.1, "scale_input": False,
                "input_noise": 0.0, "learning_rate": 0.002, "batch_size": 64, "epochs": 20}
    model = SimpleNamespace(get_params=lambda: {**defaults, **params}, history_=[{}] * (history_epochs + 1),
                            best_epoch_=best_epoch)
    return SimpleNamespace(spec=SimpleNamespace(loss=loss, preset="nb_ae", counts=loss in ("nb", "zinb", "poisson")),
                           model=model)


def test_model_description_of_two_different_models():
    vae = _model_description(stand_in_run("nb", 7, 3, variational=True, kl_warmup_epochs=5, norm="batch",
                                          dropout=0.1, early_stopping=True, lr_schedule="plateau"))
    assert vae[0] == ("A variational autoencoder (Gaussian latent, KL term weighted up from 0 over 5 epochs) trained on "
                      "the raw counts with a negative-binomial likelihood (a dispersion per gene) (preset nb_ae).")
    assert vae[1] == "Network: genes → 64 → 32 → 8 → 32 → 64 → genes, elu with batch normalisation and dropout 0.1 on the hidden layers."
    assert vae[2].endswith("early stopping on a held-out 10% of the training cells (patience 10 epochs): it trained 7 of "
                           "at most 20 epochs (stopped early) and kept the weights of epoch 3.")
    assert "halved" in vae[2]
    assert vae[3].startswith("Its reconstruction is log1p(expected proportion")
    plain = _model_description(stand_in_run("mse", 20, None, norm="layer", weight_decay=0.01))
    assert plain[0].startswith("An autoencoder trained on the input matrix with a squared error (MSE)")
    assert plain[1] == "Network: genes → 64 → 32 → 8 → 32 → 64 → genes, elu with layer normalisation on the hidden layers."
    assert plain[2] == "Training: AdamW (weight decay 0.01), learning rate 0.002, batch 64; 20 epochs."
    assert len(plain) == 3  # no count-scale sentence for a model of the input matrix


def test_beyond_figures_are_planned_with_existing_coordinates(result):
    plan = figure_plan(result)
    assert [k for _, k, _ in plan["beyond_tsne_latent"]["panels"]] == ["X_tsne", "X_ae10_tsne", "X_recommended_tsne"]
    assert [k for _, k, _ in plan["beyond_tsne_reconstruction"]["panels"]] == [
        "X_tsne", "X_ae10_reconstruction_tsne", "X_recommended_reconstruction_tsne"]
    assert [k for _, k, _ in plan["beyond_pca_latent"]["panels"]] == ["X_pca", "X_ae10_pca", "X_recommended_pca"]
    for stem in ("beyond_tsne_latent", "beyond_tsne_reconstruction", "beyond_pca_latent"):
        for _, key, _ in plan[stem]["panels"]:
            assert key in result.views


def test_denoising_table_has_every_run_and_both_baselines(page, result):
    section = section_html(page, "Beyond the assignment")
    d = result.denoising
    assert (f"{d['fraction'] * 100:g}% of the nonzero entries of {d['n_cells']} test cells ({d['n_hidden']} entries"
            in section)
    rows = table_rows(section, 1)
    assert [row[0] for row in rows] == ["ae10", "ae50", "ae2", "ae10_nonzero", "recommended", "gene_mean", "pca10"]
    for row in rows:
        s = d["scores"][row[0]]
        assert row[2:] == [f"{s['median_abs_error']:.4g}", f"{s['mean_abs_error']:.4g}", f"{s['pearson']:.3f}",
                           f"{s['spearman']:.3f}"]


def test_latent_verdict_against_pca_flips_with_the_scores(result):
    pca = result.representations["original_pca10"]
    high = {s: pca[s] + 0.2 for s in ("ari", "nmi", "silhouette", "knn_accuracy")}
    low = {s: pca[s] - 0.2 for s in ("ari", "nmi", "silhouette", "knn_accuracy")}
    spread = {"ari_std": 0.0, "nmi_std": 0.0}
    better = with_scores(result, {"recommended_latent": {**high, **spread}})
    worse = with_scores(result, {"recommended_latent": {**low, **spread}})
    prefix = "recommended latent vs the top 10 PCs: "
    [b] = [f for f in findings_of(better) if f.startswith(prefix)]
    [w] = [f for f in findings_of(worse) if f.startswith(prefix)]
    assert b.endswith("— better: 4 of 4 scores higher and 0 lower beyond their noise.")
    assert w.endswith("— worse: 0 of 4 scores higher and 4 lower beyond their noise.")
    assert f"15-NN accuracy {high['knn_accuracy']:.3f} vs {pca['knn_accuracy']:.3f}" in b
    assert _section_beyond(better).summary.answer.startswith("the recommended latent is better than the top 10 PCs")
    assert _section_beyond(worse).summary.answer.startswith("the recommended latent is worse than the top 10 PCs")


BEYOND_KEYS = ("original", "original_pca10", "ae10_latent", "ae10_nonzero_latent", "recommended_latent",
               "ae10_reconstruction", "ae10_nonzero_reconstruction", "recommended_reconstruction")


def test_best_representation_and_its_lead_follow_the_numbers(result):
    low = {key: {"ari": 0.1, "ari_std": 0.0, "knn_accuracy": 0.2} for key in BEYOND_KEYS}
    first = with_scores(result, {**low, "recommended_latent": {"ari": 0.99, "ari_std": 0.0, "knn_accuracy": 0.995},
                                 "ae10_latent": {"ari": 0.5, "ari_std": 0.0, "knn_accuracy": 0.99}})
    items = findings_of(first)
    assert ("Highest k-means ARI of these representations: recommended latent (0.990), 0.490 above the next, "
            "ae10 latent (0.500).") in items
    assert ("Highest 15-nearest-neighbour label accuracy of these representations: recommended latent (0.995), "
            "but ae10 latent (0.990) is within the noise threshold of it (0.010).") in items
    second = with_scores(first, {"ae10_latent": {"knn_accuracy": 0.5}, "recommended_latent": {"ari": 0.51, "ari_std": 0.02}})
    items = findings_of(second)
    assert ("Highest 15-nearest-neighbour label accuracy of these representations: recommended latent (0.995), "
            "0.495 above the next, ae10 latent (0.500).") in items
    assert ("Highest k-means ARI of these representations: recommended latent (0.510), but ae10 latent (0.500) is "
            "within the k-means seed spread of it (0.020).") in items


def test_denoising_findings_flip_with_the_scores(result):
    baselines = {k: result.denoising["scores"][k]["median_abs_error"] for k in ("gene_mean", "pca10")}
    best = with_denoising(result, {"recommended": {"median_abs_error": 0.001}})
    worst = with_denoising(result, {"recommended": {"median_abs_error": 1e6}})
    [line] = [f for f in findings_of(best) if f.startswith("Lowest median |error|")]
    assert line.startswith("Lowest median |error| on the hidden entries among the models: recommended (0.001), ")
    assert line.endswith(f"; it beats both baselines (gene_mean {baselines['gene_mean']:.3g}, pca10 {baselines['pca10']:.3g}).")
    [line] = [f for f in findings_of(worst) if f.startswith("Lowest median |error|")]
    assert "recommended" not in line
    assert "recommended: median |error| 1.000e+06, rank 5 of 5 models." in findings_of(worst)
    everyone_worse = with_denoising(result, {name: {"median_abs_error": 1e6 + i}
                                             for i, name in enumerate(["ae10", "ae50", "ae2", "ae10_nonzero", "recommended"])})
    [line] = [f for f in findings_of(everyone_worse) if f.startswith("Lowest median |error|")]
    assert line.endswith(f"; it beats neither baseline (gene_mean {baselines['gene_mean']:.3g}, pca10 {baselines['pca10']:.3g}).")


def test_skipped_recommended_run_is_one_line(result_without_ae2, page_without_ae2):
    reason = result_without_ae2.skipped_runs["recommended"]
    assert "recommended" not in result_without_ae2.runs
    section = section_html(page_without_ae2, "Beyond the assignment: the recommended model</h2>")
    assert f"<p>The recommended model (recommended) was not trained: {html.escape(reason, quote=True).replace('&#x27;', '&#39;')}.</p>" in section
    assert summary_items(page_without_ae2)[-1] == html.escape(f"Beyond — recommended was not trained: {reason}", quote=False)
    assert f"recommended was not trained: {html.escape(reason, quote=False)}.\n" in page_without_ae2.split("<h2>Q1 ")[0]
    assert not any(stem.startswith("beyond_") for stem in figure_plan(result_without_ae2))
    # the denoising table is still there, for the runs that trained
    assert [row[0] for row in table_rows(section, 0)] == ["ae10", "ae50", "ae10_nonzero", "gene_mean", "pca10"]


def test_no_beyond_section_without_the_run_or_denoising(result):
    runs = {name: run for name, run in result.runs.items() if name != "recommended"}
    without = replace(result, runs=runs, skipped_runs={}, denoising=None)
    page = build_report(without, without.metrics(), {})
    assert "Beyond the assignment" not in page
    assert [item.split(" — ")[0] for item in summary_items(page)] == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    only_denoising = replace(without, denoising=result.denoising)
    page = build_report(only_denoising, only_denoising.metrics(), {})
    assert "<h2>Beyond the assignment: denoising</h2>" in page


def test_hostile_run_name_and_skip_reason_are_escaped(result, result_without_ae2):
    hostile = renamed(result, "recommended", SCRIPT)
    page = build_report(hostile, hostile.metrics(), {stem: b"png" for stem in figure_plan(hostile)})
    assert "<script" not in page.lower() and tags_of(page) <= PAGE_TAGS
    assert f"<h2>Beyond the assignment: the recommended model ({SCRIPT_ESCAPED})</h2>" in page
    assert f"Beyond</b> — the {SCRIPT_ESCAPED} latent is " in page
    skipped = replace(result_without_ae2, skipped_runs={"recommended": BOLD})
    page = build_report(skipped, skipped.metrics(), {})
    assert "<b>cells</b>" not in page and tags_of(page) <= PAGE_TAGS
    assert f"was not trained: {BOLD_ESCAPED}.</p>" in page


# ---------------------------------------------------------------- 15-NN accuracy, input facts
def test_every_score_table_has_the_knn_column(page, result):
    header = "<th>silhouette (labels)</th><th>15-NN accuracy (5-fold)</th><th>linear accuracy (test cells)</th>"
    assert page.count(header) == 5  # Q3, Q4, Q5, Beyond, All representations
    rows = table_rows(section_html(page, "All representations"), 0)
    reps = result.representations
    assert [row[0] for row in rows] == [r["description"] for r in reps.values()]
    for row, r in zip(rows, reps.values(), strict=True):
        assert row[5] == f"{r['knn_accuracy']:.3f}"
        assert row[6] == (f"{r['linear_accuracy']:.3f}" if "linear_accuracy" in r else "–")


def test_gene_selection_is_stated_in_the_input_facts(result):
    genes = {"rule": "seurat_v3", "n_selected": 20, "n_genes": 40, "cells": "training cells"}
    line = ("Genes: the models saw the 20 most variable of 40 genes (scanpy's <code>seurat_v3</code> rule, "
            "measured on the training cells).")
    page = build_report(replace(result, genes=genes), result.metrics(), {})
    assert line in page and page.index(line) < page.index("<h2>Q1 ")
    assert "most variable" not in build_report(result, result.metrics(), {})


@pytest.mark.parametrize(("survives", "knn", "expected"), [
    (True, (0.90, 0.88), None),
    (True, (0.90, 0.80), "disagrees: it falls from 0.900 on the original to 0.800 on the reconstruction (more than 0.05)"),
    (False, (0.90, 0.88), "disagrees: 0.880 on the reconstruction vs 0.900 on the original (at most 0.05 lower)"),
    (False, (0.90, 0.70), None),
    (False, (0.88, 0.90), "disagrees: 0.900 on the reconstruction vs 0.880 on the original (not lower)"),
])
def test_q3_mentions_knn_only_when_it_gives_the_other_verdict(survives, knn, expected):
    items = _q3_knn_disagreement({"knn_accuracy": knn[0]}, {"knn_accuracy": knn[1]}, survives)
    assert (items == []) == (expected is None)
    if expected is not None:
        assert expected in items[0]


def test_q5_mentions_knn_only_where_it_points_the_other_way():
    reps = {"nz_latent": {"knn_accuracy": 0.80}, "ae_latent": {"knn_accuracy": 0.70},
            "nz_reconstruction": {"knn_accuracy": 0.705}, "ae_reconstruction": {"knn_accuracy": 0.70}}
    verdicts = {"latent": ("worse", 0, 2), "reconstruction": ("no clear difference", 0, 0)}
    assert _q5_knn_disagreements(reps, "nz", "ae", verdicts) == [
        "15-nearest-neighbour label accuracy of the latent is higher for nz than for ae (0.800 vs 0.700; differences "
        "within 0.01 count as the same), unlike the verdict from ARI, NMI and silhouette (worse)."]
    agreeing = {"latent": ("better", 2, 0), "reconstruction": ("mixed", 1, 1)}
    assert _q5_knn_disagreements(reps, "nz", "ae", agreeing) == []


@pytest.mark.parametrize(("original", "reconstruction", "answer", "finding"), [
    ((0.387, 0.06), (0.303, 0.044), "the clusters survive the ae10 reconstruction",
     "The clusters survive reconstruction: k-means on the reconstruction agrees with the labels at least as well as on "
     "the original, within 0.104 ARI (the k-means seed spread, larger than 0.05)."),
    ((0.387, 0.01), (0.303, 0.01), "the ae10 reconstruction loses cluster structure",
     "The reconstruction loses cluster structure: its k-means ARI is 0.084 below the original's (more than 0.05)."),
    ((-0.0001, 0.0), (-0.0004, 0.0), "no cluster structure to keep: the labels form no k-means clusters in the "
     "original data", "The labels form no k-means clusters in the original data (ARI 0.000, below 0.05), so there is "
     "no cluster structure for the reconstruction to keep or lose."),
])
def test_q3_verdict_counts_the_seed_spread_and_needs_clusters_to_keep(result, original, reconstruction, answer, finding):
    """A drop within the k-means seed spread was called 'about the same' and 'loses' in two sentences; an input
    without clusters (noise, random labels) was said to keep them."""
    reps = copy.deepcopy(result.representations)
    for key, (ari, std) in (("original", original), ("ae10_reconstruction", reconstruction)):
        reps[key].update(ari=ari, ari_std=std)
    changed = replace(result, representations=reps)
    line = next(s for s in summary_lines(changed) if s.question == "Q3")
    assert line.answer == answer
    assert "-0.000" not in line.evidence
    page = html.unescape(build_report(changed, result.metrics(), {}))
    assert finding in page


def test_q5_explains_a_higher_all_entries_error_only_when_it_is_higher(result, metrics):
    """'over all entries it is the same (0.9023 vs 0.9022)' was followed by why it is higher."""
    runs = dict(result.runs)
    mse = runs["ae10"].errors["test"]["mse"]
    errors = copy.deepcopy(runs["ae10_nonzero"].errors)
    errors["test"]["mse"] = mse * 1.0001
    runs["ae10_nonzero"] = replace(runs["ae10_nonzero"], errors=errors)
    q5 = html.unescape(section_html(build_report(replace(result, runs=runs), metrics, {}), "Q5 "))
    assert "over all entries it is the same (" in q5
    assert "is not penalised for what it predicts where the input is zero" not in q5
    assert "test MSE is the same than" not in q5


def test_q2_leaves_capacity_out_when_the_smallest_latent_carries_all_the_variance(result, metrics):
    variance = {k: 0.9997 for k in result.explained_variance}
    q2 = html.unescape(section_html(build_report(replace(result, explained_variance=variance), metrics, {}), "Q2 "))
    smallest = min(variance, key=lambda k: int(str(k)))
    assert (f"the top {smallest} PCs already carry nearly all of it, so every latent size here has room for what "
            "the data varies in") in q2
    assert "as that predicts" not in q2 and "a larger bottleneck could keep more" not in q2


def test_q1_says_levelled_off_not_still_falling_when_the_best_epoch_is_long_past(result, metrics):
    model = copy.copy(result.runs["ae10"].model)
    model.history_ = [{"epoch": e, "train_loss": 1.0 - e / 100, "test_loss": t}
                      for e, t in enumerate([1.0, 0.8, 0.69, 0.70, 0.695, 0.6913])]
    runs = {**result.runs, "ae10": replace(result.runs["ae10"], model=model)}
    q1 = html.unescape(section_html(build_report(replace(result, runs=runs), metrics, {}), "Q1 "))
    assert "lowest test loss 0.69 at epoch 2; the test loss has levelled off: the last epoch's is 0.2% above its lowest." in q1
    assert "more epochs could help" not in q1.split("ae10: final training loss")[1].split("ae50")[0]
