"""The self-contained HTML report: a summary, one section per question, findings from the numbers.

Every sentence of a finding is chosen here, in Python, by comparing measured values of this run;
nothing is asserted that the numbers do not show. The functions below return plain data
(strings, table rows, :class:`SummaryLine` s); the Jinja2 templates in ``scae/templates`` turn it
into HTML with autoescaping on, so no text from a user's file (labels, names, paths) can become
markup. Emphasis inside a finding is structured data (:class:`Strong`), never embedded HTML.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from typing import TYPE_CHECKING, NamedTuple

from scae import __version__

if TYPE_CHECKING:
    import jinja2

    from scae.results import RunResult, StudyResult

SURVIVES_ARI_DROP = 0.05
"""A reconstruction 'keeps' the clusters when its k-means ARI is at most this much below the input's
(or the k-means seed spread of the two, when that is larger: a drop within it is not measured)."""
NO_CLUSTERS_ARI = 0.05
"""Below this k-means ARI on the input, the labels form no clusters for a reconstruction to keep or lose."""
SURVIVES_KNN_DROP = 0.05
"""By 15-nearest-neighbour label accuracy, a reconstruction keeps the labels apart when its accuracy is at
most this much below the input's (Q3 says so when this verdict differs from the ARI one)."""
KNN_NOISE = 0.01
"""Smallest difference in 15-NN label accuracy between two representations that counts as real."""
SCORES = ("ari", "nmi", "silhouette", "knn_accuracy")
ALL_VARIANCE = 0.999
"""Explained by the smallest latent size's PCs, this share of the variance leaves capacity out of Q2's answer."""
SCORE_LABELS = {"ari": "k-means ARI", "nmi": "NMI", "silhouette": "silhouette", "knn_accuracy": "15-NN accuracy"}
"""The cluster scores compared between representations (k-means ARI and NMI, silhouette, 15-NN)."""
SEPARABLE_ACCURACY = 0.9
PARTLY_SEPARABLE_ACCURACY = 0.7
TEMPLATE = "report.html.j2"


# ---------------------------------------------------------------- what the template receives
@dataclass(frozen=True)
class Strong:
    """A part of a finding shown emphasised (bold); its text is escaped like any other."""

    text: str


Finding = str | tuple[str | Strong, ...]
"""One finding: a sentence, or a sequence of plain and emphasised parts."""


@dataclass(frozen=True)
class SummaryLine:
    """The answer to one question and the number behind it, for the summary at the top."""

    question: str
    answer: str
    evidence: str


@dataclass(frozen=True)
class Section:
    """One question's part of the page as plain data; the template writes the prose around it."""

    summary: SummaryLine | None
    findings: list[Finding]
    tables: dict[str, list[list[str]]]
    """Rows of the section's tables (strings), by table name."""
    run: str = ""
    """The run the question is about ('' when it is about several)."""
    facts: dict[str, object] = field(default_factory=dict)
    """Numbers and switches the section's introduction mentions."""


# ---------------------------------------------------------------- which runs answer which question
def _runs_where(result: StudyResult, loss: str, latent=None) -> list[RunResult]:
    """The assignment's runs (not preset runs) with this loss and a latent size ``latent`` accepts."""
    return [
        r
        for r in result.runs.values()
        if r.spec.preset is None and r.spec.loss == loss and (latent is None or latent(r.spec.latent_dim))
    ]


def _roles(result: StudyResult) -> dict:
    """The runs each question is about (sections whose runs are absent are skipped)."""
    mse_large = sorted(_runs_where(result, "mse", lambda d: d > 2), key=lambda r: r.spec.latent_dim)
    two_d = _runs_where(result, "mse", lambda d: d == 2)
    nonzero = _runs_where(result, "nonzero_mse")
    q3 = [r for r in mse_large if r.spec.tsne_reconstruction]
    q5_reference = None
    if nonzero:
        same = [r for r in mse_large if r.spec.latent_dim == nonzero[0].spec.latent_dim]
        q5_reference = same[0] if same else None
    return {
        "q1": mse_large[:2] if len(mse_large) >= 2 else [],
        "q3": q3[0] if q3 else None,
        "q4": two_d[0] if two_d else None,
        "q5": nonzero[0] if nonzero else None,
        "q5_reference": q5_reference,
    }


def figure_plan(result: StudyResult) -> dict[str, dict]:
    """What every figure shows: loss curves or scatter panels of named coordinates."""
    roles = _roles(result)
    pc = ("PC1", "PC2")
    plan: dict[str, dict] = {}
    if roles["q1"]:
        names = " vs ".join(r.spec.name for r in roles["q1"])
        plan["q1_loss_history"] = {
            "kind": "loss",
            "title": f"Training and test loss per epoch ({names})",
            "histories": {r.spec.name: r.model.history_ for r in roles["q1"]},
            "keys": ["train_loss", "test_loss"],
        }
    plan["q2_test_mse_history"] = {
        "kind": "loss",
        "title": "Test-cell MSE (all entries) per epoch, every run",
        "histories": {name: r.model.history_ for name, r in result.runs.items()},
        "keys": ["test_mse"],
    }
    if (q3 := roles["q3"]) is not None:
        n = q3.spec.name
        plan["q3_pca_original_vs_reconstruction"] = _scatter(
            f"PCA: original vs {n} reconstruction (both on the original's principal axes)",
            [("original", "X_pca", pc), (f"{n} reconstruction", f"X_{n}_reconstruction_pca", pc)],
        )
        plan["q3_tsne_original_vs_reconstruction"] = _scatter(
            f"t-SNE: original vs {n} reconstruction",
            [("original", "X_tsne", ()), (f"{n} reconstruction", f"X_{n}_reconstruction_tsne", ())],
        )
    if (q4 := roles["q4"]) is not None:
        plan["q4_latent_2d"] = _scatter(
            f"The 2-D latent space of {q4.spec.name}, next to the first two PCs of the input",
            [(f"{q4.spec.name} latent", f"X_{q4.spec.name}", ("z1", "z2")), ("original PCA", "X_pca", pc)],
        )
    if (q5 := roles["q5"]) is not None:
        n, ref = q5.spec.name, roles["q5_reference"]

        def reference(suffix: str, what: str, available: bool = True) -> list[tuple]:
            """The same view of the MSE run with the same latent size, for comparison."""
            if ref is None or not available:
                return []
            return [(f"{ref.spec.name} {what} (MSE)", f"X_{ref.spec.name}{suffix}", pc if "pca" in suffix else ())]

        plan["q5_pca_reconstruction_vs_original"] = _scatter(
            f"PCA: {n} reconstruction vs original (original's principal axes)",
            [("original", "X_pca", pc), (f"{n} reconstruction", f"X_{n}_reconstruction_pca", pc)]
            + reference("_reconstruction_pca", "reconstruction"),
        )
        plan["q5_pca_latent_vs_original"] = _scatter(
            f"PCA: {n} latent vs original",
            [("original", "X_pca", pc), (f"{n} latent", f"X_{n}_pca", pc)] + reference("_pca", "latent"),
        )
        if q5.spec.tsne_reconstruction:
            plan["q5_tsne_reconstruction_vs_original"] = _scatter(
                f"t-SNE: {n} reconstruction vs original",
                [("original", "X_tsne", ()), (f"{n} reconstruction", f"X_{n}_reconstruction_tsne", ())]
                + reference("_reconstruction_tsne", "reconstruction", ref is not None and ref.spec.tsne_reconstruction),
            )
        if q5.spec.tsne_latent:
            plan["q5_tsne_latent_vs_original"] = _scatter(
                f"t-SNE: {n} latent vs original",
                [("original", "X_tsne", ()), (f"{n} latent", f"X_{n}_tsne", ())]
                + reference("_tsne", "latent", ref is not None and ref.spec.tsne_latent),
            )
    plan.update(_beyond_figures(result))
    latent_panels = []
    for name, run in result.runs.items():
        if run.spec.latent_dim > 2:
            latent_panels.append((f"{name} latent (PCA)", f"X_{name}_pca", pc))
        else:
            latent_panels.append((f"{name} latent", f"X_{name}", ("z1", "z2")))
    plan["latent_pca_all"] = _scatter("PCA of every latent space", latent_panels)
    return plan


