"""The self-contained HTML report: one section per question, findings written from the numbers.

Every sentence in a finding is chosen by comparing measured values of this run; nothing is
asserted that the numbers do not show. All text that comes from user files is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING

from scae import __version__

if TYPE_CHECKING:
    from scae.results import RunResult, StudyResult

SURVIVES_ARI_DROP = 0.05
"""A reconstruction 'keeps' the clusters when its k-means ARI is at most this much below the input's."""
SEPARABLE_ACCURACY = 0.9
PARTLY_SEPARABLE_ACCURACY = 0.7


# ---------------------------------------------------------------- which runs answer which question
def _runs_where(result: StudyResult, loss: str, latent=None) -> list[RunResult]:
    return [
        r
        for r in result.runs.values()
        if r.spec.loss == loss and (latent is None or latent(r.spec.latent_dim))
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
    latent_panels = []
    for name, run in result.runs.items():
        if run.spec.latent_dim > 2:
            latent_panels.append((f"{name} latent (PCA)", f"X_{name}_pca", pc))
        else:
            latent_panels.append((f"{name} latent", f"X_{name}", ("z1", "z2")))
    plan["latent_pca_all"] = _scatter("PCA of every latent space", latent_panels)
    return plan


def _scatter(title: str, panels: list[tuple]) -> dict:
    return {"kind": "scatter", "title": title, "panels": [(t, k, a or ("t-SNE 1", "t-SNE 2")) for t, k, a in panels]}


# ---------------------------------------------------------------- formatting helpers
def _f(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _pct_change(new: float, old: float) -> str:
    """'12.3% lower' / '4.0% higher' of ``new`` relative to ``old``."""
    if old == 0:
        return "different"
    change = (new - old) / abs(old) * 100
    if abs(change) < 0.05:
        return "the same"
    return f"{abs(change):.1f}% {'lower' if change < 0 else 'higher'}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(images: dict[str, bytes], stem: str, caption: str) -> str:
    if stem not in images:
        return ""
    data = base64.b64encode(images[stem]).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)} (<code>figures/{stem}.png</code>)</figcaption></figure>"
    )


def _findings(items: list[str]) -> str:
    return "<div class='findings'><h3>Findings</h3><ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul></div>"


def _score_rows(reps: dict, keys: list[str]) -> list[list[str]]:
    rows = []
    for key in keys:
        if key not in reps:
            continue
        r = reps[key]
        rows.append([
            html.escape(r["description"]),
            str(r["dims"]),
            f"{r['ari']:.3f} ± {r['ari_std']:.3f}",
            f"{r['nmi']:.3f} ± {r['nmi_std']:.3f}",
            f"{r['silhouette']:.3f}",
            f"{r['linear_accuracy']:.3f}" if "linear_accuracy" in r else "–",
        ])
    return rows


SCORE_HEADER = ["representation", "dims", "k-means ARI", "k-means NMI", "silhouette (labels)", "linear accuracy (test cells)"]


def _noise(ra: dict, rb: dict, score: str) -> float:
    """Smallest difference in ``score`` between two representations that counts as real."""
    if score == "silhouette":
        return 0.01
    return max(0.02, ra[f"{score}_std"] + rb[f"{score}_std"])


def _compare_scores(reps: dict, a: str, b: str, name_a: str, name_b: str) -> str:
    """One sentence comparing the cluster scores of representations ``a`` and ``b``."""
    ra, rb = reps[a], reps[b]
    d_ari = rb["ari"] - ra["ari"]
    noise = _noise(ra, rb, "ari")
    if abs(d_ari) <= noise:
        ari_text = f"k-means ARI is about the same ({ra['ari']:.3f} vs {rb['ari']:.3f}; the difference is within the k-means seed spread of {noise:.3f})"
    else:
        ari_text = f"k-means ARI {'rises' if d_ari > 0 else 'falls'} from {ra['ari']:.3f} ({name_a}) to {rb['ari']:.3f} ({name_b})"
    d_sil = rb["silhouette"] - ra["silhouette"]
    sil_text = (
        f"the labels' silhouette {'rises' if d_sil > 0 else 'falls'} from {ra['silhouette']:.3f} to {rb['silhouette']:.3f}"
        if abs(d_sil) >= 0.01
        else f"the labels' silhouette is unchanged at about {rb['silhouette']:.3f}"
    )
    return f"From {html.escape(name_a)} to {html.escape(name_b)}: {ari_text}; NMI goes from {ra['nmi']:.3f} to {rb['nmi']:.3f}; {sil_text}."