def _beyond_figures(result: StudyResult) -> dict[str, dict]:
    """t-SNE of the recommended run's latent and reconstruction, and PCA of its latent, next to the
    input's and the MSE run of the closest latent size (panels whose coordinates exist)."""
    run = _beyond_run(result)
    if run is None:
        return {}
    n, ref = run.spec.name, _beyond_references(result, run)["mse"]
    m = ref.spec.name if ref is not None else None
    pc = ("PC1", "PC2")

    def panels(candidates: list[tuple]) -> list[tuple]:
        return [(t, k, a) for t, k, a in candidates if k is not None and k in result.views]

    def latent_pca(name: str, dim: int) -> tuple:
        return ((f"{name} latent (PCA)", f"X_{name}_pca", pc) if dim > 2 else (f"{name} latent", f"X_{name}", ("z1", "z2")))

    plan = {}
    tsne_latent = panels([("original", "X_tsne", ()), (f"{m} latent", m and f"X_{m}_tsne", ()), (f"{n} latent", f"X_{n}_tsne", ())])
    if any(k == f"X_{n}_tsne" for _, k, _ in tsne_latent):
        plan["beyond_tsne_latent"] = _scatter(f"t-SNE: {n} latent vs original" + (f" and {m} latent" if m else ""), tsne_latent)
    tsne_recon = panels([("original", "X_tsne", ()), (f"{m} reconstruction", m and f"X_{m}_reconstruction_tsne", ()),
                         (f"{n} reconstruction", f"X_{n}_reconstruction_tsne", ())])
    if any(k == f"X_{n}_reconstruction_tsne" for _, k, _ in tsne_recon):
        plan["beyond_tsne_reconstruction"] = _scatter(
            f"t-SNE: {n} reconstruction vs original" + (f" and {m} reconstruction" if m else ""), tsne_recon)
    latents = {f"X_{name}" for name in result.runs}
    pca_panels = [("original PCA", "X_pca", pc)] + ([latent_pca(m, ref.spec.latent_dim)] if ref else [])
    pca_panels.append(latent_pca(n, run.spec.latent_dim))
    pca_panels = [(t, k, a) for t, k, a in pca_panels if k in result.views or k in latents]
    plan["beyond_pca_latent"] = _scatter(f"PCA: {n} latent vs the input's PCs" + (f" and {m} latent" if m else ""), pca_panels)
    return plan


def _scatter(title: str, panels: list[tuple]) -> dict:
    return {"kind": "scatter", "title": title, "panels": [(t, k, a or ("t-SNE 1", "t-SNE 2")) for t, k, a in panels]}