# ---------------------------------------------------------------- sections
def _faster(a: RunResult, b: RunResult, attribute: str, what: str) -> str:
    """Which of two runs got somewhere first, by the epoch stored in ``attribute``."""
    ea, eb = getattr(a, attribute), getattr(b, attribute)
    if ea is None or eb is None:
        stalled = a if ea is None else b
        return f"{stalled.spec.name}'s test loss never went below its starting value."
    if ea == eb:
        return f"Both {a.spec.name} and {b.spec.name} {what} at epoch {ea}."
    fast, slow = (a, b) if ea < eb else (b, a)
    return (f"{fast.spec.name} {what} at epoch {getattr(fast, attribute)}, {slow.spec.name} at epoch "
            f"{getattr(slow, attribute)}: {fast.spec.name} is faster by {abs(ea - eb)} epoch(s).")


def _section_q1(result: StudyResult, images: dict) -> str:
    runs = _roles(result)["q1"]
    if not runs:
        return ""
    items = []
    (a, b) = runs
    items.append(_faster(a, b, "convergence_epoch", "reached 95% of its total test-loss decrease"))
    items.append(_faster(a, b, "near_best_epoch", "got within 1% of its lowest test loss"))
    for r in runs:
        h = r.model.history_
        last, best = h[-1], min(h[1:], key=lambda row: row["test_loss"])
        gap = last["test_loss"] - last["train_loss"]
        text = (
            f"{r.spec.name}: final training loss {_f(last['train_loss'])}, final test loss {_f(last['test_loss'])} "
            f"(test − train = {_f(gap, 3)}); lowest test loss {_f(best['test_loss'])} at epoch {best['epoch']}"
        )
        rise = (last["test_loss"] - best["test_loss"]) / best["test_loss"]
        train_at_best = h[best["epoch"]]["train_loss"]
        if best["epoch"] < last["epoch"] and rise > 0.01:
            if last["train_loss"] < train_at_best:
                text += (f", after which it rose by {rise * 100:.1f}% while the training loss kept falling "
                         f"({_f(train_at_best)} → {_f(last['train_loss'])}): the model overfits the training cells.")
            else:
                text += f", after which it rose by {rise * 100:.1f}% (the training loss did not fall either)."
        elif last["test_loss"] < h[-2]["test_loss"] - 0.001 * abs(h[-2]["test_loss"]):
            text += "; the test loss was still falling in the last epoch, so more epochs could help."
        else:
            text += "; the test loss has levelled off."
        items.append(text)
    la, lb = a.model.history_[-1]["test_loss"], b.model.history_[-1]["test_loss"]
    items.append(f"{b.spec.name}'s final test loss is {_pct_change(lb, la)} than {a.spec.name}'s.")
    return (
        "<section><h2>Q1 · Training and test loss: which latent size converges faster?</h2>"
        "<p>Loss per epoch of the runs with latent sizes "
        + " and ".join(str(r.spec.latent_dim) for r in runs)
        + ". Epoch 0 is the untrained network. The training loss of an epoch is the mean of its minibatch "
        "losses; the test loss is computed on all held-out cells after the epoch. Convergence epoch: the "
        "first epoch at which the test loss has made 95% of its total decrease (from epoch 0 to its minimum); "
        "the first epoch within 1% of the lowest test loss is shown too"
        + (" (here the 95% point comes within the first two epochs, which remove most of the untrained error, so "
           "the 1% measure is the one that tells the runs apart)" if all((r.convergence_epoch or 99) <= 2 for r in runs) else "")
        + ".</p>"
        + _figure(images, "q1_loss_history", "Training and test loss per epoch")
        + _table(
            ["run", "convergence epoch (95%)", "epoch within 1% of best", "final train loss", "final test loss", "min test loss (epoch)"],
            [[r.spec.name, str(r.convergence_epoch), str(r.near_best_epoch), _f(r.model.history_[-1]["train_loss"]), _f(r.model.history_[-1]["test_loss"]),
              "{} ({})".format(_f(min(row["test_loss"] for row in r.model.history_[1:])), min(r.model.history_[1:], key=lambda row: row["test_loss"])["epoch"])] for r in runs],
        )
        + _findings(items)
        + "</section>"
    )


def _section_q2(result: StudyResult, images: dict) -> str:
    rows, items = [], []
    for name, r in result.runs.items():
        rows.append([name, str(r.spec.latent_dim), r.spec.loss, _f(r.errors["test"]["mse"]), _f(r.errors["train"]["mse"]),
                     _f(r.errors["test"]["nonzero_mse"]), _f(r.errors["train"]["nonzero_mse"]), str(r.convergence_epoch)])
    for name, e in result.pca_baselines.items():
        rows.append([f"PCA baseline ({name})", name[3:], "linear", _f(e["test"]["mse"]), _f(e["train"]["mse"]),
                     _f(e["test"]["nonzero_mse"]), _f(e["train"]["nonzero_mse"]), "–"])
    mse_runs = sorted(_runs_where(result, "mse"), key=lambda r: r.errors["test"]["mse"])
    if mse_runs:
        best = mse_runs[0]
        ranking = ", ".join(f"{r.spec.name} ({_f(r.errors['test']['mse'])})" for r in mse_runs)
        items.append(f"Lowest test MSE among the MSE-trained runs: {best.spec.name}. Ranking by test MSE: {ranking}.")
        by_dim = sorted(mse_runs, key=lambda r: r.spec.latent_dim)
        for small, large in zip(by_dim[:-1], by_dim[1:]):
            change = _pct_change(large.errors["test"]["mse"], small.errors["test"]["mse"])
            verdict = ("reconstructs about as well as" if change == "the same"
                       else "reconstructs better than" if "lower" in change else "reconstructs worse than")
            items.append(
                f"Latent {large.spec.latent_dim} {verdict} latent {small.spec.latent_dim}: its test MSE is "
                f"{_pct_change(large.errors['test']['mse'], small.errors['test']['mse'])}."
            )
    ev = result.explained_variance
    if ev and mse_runs:
        by_dim = sorted(mse_runs, key=lambda r: r.spec.latent_dim)
        ordered = all(a.errors["test"]["mse"] > b.errors["test"]["mse"] for a, b in zip(by_dim[:-1], by_dim[1:]))
        variance = ", ".join(f"{k} PCs explain {v * 100:.1f}%" for k, v in ev.items())
        if ordered:
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
        gap = _pct_change(r.errors["test"]["mse"], r.errors["train"]["mse"])
        items.append(f"{r.spec.name}: test MSE is {gap} than train MSE.")
    return (
        "<section><h2>Q2 · Reconstruction error: which model reconstructs better, and why?</h2>"
        "<p>Reconstruction MSE over all entries and over the nonzero entries of the input, on the held-out "
        "test cells and on the training cells, next to PCA reconstructions of the same size as a linear baseline.</p>"
        + _figure(images, "q2_test_mse_history", "Test MSE per epoch of every run")
        + _table(["model", "latent", "loss", "test MSE", "train MSE", "test nonzero MSE", "train nonzero MSE", "convergence epoch"], rows)
        + _findings(items)
        + "</section>"
    )


def _largest_pca(reps: dict) -> str:
    """Key of the input's largest PCA representation ('' when there is none)."""
    keys = [k for k in reps if k.startswith("original_pca")]
    return max(keys, key=lambda k: reps[k]["dims"]) if keys else ""