# ---------------------------------------------------------------- formatting helpers
def _f(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _pct_change(new: float, old: float) -> str:
    """'12.3% lower' / '4.0% higher' of ``new`` relative to ``old`` ('the same' within 0.05%; against an
    ``old`` of about 0, an exact fit whose error is rounding noise, no percentage)."""
    if abs(old) < 1e-9:
        return "the same" if abs(new) < 1e-9 else ("higher" if new > old else "lower")
    change = (new - old) / abs(old) * 100
    if abs(change) < 0.05:
        return "the same"
    return f"{abs(change):.1f}% {'lower' if change < 0 else 'higher'}"


def _ari(value: float) -> str:
    """An ARI to 3 decimals, without the sign of a negative zero ("-0.000")."""
    return f"{value:.3f}".replace("-0.000", "0.000")


def _than(new: float, old: float) -> str:
    """:func:`_pct_change` to go before a noun: 'the same as' / '12.3% lower than'."""
    change = _pct_change(new, old)
    return "the same as" if change == "the same" else f"{change} than"


def _score_rows(reps: dict, keys: list[str]) -> list[list[str]]:
    """Rows of the cluster-score table (``templates/macros.html.j2``'s ``score_table``)."""
    rows = []
    for key in keys:
        if key not in reps:
            continue
        r = reps[key]
        rows.append([
            r["description"],
            str(r["dims"]),
            f"{_ari(r['ari'])} ± {r['ari_std']:.3f}",
            f"{r['nmi']:.3f} ± {r['nmi_std']:.3f}",
            f"{r['silhouette']:.3f}",
            f"{r['knn_accuracy']:.3f}" if "knn_accuracy" in r else "–",
            f"{r['linear_accuracy']:.3f}" if "linear_accuracy" in r else "–",
        ])
    return rows


def _noise(ra: dict, rb: dict, score: str) -> float:
    """Smallest difference in ``score`` between two representations that counts as real."""
    if score == "silhouette":
        return 0.01
    if score == "knn_accuracy":
        return KNN_NOISE
    return max(0.02, ra[f"{score}_std"] + rb[f"{score}_std"])


def _compare_scores(reps: dict, a: str, b: str, name_a: str, name_b: str) -> str:
    """One sentence comparing the cluster scores of representations ``a`` and ``b``."""
    ra, rb = reps[a], reps[b]
    d_ari = rb["ari"] - ra["ari"]
    noise = _noise(ra, rb, "ari")
    if abs(d_ari) <= noise:
        ari_text = f"k-means ARI is about the same ({_ari(ra['ari'])} vs {_ari(rb['ari'])}; the difference is within the k-means seed spread of {noise:.3f})"
    else:
        ari_text = f"k-means ARI {'rises' if d_ari > 0 else 'falls'} from {_ari(ra['ari'])} ({name_a}) to {_ari(rb['ari'])} ({name_b})"
    d_sil = rb["silhouette"] - ra["silhouette"]
    sil_text = (
        f"the labels' silhouette {'rises' if d_sil > 0 else 'falls'} from {ra['silhouette']:.3f} to {rb['silhouette']:.3f}"
        if abs(d_sil) >= 0.01
        else f"the labels' silhouette is unchanged at about {rb['silhouette']:.3f}"
    )
    return f"From {name_a} to {name_b}: {ari_text}; NMI goes from {ra['nmi']:.3f} to {rb['nmi']:.3f}; {sil_text}."


# ---------------------------------------------------------------- Q1
class _Race(NamedTuple):
    """Two runs and the epoch at which each reached some point (``None``: never)."""

    a: RunResult
    b: RunResult
    epoch_a: int | None
    epoch_b: int | None

    @classmethod
    def of(cls, a: RunResult, b: RunResult, attribute: str) -> _Race:
        return cls(a, b, getattr(a, attribute), getattr(b, attribute))

    @property
    def stalled(self) -> list[RunResult]:
        """The runs that never got there."""
        return [r for r, e in ((self.a, self.epoch_a), (self.b, self.epoch_b)) if e is None]

    @property
    def winner(self) -> tuple[RunResult, int, RunResult, int] | None:
        """``(fast, its epoch, slow, its epoch)``; ``None`` for a tie or a stalled run."""
        ea, eb = self.epoch_a, self.epoch_b
        if ea is None or eb is None or ea == eb:
            return None
        return (self.a, ea, self.b, eb) if ea < eb else (self.b, eb, self.a, ea)


def _race_sentence(race: _Race, what: str) -> str:
    """Which of two runs got somewhere first."""
    if race.stalled:
        return f"{race.stalled[0].spec.name}'s test loss never went below its starting value."
    if race.winner is None:
        return f"Both {race.a.spec.name} and {race.b.spec.name} {what} at epoch {race.epoch_a}."
    fast, fe, slow, se = race.winner
    return (f"{fast.spec.name} {what} at epoch {fe}, {slow.spec.name} at epoch {se}: "
            f"{fast.spec.name} is faster by {se - fe} epoch(s).")


def _q1_summary(convergence: _Race, near_best: _Race) -> SummaryLine:
    """Which latent size converges faster, by the 95% rule, else by the 1% one."""
    a, b = convergence.a.spec.name, convergence.b.spec.name
    if len(convergence.stalled) == 2:
        return SummaryLine("Q1", "neither converges", f"the test loss of neither {a} nor {b} went below its starting value")
    if convergence.stalled:
        stalled = convergence.stalled[0]
        moving, epoch = ((convergence.b, convergence.epoch_b) if stalled is convergence.a
                         else (convergence.a, convergence.epoch_a))
        return SummaryLine("Q1", f"{moving.spec.name} converges, {stalled.spec.name} does not",
                           f"{stalled.spec.name}'s test loss never went below its starting value; "
                           f"{moving.spec.name} made 95% of its test-loss drop by epoch {epoch}")
    if convergence.winner is not None:
        fast, fe, slow, se = convergence.winner
        return SummaryLine("Q1", f"{fast.spec.name} converges faster",
                           f"95% of its test-loss drop by epoch {fe} vs {se} for {slow.spec.name}")
    both = f"both make 95% of their test-loss drop by epoch {convergence.epoch_a}"
    if near_best.winner is not None:
        fast, fe, slow, se = near_best.winner
        return SummaryLine("Q1", f"{fast.spec.name} converges faster",
                           f"{both}, but {fast.spec.name} is within 1% of its lowest test loss by epoch {fe} "
                           f"vs {se} for {slow.spec.name}")
    return SummaryLine("Q1", f"{a} and {b} converge equally fast",
                       f"{both} and are within 1% of their lowest test loss by epoch {near_best.epoch_a}")


def _epoch_cell(epoch: int | None) -> str:
    """A convergence epoch in a table: ``never`` when the test loss never fell below its start."""
    return "never" if epoch is None else str(epoch)


def _q1_run_finding(r: RunResult) -> str:
    """Final and lowest losses of one run, and whether it overfits or could use more epochs."""
    h = r.model.history_
    last, best = h[-1], min(h[1:], key=lambda row: row["test_loss"])
    gap = last["test_loss"] - last["train_loss"]
    text = (
        f"{r.spec.name}: final training loss {_f(last['train_loss'])}, final test loss {_f(last['test_loss'])} "
        f"(test − train = {_f(gap, 3)}); lowest test loss {_f(best['test_loss'])} at epoch {best['epoch']}"
    )
    if h[0]["test_loss"] < best["test_loss"]:
        text += (f" (the untrained network's, at epoch 0, was lower still: {_f(h[0]['test_loss'])}; training did "
                 "not improve on it)")
    rise = (last["test_loss"] - best["test_loss"]) / best["test_loss"]
    train_at_best = h[best["epoch"]]["train_loss"]
    if best["epoch"] < last["epoch"] and rise > 0.01:
        if last["train_loss"] < train_at_best:
            return text + (f", after which it rose by {rise * 100:.1f}% while the training loss kept falling "
                           f"({_f(train_at_best)} → {_f(last['train_loss'])}): the model overfits the training cells.")
        return text + f", after which it rose by {rise * 100:.1f}% (the training loss did not fall either)."
    if best["epoch"] == last["epoch"] and last["test_loss"] < h[-2]["test_loss"] - 0.001 * abs(h[-2]["test_loss"]):
        return text + "; the test loss was still falling in the last epoch, so more epochs could help."
    if best["epoch"] < last["epoch"]:
        return text + f"; the test loss has levelled off: the last epoch's is {max(rise, 0.0) * 100:.1f}% above its lowest."
    return text + "; the test loss has levelled off."


def _section_q1(result: StudyResult) -> Section | None:
    runs = _roles(result)["q1"]
    if not runs:
        return None
    a, b = runs
    convergence = _Race.of(a, b, "convergence_epoch")
    near_best = _Race.of(a, b, "near_best_epoch")
    items: list[Finding] = [
        _race_sentence(convergence, "reached 95% of its total test-loss decrease"),
        _race_sentence(near_best, "got within 1% of its lowest test loss"),
        *(_q1_run_finding(r) for r in runs),
    ]
    la, lb = a.model.history_[-1]["test_loss"], b.model.history_[-1]["test_loss"]
    items.append(f"{b.spec.name}'s final test loss is {_than(lb, la)} {a.spec.name}'s.")
    rows = []
    for r in runs:
        h = r.model.history_
        best = min(h, key=lambda row: row["test_loss"])  # as "within 1% of best": the untrained network included
        untrained = ", before training" if best["epoch"] == 0 else ""
        rows.append([r.spec.name, _epoch_cell(r.convergence_epoch), str(r.near_best_epoch), _f(h[-1]["train_loss"]),
                     _f(h[-1]["test_loss"]), f"{_f(best['test_loss'])} ({best['epoch']}{untrained})"])
    return Section(
        summary=_q1_summary(convergence, near_best),
        findings=items,
        tables={"losses": rows},
        facts={
            "latent_dims": [r.spec.latent_dim for r in runs],
            "early_convergence": all((r.convergence_epoch or 99) <= 2 for r in runs),
        },
    )


# ---------------------------------------------------------------- Q2
def _section_q2(result: StudyResult) -> Section:
    rows, items = [], []
    for name, r in result.runs.items():
        rows.append([name, str(r.spec.latent_dim), r.spec.loss, _f(r.errors["test"]["mse"]), _f(r.errors["train"]["mse"]),
                     _f(r.errors["test"]["nonzero_mse"]), _f(r.errors["train"]["nonzero_mse"]), _epoch_cell(r.convergence_epoch)])
    for name, e in result.pca_baselines.items():
        rows.append([f"PCA baseline ({name})", name[3:], "linear", _f(e["test"]["mse"]), _f(e["train"]["mse"]),
                     _f(e["test"]["nonzero_mse"]), _f(e["train"]["nonzero_mse"]), "–"])
    mse_runs = sorted(_runs_where(result, "mse"), key=lambda r: r.errors["test"]["mse"])
    by_dim = sorted(mse_runs, key=lambda r: r.spec.latent_dim)
    if mse_runs:
        ranking = ", ".join(f"{r.spec.name} ({_f(r.errors['test']['mse'])})" for r in mse_runs)
        items.append(f"Lowest test MSE among the MSE-trained runs: {mse_runs[0].spec.name}. Ranking by test MSE: {ranking}.")
        for small, large in pairwise(by_dim):
            change = _pct_change(large.errors["test"]["mse"], small.errors["test"]["mse"])
            verdict = ("reconstructs about as well as" if change == "the same"
                       else "reconstructs better than" if "lower" in change else "reconstructs worse than")
            items.append(f"Latent {large.spec.latent_dim} {verdict} latent {small.spec.latent_dim}: its test MSE is {change}.")
    ev = result.explained_variance
    ordered = None  # whether the test MSE falls with every increase in latent size (when there is a variance to cite)
    if ev and mse_runs:
        ordered = all(a.errors["test"]["mse"] > b.errors["test"]["mse"] for a, b in pairwise(by_dim))
        variance = ", ".join(f"{k} PCs explain {v * 100:.1f}%" for k, v in ev.items())
        smallest = min(ev, key=int)  # keys are the sizes as text
        if ev[smallest] >= ALL_VARIANCE:
            items.append(f"On this data the top {variance} of the variance: the top {smallest} PCs already carry "
                         f"nearly all of it, so every latent size here has room for what the data varies in, and the "
                         "differences in test MSE come from training, not from the bottleneck's capacity.")
        elif ordered:
            items.append(f"Why: a bottleneck of k dimensions can keep at most what k directions carry; on this data the "
                         f"top {variance} of the variance, and the test MSE falls as the latent size grows, as that predicts.")
        else:
            items.append(f"On this data the top {variance} of the variance; a larger bottleneck could keep more, but the "
                         "test MSE does not fall with every increase in latent size here, so capacity is not what limits these runs.")
    for r in result.runs.values():
        base = result.pca_baselines.get(f"pca{r.spec.latent_dim}")
        if base and r.spec.loss == "mse":
            items.append(
                f"{r.spec.name} vs PCA with {r.spec.latent_dim} components (a linear map of the same size, fitted on "
                f"the training cells): test MSE {_pct_change(r.errors['test']['mse'], base['test']['mse'])}."
            )
    for r in result.runs.values():
        items.append(f"{r.spec.name}: test MSE is {_than(r.errors['test']['mse'], r.errors['train']['mse'])} train MSE.")
    return Section(summary=_q2_summary(result, mse_runs, ordered) if mse_runs else None,
                   findings=items, tables={"errors": rows})


def _q2_summary(result: StudyResult, ranked: list[RunResult], ordered: bool | None) -> SummaryLine:
    """The MSE-trained run with the lowest test MSE, the others', the same-size PCA's, and why."""
    best, others = ranked[0], ranked[1:]
    evidence = f"test MSE {_f(best.errors['test']['mse'])}"
    if others:
        evidence += " vs " + ", ".join(f"{_f(r.errors['test']['mse'])} for {r.spec.name}" for r in others)
    base = result.pca_baselines.get(f"pca{best.spec.latent_dim}")
    if base:
        evidence += f"; PCA with {best.spec.latent_dim} components: {_f(base['test']['mse'])}"
    if ordered is True and others:
        evidence += "; the error falls as the latent size grows"
    elif ordered is False:
        evidence += "; the error does not fall with every increase in latent size, so capacity is not the limit"
    return SummaryLine("Q2", f"{best.spec.name} reconstructs best of the MSE-trained runs", evidence)


# ---------------------------------------------------------------- Q3
def _largest_pca(reps: dict) -> str:
    """Key of the input's largest PCA representation ('' when there is none)."""
    keys = [k for k in reps if k.startswith("original_pca")]
    return max(keys, key=lambda k: reps[k]["dims"]) if keys else ""


def _section_q3(result: StudyResult) -> Section | None:
    run = _roles(result)["q3"]
    if run is None:
        return None
    n, reps = run.spec.name, result.representations
    original, reconstruction = reps["original"]["ari"], reps[f"{n}_reconstruction"]["ari"]
    items: list[Finding] = [
        _compare_scores(reps, "original", f"{n}_reconstruction", "the original data", f"the {n} reconstruction")
    ]
    drop = original - reconstruction
    allowed = max(SURVIVES_ARI_DROP, _noise(reps["original"], reps[f"{n}_reconstruction"], "ari"))
    survives = drop <= allowed
    no_clusters = original < NO_CLUSTERS_ARI
    if no_clusters:
        items.append(f"The labels form no k-means clusters in the original data (ARI {_ari(original)}, below "
                     f"{NO_CLUSTERS_ARI}), so there is no cluster structure for the reconstruction to keep or lose.")
    elif survives:
        items.append(f"The clusters survive reconstruction: k-means on the reconstruction agrees with the labels at least "
                     f"as well as on the original, within {allowed:.3g} ARI"
                     + (f" (the k-means seed spread, larger than {SURVIVES_ARI_DROP})." if allowed > SURVIVES_ARI_DROP else "."))
    else:
        items.append(f"The reconstruction loses cluster structure: its k-means ARI is {drop:.3f} below the original's "
                     f"(more than {allowed:.3g}).")
    if not no_clusters:
        items += _q3_knn_disagreement(reps["original"], reps[f"{n}_reconstruction"], survives)
    pcs = _largest_pca(reps)
    if pcs:
        items.append(_compare_scores(reps, pcs, f"{n}_reconstruction", f"the top {reps[pcs]['dims']} PCs of the input", f"the {n} reconstruction"))
    summary = SummaryLine(
        "Q3",
        ("no cluster structure to keep: the labels form no k-means clusters in the original data" if no_clusters
         else f"the clusters survive the {n} reconstruction" if survives else f"the {n} reconstruction loses cluster structure"),
        f"k-means ARI {_ari(reconstruction)} on the reconstruction vs {_ari(original)} on the original",
    )
    return Section(summary=summary, findings=items, run=n,
                   tables={"scores": _score_rows(reps, ["original", pcs, f"{n}_reconstruction", f"{n}_latent"])})


def _q3_knn_disagreement(original: dict, reconstruction: dict, survives: bool) -> list[Finding]:
    """A finding when 15-NN label accuracy gives the other verdict than k-means ARI (else none)."""
    if "knn_accuracy" not in original or "knn_accuracy" not in reconstruction:
        return []
    before, after = original["knn_accuracy"], reconstruction["knn_accuracy"]
    knn_survives = before - after <= SURVIVES_KNN_DROP
    if knn_survives == survives:
        return []
    if survives:
        return [f"15-nearest-neighbour label accuracy, which does not depend on k-means finding round clusters, "
                f"disagrees: it falls from {before:.3f} on the original to {after:.3f} on the reconstruction "
                f"(more than {SURVIVES_KNN_DROP}), so the labels mix more in the reconstruction's neighbourhoods."]
    change = "not lower" if after >= before else f"at most {SURVIVES_KNN_DROP} lower"
    return [f"15-nearest-neighbour label accuracy, which does not depend on k-means finding round clusters, "
            f"disagrees: {after:.3f} on the reconstruction vs {before:.3f} on the original ({change}), so the labels stay apart in the reconstruction's neighbourhoods "
            "even where k-means does not recover them."]


# ---------------------------------------------------------------- Q4
def _section_q4(result: StudyResult) -> Section | None:
    run = _roles(result)["q4"]
    if run is None:
        return None
    n, reps = run.spec.name, result.representations
    r = reps[f"{n}_latent"]
    acc = r["linear_accuracy"]
    verdict = (
        "largely linearly separable" if acc >= SEPARABLE_ACCURACY
        else "partly separable" if acc >= PARTLY_SEPARABLE_ACCURACY
        else "not separable"
    )
    chance = 1.0 / len(result.dataset.classes)
    items: list[Finding] = [
        (f"The 2-D latent space is {verdict}: a logistic regression fitted on the training cells' 2-D codes "
         f"classifies the held-out cells with balanced accuracy {acc:.3f} (chance: {chance:.3f}; ≥ {SEPARABLE_ACCURACY} "
         f"counts as largely separable, ≥ {PARTLY_SEPARABLE_ACCURACY} as partly)."),
        f"k-means in the 2-D latent: ARI {_ari(r['ari'])} ± {r['ari_std']:.3f}, NMI {r['nmi']:.3f}; silhouette of the labels {r['silhouette']:.3f}.",
    ]
    evidence = f"a linear classifier's balanced accuracy on the test cells is {acc:.3f} (chance {chance:.3f}"
    if "original_pca2" in reps:
        items.append(_compare_scores(reps, "original_pca2", f"{n}_latent", "the first two PCs", f"the {n} latent"))
        p = reps["original_pca2"]["linear_accuracy"]
        items.append(f"Linear accuracy: {acc:.3f} in the 2-D latent vs {p:.3f} in the first two PCs "
                     f"({'the autoencoder separates better' if acc > p + 0.01 else 'PCA separates better' if p > acc + 0.01 else 'no clear difference'}).")
        evidence += f"; in the first two PCs {p:.3f}"
    return Section(
        summary=SummaryLine("Q4", f"the 2-D latent of {n} is {verdict}", evidence + ")"),
        findings=items, run=n,
        tables={"scores": _score_rows(reps, [f"{n}_latent", "original_pca2", "original"])},
    )


# ---------------------------------------------------------------- Q5
def _structure_verdict(reps: dict, run: str, reference: str, kind: str) -> tuple[str, int, int]:
    """Whether ``run``'s latent or reconstruction keeps the populations better than ``reference``'s:
    ``(word, scores up, scores down)`` over ARI, NMI and silhouette, beyond their noise."""
    return _verdict(reps[f"{run}_{kind}"], reps[f"{reference}_{kind}"], ("ari", "nmi", "silhouette"))


def _decisive_scores(a: dict, b: dict, scores: tuple[str, ...]) -> list[str]:
    """The ``scores`` (of those both have) on which ``a`` and ``b`` differ beyond their noise (:func:`_noise`)."""
    return [s for s in scores if s in a and s in b
            and (a[s] > b[s] + _noise(a, b, s) or a[s] < b[s] - _noise(a, b, s))]


def _scores_evidence(a: dict, b: dict, scores: tuple[str, ...]) -> str:
    """``a`` vs ``b`` on the scores that differ beyond their noise, or on k-means ARI, said to be within it."""
    decisive = _decisive_scores(a, b, scores)
    text = ", ".join(f"{SCORE_LABELS[s]} {a[s]:.3f} vs {b[s]:.3f}" for s in decisive or ["ari"])
    return text if decisive else text + ", within noise"


def _verdict(a: dict, b: dict, scores: tuple[str, ...]) -> tuple[str, int, int]:
    """Whether representation ``a`` scores better than ``b``: ``(word, scores up, scores down)``
    over ``scores`` (those both have), each beyond its noise (:func:`_noise`)."""
    decisive = _decisive_scores(a, b, scores)
    up = [s for s in decisive if a[s] > b[s]]
    down = [s for s in decisive if a[s] < b[s]]
    if up and not down:
        return "better", len(up), len(down)
    if down and not up:
        return "worse", len(up), len(down)
    return ("mixed" if up else "no clear difference"), len(up), len(down)


def _section_q5(result: StudyResult) -> Section | None:
    roles = _roles(result)
    run, ref = roles["q5"], roles["q5_reference"]
    if run is None:
        return None
    n, reps = run.spec.name, result.representations
    items: list[Finding] = []
    rows = [[x.spec.name, x.spec.loss, _f(x.errors["test"]["mse"]), _f(x.errors["test"]["nonzero_mse"]),
             _f(x.errors["train"]["mse"]), _f(x.errors["train"]["nonzero_mse"])] for x in ([run, ref] if ref else [run])]
    if ref is not None:
        m = ref.spec.name
        e, f_ = run.errors["test"], ref.errors["test"]
        items.append(
            f"On the nonzero entries, {n}'s test MSE is {_than(e['nonzero_mse'], f_['nonzero_mse'])} {m}'s "
            f"({_f(e['nonzero_mse'])} vs {_f(f_['nonzero_mse'])}); over all entries it is "
            f"{_pct_change(e['mse'], f_['mse'])} ({_f(e['mse'])} vs {_f(f_['mse'])})."
        )
        if "higher" in _pct_change(e["mse"], f_["mse"]):  # not when the two print the same
            items.append(f"{n} is not penalised for what it predicts where the input is zero, so its all-entries error "
                         "includes the zeros it fills in (which a denoising view may want, but MSE counts as error).")
        for kind in ("latent", "reconstruction"):
            items.append(_compare_scores(reps, f"{m}_{kind}", f"{n}_{kind}", f"{m} {kind}", f"{n} {kind}"))
        verdicts = {kind: _structure_verdict(reps, n, m, kind) for kind in ("latent", "reconstruction")}
        answer: list[str | Strong] = ["Does the nonzero loss capture structure better? "]
        for i, (kind, (word, up, down)) in enumerate(verdicts.items()):
            detail = (f"{up} of 3 scores (ARI, NMI, silhouette) higher and {down} lower by more than "
                      "the k-means seed spread (at least 0.02) or, for the silhouette, 0.01")
            answer += ["Its " if i == 0 else "; its ", Strong(kind)]
            answer.append(f" keeps the populations {word} than {m}'s ({detail})" if word in ("better", "worse")
                          else f": {word} ({detail})")
        items.append((*answer, "."))
        summary = SummaryLine(
            "Q5",
            ", ".join(f"{word} in the {kind}" for kind, (word, _, _) in verdicts.items()) + f" ({n} vs {m})",
            "; ".join(f"{kind}: " + _scores_evidence(reps[f"{n}_{kind}"], reps[f"{m}_{kind}"], ("ari", "nmi", "silhouette"))
                      for kind in verdicts)
            + f"; test nonzero MSE {_f(e['nonzero_mse'])} vs {_f(f_['nonzero_mse'])}",
        )
    else:
        summary = SummaryLine(
            "Q5", f"no MSE run with latent size {run.spec.latent_dim} to compare {n} with",
            f"k-means ARI {_ari(reps[f'{n}_latent']['ari'])} in its latent vs {_ari(reps['original']['ari'])} on the original",
        )
    items.append(_compare_scores(reps, "original", f"{n}_latent", "the original data", f"the {n} latent"))
    if ref is not None:
        items += _q5_knn_disagreements(reps, n, ref.spec.name, verdicts)
    keys = ["original", f"{n}_latent", f"{ref.spec.name}_latent" if ref else "",
            f"{n}_reconstruction", f"{ref.spec.name}_reconstruction" if ref else ""]
    return Section(summary=summary, findings=items, run=n, tables={"errors": rows, "scores": _score_rows(reps, keys)})


def _q5_knn_disagreements(reps: dict, run: str, reference: str, verdicts: dict) -> list[Finding]:
    """A finding for each of latent and reconstruction where 15-NN label accuracy points the other
    way than the verdict from ARI, NMI and silhouette (none where it agrees or that is mixed)."""
    items: list[Finding] = []
    for kind, (word, _, _) in verdicts.items():
        a, b = reps[f"{run}_{kind}"], reps[f"{reference}_{kind}"]
        if word == "mixed" or "knn_accuracy" not in a or "knn_accuracy" not in b:
            continue
        knn_word, _, _ = _verdict(a, b, ("knn_accuracy",))
        if knn_word == word:
            continue
        direction = {"better": "higher", "worse": "lower"}.get(knn_word, "about the same")
        items.append(f"15-nearest-neighbour label accuracy of the {kind} is {direction} for {run} than for {reference} "
                     f"({a['knn_accuracy']:.3f} vs {b['knn_accuracy']:.3f}; differences within {KNN_NOISE} count as the "
                     f"same), unlike the verdict from ARI, NMI and silhouette ({word}).")
    return items


# ---------------------------------------------------------------- Beyond the assignment
LIKELIHOOD_WORDS = {
    "mse": "squared error (MSE) on the log-normalised input",
    "nonzero_mse": "squared error over the nonzero entries of the log-normalised input",
    "poisson": "Poisson likelihood",
    "nb": "negative-binomial likelihood (a dispersion per gene)",
    "zinb": "zero-inflated negative-binomial likelihood (a dispersion per gene, a dropout probability per entry)",
}
"""How the model description names each loss."""
LR_SCHEDULE_WORDS = {
    "plateau": "the learning rate halved whenever the monitored loss stalled for 4 epochs",
    "cosine": "the learning rate following a half cosine down to 1%",
}


def _beyond_run(result: StudyResult) -> RunResult | None:
    """The trained run of a named preset (the recommended model), if any."""
    return next((r for r in result.runs.values() if r.spec.preset is not None), None)


def _beyond_skipped(result: StudyResult) -> tuple[str, str] | None:
    """``(run, reason)`` when the study's preset run could not train on this input."""
    for spec in result.config.runs:
        if spec.preset is not None and spec.name in result.skipped_runs:
            return spec.name, result.skipped_runs[spec.name].rstrip(".")
    return None


def _closest(runs: list[RunResult], latent_dim: int) -> RunResult | None:
    """The run whose latent size is closest to ``latent_dim`` (the smaller one on a tie)."""
    return min(runs, key=lambda r: (abs(r.spec.latent_dim - latent_dim), r.spec.latent_dim)) if runs else None


def _beyond_references(result: StudyResult, run: RunResult) -> dict:
    """What the recommended run is compared with: the input's PCs and the assignment's MSE and
    nonzero-MSE runs, each of the latent size closest to the run's (PCA-10, ae10, ae10_nonzero)."""
    reps, d = result.representations, run.spec.latent_dim
    pcs = [k for k in reps if k.startswith("original_pca")]
    return {
        "pca": min(pcs, key=lambda k: (abs(reps[k]["dims"] - d), reps[k]["dims"])) if pcs else None,
        "mse": _closest(_runs_where(result, "mse"), d),
        "nonzero": _closest(_runs_where(result, "nonzero_mse"), d),
    }


def _model_description(run: RunResult) -> list[str]:
    """What the model is, in sentences built from its parameters and training record."""
    from scae.presets import RECOMMENDED  # what "recommended" meant when this report was written

    p = run.model.get_params()
    spec = run.spec
    preset = spec.preset if spec.preset != "recommended" else f"recommended, i.e. {RECOMMENDED}"
    kind = "A variational autoencoder (Gaussian latent, KL term" if p.get("variational") else "An autoencoder"
    if p.get("variational"):
        warmup = p.get("kl_warmup_epochs", 0)
        kind += f" weighted up from 0 over {warmup} epochs)" if warmup else ")"
    counts = spec.counts
    objective = LIKELIHOOD_WORDS.get(spec.loss, f"{spec.loss} loss")
    if counts and p.get("log_mse_weight", 0):
        objective += (f" plus {p['log_mse_weight']:g} × the squared error of the log-normalised reconstruction "
                      "(per entry)")
    lines = [f"{kind} trained on {'the raw counts' if counts else 'the input matrix'} with a "
             f"{objective} (preset {preset})."]
    widths = [str(w) for w in p["hidden"]]
    network = f"Network: genes → {' → '.join([*widths, str(p['latent_dim']), *reversed(widths)])} → genes, {p['activation']}"
    extras = []
    if p.get("norm", "none") != "none":
        extras.append(f"{p['norm']} normalisation")
    if p.get("dropout", 0):
        extras.append(f"dropout {p['dropout']:g}")
    network += (" with " + " and ".join(extras) if extras else "") + " on the hidden layers"
    if p.get("scale_input"):
        network += "; the encoder's input is standardised per gene"
    if p.get("input_noise", 0):
        network += f"; Gaussian noise of sd {p['input_noise']:g} is added to its input while training"
    lines.append(network + ".")
    optimiser = f"AdamW (weight decay {p['weight_decay']:g})" if p.get("weight_decay", 0) else "Adam"
    training = f"Training: {optimiser}, learning rate {p['learning_rate']:g}, batch {p['batch_size']}"
    if p.get("lr_schedule", "none") in LR_SCHEDULE_WORDS:
        training += ", " + LR_SCHEDULE_WORDS[p["lr_schedule"]]
    trained = len(run.model.history_) - 1
    if p.get("early_stopping") and run.model.best_epoch_ is not None:
        stop = "stopped early" if trained < p["epochs"] else "did not stop early"
        training += (f"; early stopping on a held-out {p['validation_fraction'] * 100:g}% of the training cells "
                     f"(patience {p['patience']} epochs): it trained {trained} of at most {p['epochs']} epochs "
                     f"({stop}) and kept the weights of epoch {run.model.best_epoch_}")
    else:
        training += f"; {trained} epoch{'s' if trained != 1 else ''}"
    lines.append(training + ".")
    if counts:
        lines.append("Its reconstruction is log1p(expected proportion of the library × 10⁴): the scale of the "
                     "MSE runs' log-normalised input, so its MSEs and scores compare with theirs.")
    return lines


def _best_of(reps: dict, keys: list[str], score: str, names: dict[str, str]) -> Finding:
    """Which of ``keys`` scores highest on ``score``, and by how much over the next one."""
    label = {"ari": "k-means ARI", "knn_accuracy": "15-nearest-neighbour label accuracy"}[score]
    ranked = sorted((k for k in keys if score in reps[k]), key=lambda k: reps[k][score], reverse=True)
    if len(ranked) < 2:
        return ""
    best, second = reps[ranked[0]], reps[ranked[1]]
    lead, noise = best[score] - second[score], _noise(best, second, score)
    head: list[str | Strong] = [f"Highest {label} of these representations: ", Strong(names[ranked[0]]),
                                f" ({best[score]:.3f}), "]
    if lead <= noise:
        spread = "the k-means seed spread" if score == "ari" else "the noise threshold"
        return (*head, f"but {names[ranked[1]]} ({second[score]:.3f}) is within {spread} of it ({noise:.3f}).")
    return (*head, f"{lead:.3f} above the next, {names[ranked[1]]} ({second[score]:.3f}).")


def _versus(reps: dict, a: str, b: str, name_a: str, name_b: str) -> tuple[Finding, str]:
    """One finding comparing representations ``a`` and ``b`` on every score, and the verdict word."""
    ra, rb = reps[a], reps[b]
    labels = {"ari": "ARI", "nmi": "NMI", "silhouette": "silhouette", "knn_accuracy": "15-NN accuracy"}
    scores = [s for s in SCORES if s in ra and s in rb]
    word, up, down = _verdict(ra, rb, tuple(scores))
    numbers = ", ".join(f"{labels[s]} {ra[s]:.3f} vs {rb[s]:.3f}" for s in scores)
    return (f"{name_a} vs {name_b}: {numbers} — ", Strong(word),
            f": {up} of {len(scores)} scores higher and {down} lower beyond their noise."), word


def _verdict_phrase(word: str, other: str) -> str:
    """What follows 'the latent is': 'better than X' / 'worse than X' / 'better than X on some scores and
    worse on others' / 'about as good as X'."""
    if word in ("better", "worse"):
        return f"{word} than {other}"
    return f"better than {other} on some scores and worse on others" if word == "mixed" else f"about as good as {other}"


def _denoising_rows(result: StudyResult) -> list[list[str]]:
    """Rows of the hidden-entry recovery table: every run, then the baselines."""
    scores = result.denoising["scores"]
    rows = []
    for name, s in scores.items():
        rows.append([name, _method_description(result, name), _f(s["median_abs_error"]), _f(s["mean_abs_error"]),
                     f"{s['pearson']:.3f}", f"{s['spearman']:.3f}"])
    return rows


def _method_description(result: StudyResult, name: str) -> str:
    """What a denoising method is: a run (its loss, preset), or a baseline."""
    if name in result.runs:
        spec = result.runs[name].spec
        kind = "variational autoencoder" if result.runs[name].model.get_params().get("variational") else "autoencoder"
        return f"{spec.loss} {kind}" + (f" (preset {spec.preset})" if spec.preset else "")
    if name == "gene_mean":
        return "baseline: each gene's mean over training cells"
    if name.startswith("pca") and name[3:].isdigit():
        return f"baseline: PCA with {name[3:]} components fitted on training cells"
    return "baseline"


def _error_text(x: float) -> str:
    return _f(x, 3)


def _correlation_text(x: float) -> str:
    return f"{x:.3f}"


def _denoising_findings(result: StudyResult, run: RunResult | None) -> list[Finding]:
    """Which model recovers the hidden entries best, and whether it (and the recommended model)
    beat both baselines, on median absolute error and on Pearson correlation."""
    import math

    scores = {k: v for k, v in result.denoising["scores"].items() if math.isfinite(v["median_abs_error"])}
    models = [k for k in scores if k in result.runs]
    baselines = [k for k in scores if k not in result.runs]
    if not models:
        return []
    items: list[Finding] = []
    for metric, label, lower in (("median_abs_error", "median |error|", True), ("pearson", "Pearson correlation", False)):
        ranked = sorted(models, key=lambda k: scores[k][metric], reverse=not lower)
        best = ranked[0]
        value = scores[best][metric]
        show = _error_text if lower else _correlation_text
        text: list[str | Strong] = [f"{'Lowest' if lower else 'Highest'} {label} on the hidden entries among the models: ",
                                    Strong(best), f" ({show(value)})"]
        if len(ranked) > 1:
            nxt = scores[ranked[1]][metric]
            change = _pct_change(value, nxt)
            relation = "the same as" if change == "the same" else f"{change} than"
            text.append(f", {relation} the next, {ranked[1]} ({show(nxt)})"
                        if lower else f", {value - nxt:.3f} above the next, {ranked[1]} ({show(nxt)})")
        if baselines:
            beaten = [b for b in baselines if (value < scores[b][metric] if lower else value > scores[b][metric])]
            against = ", ".join(f"{b} {show(scores[b][metric])}" for b in baselines)
            verdict = ("it beats both baselines" if len(beaten) == len(baselines) == 2
                       else "it beats every baseline" if len(beaten) == len(baselines)
                       else "it beats neither baseline" if not beaten and len(baselines) == 2
                       else f"it beats {', '.join(beaten)} only" if beaten else "it beats no baseline")
            text.append(f"; {verdict} ({against}).")
        else:
            text.append(".")
        items.append(tuple(text))
        if run is not None and run.spec.name in scores and run.spec.name != best:
            mine = scores[run.spec.name][metric]
            items.append(f"{run.spec.name}: {label} {show(mine)}, rank {ranked.index(run.spec.name) + 1} of "
                         f"{len(ranked)} models.")
    return items


def _beyond_summary(result: StudyResult, run: RunResult, refs: dict, names: dict[str, str]) -> SummaryLine:
    """The recommended latent against the same-size PCA and MSE run, and its hidden-entry recovery."""
    reps, n = result.representations, run.spec.name
    latent = reps[f"{n}_latent"]
    others = [(key, names[key]) for key in (refs["pca"], refs["mse"] and f"{refs['mse'].spec.name}_latent") if key]
    answer = f"the {n} latent is " + ", ".join(
        _verdict_phrase(_verdict(latent, reps[key], SCORES)[0], name) for key, name in others
    ) if others else f"the {n} model"
    evidence_parts = []
    # the scores behind the verdicts: those differing beyond their noise from one of the others
    # (none: 15-NN accuracy and k-means ARI, said to be within it)
    decisive = [s for s in SCORES if any(s in _decisive_scores(latent, reps[key], SCORES) for key, _ in others)]
    for score in decisive or ["knn_accuracy", "ari"]:
        label = SCORE_LABELS[score]
        if score in latent:
            vs = " and ".join(f"{reps[key][score]:.3f} ({name})" for key, name in others if score in reps[key])
            evidence_parts.append(f"{label} {latent[score]:.3f}" + (f" vs {vs}" if vs else ""))
    if others and not decisive and evidence_parts:
        evidence_parts[-1] += " (differences within the scores' noise)"
    denoising = result.denoising["scores"] if result.denoising else {}
    if n in denoising:
        mine = denoising[n]["median_abs_error"]
        baselines = [k for k in denoising if k not in result.runs]
        vs = " and ".join(f"{_f(denoising[b]['median_abs_error'], 3)} ({b})" for b in baselines)
        evidence_parts.append(f"median |error| on hidden entries {_f(mine, 3)}" + (f" vs {vs}" if vs else ""))
    return SummaryLine("Beyond", answer, "; ".join(evidence_parts) if evidence_parts else "no scores")


def _section_beyond(result: StudyResult) -> Section | None:
    """The recommended model next to PCA and the assignment's runs, and hidden-entry recovery of
    every run; a one-line reason when the run could not train; ``None`` when there is nothing to show."""
    run, skipped = _beyond_run(result), _beyond_skipped(result)
    if run is None and skipped is None and result.denoising is None:
        return None
    facts: dict[str, object] = {"skipped": skipped, "model": [], "denoising": None}
    tables: dict[str, list[list[str]]] = {}
    items: list[Finding] = []
    summary = None
    if skipped is not None:
        summary = SummaryLine("Beyond", f"{skipped[0]} was not trained", skipped[1])
    if run is not None:
        n, reps = run.spec.name, result.representations
        refs = _beyond_references(result, run)
        mse, nonzero, pca = refs["mse"], refs["nonzero"], refs["pca"]
        names = {"original": "the input", f"{n}_latent": f"{n} latent", f"{n}_reconstruction": f"{n} reconstruction"}
        if pca:
            names[pca] = f"the top {reps[pca]['dims']} PCs"
        for ref in (mse, nonzero):
            if ref is not None:
                names.update({f"{ref.spec.name}_{kind}": f"{ref.spec.name} {kind}" for kind in ("latent", "reconstruction")})
        keys = [k for k in ["original", pca,
                            *(f"{r.spec.name}_latent" for r in (mse, nonzero) if r), f"{n}_latent",
                            *(f"{r.spec.name}_reconstruction" for r in (mse, nonzero) if r), f"{n}_reconstruction"]
                if k and k in reps]
        facts["model"] = _model_description(run)
        tables["scores"] = _score_rows(reps, keys)
        for score in ("ari", "knn_accuracy"):
            if best := _best_of(reps, keys, score, names):
                items.append(best)
        comparisons = [(f"{n}_latent", pca)] + [(f"{n}_{kind}", f"{r.spec.name}_{kind}")
                                                for kind in ("latent", "reconstruction") for r in (mse, nonzero) if r]
        for a, b in comparisons:
            if b and a in reps and b in reps:
                items.append(_versus(reps, a, b, names[a], names[b])[0])
        if mse is not None:
            e, f_ = run.errors["test"], mse.errors["test"]
            items.append(f"Test MSE on the log-normalised scale: {n} {_f(e['mse'])} vs {mse.spec.name} {_f(f_['mse'])} "
                         f"({_pct_change(e['mse'], f_['mse'])}); over the nonzero entries {_f(e['nonzero_mse'])} vs "
                         f"{_f(f_['nonzero_mse'])} ({_pct_change(e['nonzero_mse'], f_['nonzero_mse'])}).")
        summary = _beyond_summary(result, run, refs, names)
    if result.denoising is not None:
        d = result.denoising
        facts["denoising"] = {"percent": f"{d['fraction'] * 100:g}", "n_cells": d["n_cells"], "n_hidden": d["n_hidden"],
                              "scale": d["scale"], "not_measured": d.get("not_measured")}
        tables["denoising"] = _denoising_rows(result)
        items += _denoising_findings(result, run)
    return Section(summary=summary, findings=items, tables=tables, run=run.spec.name if run else "", facts=facts)


# ---------------------------------------------------------------- the page
def _input_facts(result: StudyResult, metrics: dict) -> dict:
    """How the models saw the input, where it was read from, and where reconstructions are kept."""
    env = metrics.get("environment", {})
    return {
        "raw_counts": bool(metrics["dataset"].get("raw_counts")),
        "on_disk": bool(result.dataset.on_disk),
        "n_scored": int(result.embed_idx.size),
        "n_pcs": int(result.views["X_pca"].shape[1]),
        "n_sample_rows": None if result.sample_rows is None else int(result.sample_rows.size),
        "device": str(env.get("device")) if env else None,
        "processes": env.get("processes", 1),
        "genes": result.genes,
        "skipped_runs": [(name, reason.rstrip(".")) for name, reason in result.skipped_runs.items()],
    }


def _train_only_labels(metrics: dict) -> list[tuple[str, int]]:
    """Labels with too few cells for a test share, which are in the training cells only."""
    labels = metrics["split"].get("train_only_labels") or {}
    return [(str(label), int(n)) for label, n in labels.items()]


def summary_lines(result: StudyResult) -> list[SummaryLine]:
    """One line per question whose runs exist: its answer and the number behind it."""
    return [s.summary for s in _sections(result).values() if s is not None and s.summary is not None]


def _sections(result: StudyResult) -> dict[str, Section | None]:
    return {
        "q1": _section_q1(result),
        "q2": _section_q2(result),
        "q3": _section_q3(result),
        "q4": _section_q4(result),
        "q5": _section_q5(result),
        "beyond": _section_beyond(result),
    }


def build_report(result: StudyResult, metrics: dict, images: dict[str, bytes]) -> str:
    """The complete report as one HTML string (figures embedded as PNG data URIs)."""
    d = metrics["dataset"]
    cfg = result.config
    sections = _sections(result)
    context = {
        "version": __version__,
        "dataset": {
            "name": d["name"],
            "n_cells": d["n_cells"],
            "n_genes": d["n_genes"],
            "storage": d["storage"],
            "zero_percent": f"{d['zero_fraction'] * 100:.1f}",
            "value_min": f"{d['value_min']:.3g}",
            "value_max": f"{d['value_max']:.3g}",
            "label_counts": list(d["label_counts"].items()),
            "scale_note": d.get("scale_note"),
        },
        "input": _input_facts(result, metrics),
        "split": metrics["split"],
        "train_only_labels": _train_only_labels(metrics),
        "config": {
            "seed": cfg.seed,
            "encoder": " → ".join(map(str, cfg.hidden)),
            "decoder": " → ".join(map(str, reversed(cfg.hidden))),
            "activation": cfg.activation,
            "learning_rate": cfg.learning_rate,
            "batch_size": cfg.batch_size,
            "epochs": cfg.epochs,
            "kmeans_seeds": cfg.kmeans_seeds,
        },
        "summary": [s.summary for s in sections.values() if s is not None and s.summary is not None],
        **sections,
        "all_scores": _score_rows(result.representations, list(result.representations)),
        "n_labels": len(result.dataset.classes),
        "timings": [(k, f"{v:.2f}") for k, v in metrics["timings"].items()],
        "images": {stem: base64.b64encode(data).decode("ascii") for stem, data in images.items()},
    }
    return render_template(TEMPLATE, context)


def render_template(name: str, context: dict) -> str:
    """Render one of scae's Jinja2 templates (autoescaping on)."""
    return _environment().get_template(name).render(context)


@cache
def _environment() -> jinja2.Environment:
    """The template environment: autoescaping on, undefined names an error (not empty text)."""
    import jinja2  # imported when a report is written, not when the package is

    return jinja2.Environment(
        loader=jinja2.PackageLoader("scae", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