def _section_q3(result: StudyResult, images: dict) -> str:
    run = _roles(result)["q3"]
    if run is None:
        return ""
    n, reps = run.spec.name, result.representations
    items = [_compare_scores(reps, "original", f"{n}_reconstruction", "the original data", f"the {n} reconstruction")]
    drop = reps["original"]["ari"] - reps[f"{n}_reconstruction"]["ari"]
    if drop <= SURVIVES_ARI_DROP:
        items.append(f"The clusters survive reconstruction: k-means on the reconstruction agrees with the labels at least "
                     f"as well as on the original, within {SURVIVES_ARI_DROP} ARI.")
    else:
        items.append(f"The reconstruction loses cluster structure: its k-means ARI is {drop:.3f} below the original's.")
    pcs = _largest_pca(reps)
    if pcs:
        items.append(_compare_scores(reps, pcs, f"{n}_reconstruction", f"the top {reps[pcs]['dims']} PCs of the input", f"the {n} reconstruction"))
    return (
        f"<section><h2>Q3 · Do the clusters survive reconstruction? ({n})</h2>"
        "<p>Left: the input; right: its reconstruction. The PCA panels share the input's principal axes, so "
        "positions are directly comparable; each t-SNE is computed on its own data (top 50 PCs), with the same seed.</p>"
        + _figure(images, "q3_pca_original_vs_reconstruction", "PCA of original vs reconstruction")
        + _figure(images, "q3_tsne_original_vs_reconstruction", "t-SNE of original vs reconstruction")
        + _table(SCORE_HEADER, _score_rows(reps, ["original", pcs, f"{n}_reconstruction", f"{n}_latent"]))
        + _findings(items)
        + "</section>"
    )


def _section_q4(result: StudyResult, images: dict) -> str:
    run = _roles(result)["q4"]
    if run is None:
        return ""
    n, reps = run.spec.name, result.representations
    r = reps[f"{n}_latent"]
    acc = r["linear_accuracy"]
    verdict = (
        "largely linearly separable" if acc >= SEPARABLE_ACCURACY
        else "partly separable" if acc >= PARTLY_SEPARABLE_ACCURACY
        else "not separable"
    )
    chance = 1.0 / len(result.dataset.classes)
    items = [
        f"The 2-D latent space is {verdict}: a logistic regression fitted on the training cells' 2-D codes "
        f"classifies the held-out cells with balanced accuracy {acc:.3f} (chance: {chance:.3f}; ≥ {SEPARABLE_ACCURACY} "
        f"counts as largely separable, ≥ {PARTLY_SEPARABLE_ACCURACY} as partly).",
        f"k-means in the 2-D latent: ARI {r['ari']:.3f} ± {r['ari_std']:.3f}, NMI {r['nmi']:.3f}; silhouette of the labels {r['silhouette']:.3f}.",
    ]
    if "original_pca2" in reps:
        items.append(_compare_scores(reps, "original_pca2", f"{n}_latent", "the first two PCs", f"the {n} latent"))
        p = reps["original_pca2"]["linear_accuracy"]
        items.append(f"Linear accuracy: {acc:.3f} in the 2-D latent vs {p:.3f} in the first two PCs "
                     f"({'the autoencoder separates better' if acc > p + 0.01 else 'PCA separates better' if p > acc + 0.01 else 'no clear difference'}).")
    return (
        f"<section><h2>Q4 · Is the 2-D latent space separable? ({n})</h2>"
        + _figure(images, "q4_latent_2d", "2-D latent space")
        + _table(SCORE_HEADER, _score_rows(reps, [f"{n}_latent", "original_pca2", "original"]))
        + _findings(items)
        + "</section>"
    )


def _section_q5(result: StudyResult, images: dict) -> str:
    roles = _roles(result)
    run, ref = roles["q5"], roles["q5_reference"]
    if run is None:
        return ""
    n, reps = run.spec.name, result.representations
    items = []
    rows = [[x.spec.name, x.spec.loss, _f(x.errors["test"]["mse"]), _f(x.errors["test"]["nonzero_mse"]),
             _f(x.errors["train"]["mse"]), _f(x.errors["train"]["nonzero_mse"])] for x in ([run, ref] if ref else [run])]
    if ref is not None:
        m = ref.spec.name
        e, f_ = run.errors["test"], ref.errors["test"]
        items.append(
            f"On the nonzero entries, {n}'s test MSE is {_pct_change(e['nonzero_mse'], f_['nonzero_mse'])} than {m}'s "
            f"({_f(e['nonzero_mse'])} vs {_f(f_['nonzero_mse'])}); over all entries it is "
            f"{_pct_change(e['mse'], f_['mse'])} ({_f(e['mse'])} vs {_f(f_['mse'])})."
        )
        if e["mse"] > f_["mse"]:
            items.append(f"{n} is not penalised for what it predicts where the input is zero, so its all-entries error "
                         "includes the zeros it fills in (which a denoising view may want, but MSE counts as error).")
        for kind in ("latent", "reconstruction"):
            items.append(_compare_scores(reps, f"{m}_{kind}", f"{n}_{kind}", f"{m} {kind}", f"{n} {kind}"))
        verdicts = []
        for kind in ("latent", "reconstruction"):
            a, b = reps[f"{n}_{kind}"], reps[f"{m}_{kind}"]
            up = [s_ for s_ in ("ari", "nmi", "silhouette") if a[s_] > b[s_] + _noise(a, b, s_)]
            down = [s_ for s_ in ("ari", "nmi", "silhouette") if a[s_] < b[s_] - _noise(a, b, s_)]
            if up and not down:
                word = "better"
            elif down and not up:
                word = "worse"
            else:
                word = "mixed" if up else "no clear difference"
            detail = (f"{len(up)} of 3 scores (ARI, NMI, silhouette) higher and {len(down)} lower by more than "
                      "the k-means seed spread (at least 0.02) or, for the silhouette, 0.01")
            verdicts.append(f"its <b>{kind}</b> keeps the populations {word} than {m}'s ({detail})" if word in ("better", "worse")
                            else f"its <b>{kind}</b>: {word} ({detail})")
        answer = "; ".join(verdicts)
        items.append("Does the nonzero loss capture structure better? " + answer[0].upper() + answer[1:] + ".")
    items.append(_compare_scores(reps, "original", f"{n}_latent", "the original data", f"the {n} latent"))
    return (
        f"<section><h2>Q5 · Does the nonzero loss capture structure better? ({n})</h2>"
        "<p><code>nonzero_mse</code> is, per minibatch, sum(mask·(x − x̂·mask)²) / sum(mask) with mask = (x ≠ 0): "
        "the error over the nonzero input entries only.</p>"
        + _table(["model", "loss", "test MSE", "test nonzero MSE", "train MSE", "train nonzero MSE"], rows)
        + _figure(images, "q5_pca_reconstruction_vs_original", "PCA: reconstruction vs original")
        + _figure(images, "q5_pca_latent_vs_original", "PCA: latent vs original")
        + _figure(images, "q5_tsne_reconstruction_vs_original", "t-SNE: reconstruction vs original")
        + _figure(images, "q5_tsne_latent_vs_original", "t-SNE: latent vs original")
        + _table(SCORE_HEADER, _score_rows(reps, ["original", f"{n}_latent", f"{ref.spec.name}_latent" if ref else "", f"{n}_reconstruction", f"{ref.spec.name}_reconstruction" if ref else ""]))
        + _findings(items)
        + "</section>"
    )


def _section_all(result: StudyResult, metrics: dict, images: dict) -> str:
    reps = result.representations
    timing_rows = [[html.escape(k), f"{v:.2f}"] for k, v in metrics["timings"].items()]
    return (
        "<section><h2>All representations</h2>"
        f"<p>Scores on {result.embed_idx.size} cells. k-means: k = {len(result.dataset.classes)} (number of labels), "
        f"mean ± sd over {result.config.kmeans_seeds} seeds. Silhouette: Euclidean, of the known labels. Linear accuracy: "
        "balanced accuracy on the test cells of a logistic regression fitted on the training cells (representations up to 50-D).</p>"
        + _figure(images, "latent_pca_all", "PCA of every latent space")
        + _table(SCORE_HEADER, _score_rows(reps, list(reps)))
        + "<h2>Timings</h2><p>Stages in order; <code>tsne_worker_*</code> is each t-SNE's own time in a worker "
        "process, overlapping <code>scores</code> and <code>tsne_wait</code>.</p>"
        + _table(["stage", "seconds"], timing_rows)
        + "</section>"
    )


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0} img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85em;color:#555}
.findings{background:#f6f9ff;border-left:4px solid #4a7bd0;padding:.3em 1em;margin:1em 0}
code{background:#f3f3f3;padding:0 .2em}
"""


def _input_note(result: StudyResult, metrics: dict) -> str:
    """How the models saw the input, where it was read from, and where reconstructions are kept."""
    d = metrics["dataset"]
    notes = []
    if d.get("raw_counts"):
        notes.append("The input holds raw counts: every model saw log1p(counts / library size × 10⁴), "
                     "computed per batch from each cell's total count (no normalised copy was made); "
                     "all MSEs are on that scale.")
    if result.dataset.on_disk:
        notes.append("The matrix was streamed from disk in blocks of rows and never loaded whole; "
                     "<code>results.h5ad</code> therefore holds no <code>X</code>.")
    notes.append(f"Cluster scores and t-SNE use {result.embed_idx.size} cells; the input and every reconstruction "
                 "are scored and embedded on their coordinates on the input's top principal axes "
                 f"({result.views['X_pca'].shape[1]} PCs).")
    if result.sample_rows is not None:
        notes.append(f"Reconstructions are kept for {result.sample_rows.size} scored cells in "
                     "<code>reconstructions.h5ad</code> (the full ones would be too large).")
    env = metrics.get("environment", {})
    if env:
        notes.append(f"Models trained on {html.escape(str(env.get('device')))} with {env.get('processes', 1)} process(es).")
    return "<p>" + " ".join(notes) + "</p>"


def build_report(result: StudyResult, metrics: dict, images: dict[str, bytes]) -> str:
    """The complete report as one HTML string (figures embedded as PNG data URIs)."""
    d = metrics["dataset"]
    cfg = result.config
    labels = ", ".join(f"{html.escape(k)}: {v}" for k, v in d["label_counts"].items())
    header = (
        f"<h1>scae autoencoder study</h1><p>scae {__version__} · data: <b>{html.escape(d['name'])}</b> · "
        f"{d['n_cells']} cells × {d['n_genes']} genes ({d['storage']}, {d['zero_fraction'] * 100:.1f}% zeros, "
        f"values {d['value_min']:.3g} to {d['value_max']:.3g}) · labels: {labels}</p>"
        + _input_note(result, metrics)
        + f"<p>Split: {metrics['split']['n_train']} training / {metrics['split']['n_test']} test cells "
        f"(stratified by label, seed {cfg.seed}). Architecture: genes → {' → '.join(map(str, cfg.hidden))} → latent → "
        f"{' → '.join(map(str, reversed(cfg.hidden)))} → genes, {cfg.activation} on hidden layers, no activation on "
        f"input, latent or output; Adam (lr {cfg.learning_rate}), batch {cfg.batch_size}, {cfg.epochs} epochs.</p>"
    )
    body = (
        header
        + _section_q1(result, images)
        + _section_q2(result, images)
        + _section_q3(result, images)
        + _section_q4(result, images)
        + _section_q5(result, images)
        + _section_all(result, metrics, images)
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>scae study: {html.escape(d['name'])}</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
