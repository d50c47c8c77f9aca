"""The command line end to end: simulate, study outputs, consistency, determinism, bad input."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import STUDY_CELLS, STUDY_EPOCHS, STUDY_GENES, SIM_SEED, study_args
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

import scae
from scae.cli import main
from scae.report import figure_plan
from scae.study import DEFAULT_RUNS

RUN_NAMES = ["ae10", "ae50", "ae2", "ae10_nonzero"]
LATENT = {"ae10": 10, "ae50": 50, "ae2": 2, "ae10_nonzero": 10}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def strict_json(path: Path) -> dict:
    """Load JSON refusing NaN/Infinity (which are not valid JSON)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def conv_epoch_95(losses):
    """The 95% rule, written out independently of scae.metrics."""
    start, low = losses[0], min(losses)
    if not start > low:
        return None
    for epoch, value in enumerate(losses):
        if start - value >= 0.95 * (start - low) - 1e-12:
            return epoch


def expected_figure_stems(metrics: dict) -> set[str]:
    """Stems report.figure_plan names for the default runs (a light stand-in for StudyResult)."""
    runs = {
        spec.name: SimpleNamespace(
            spec=spec,
            model=SimpleNamespace(history_=metrics["runs"][spec.name]["history"]),
            convergence_epoch=metrics["runs"][spec.name]["convergence_epoch"],
        )
        for spec in DEFAULT_RUNS
    }
    return set(figure_plan(SimpleNamespace(runs=runs)))


# ---------------------------------------------------------------- shared outputs
@pytest.fixture(scope="module")
def metrics(study_out) -> dict:
    return strict_json(study_out / "metrics.json")


@pytest.fixture(scope="module")
def results(study_out):
    return ad.read_h5ad(study_out / "results.h5ad")


@pytest.fixture(scope="module")
def report(study_out) -> str:
    return (study_out / "report.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def inputs(sim_dir):
    X = np.load(sim_dir / "counts.npy")
    labels = (sim_dir / "labels.txt").read_text().splitlines()
    return X, np.array(labels)


# ---------------------------------------------------------------- simulate
def test_simulate_writes_readable_files(sim_dir):
    counts, labels = sim_dir / "counts.npy", sim_dir / "labels.txt"
    X = np.load(counts, allow_pickle=False)
    assert X.shape == (STUDY_CELLS, STUDY_GENES) and X.dtype == np.float32
    lines = labels.read_text().splitlines()
    assert len(lines) == STUDY_CELLS
    assert set(lines) == {"pop0", "pop1", "pop2"}
    expected = scae.simulate_dataset(STUDY_CELLS, STUDY_GENES, 3, SIM_SEED)
    np.testing.assert_array_equal(X, expected.X.toarray())
    assert lines == expected.labels.tolist()
    ds = scae.read_counts_labels(counts, labels)
    assert ds.n_cells == STUDY_CELLS and ds.n_genes == STUDY_GENES
    assert not list(sim_dir.glob(".*.part"))


def test_simulate_bad_arguments_exit_2(tmp_path, capsys):
    rc = main(["simulate", "--out", str(tmp_path / "s"), "--cells", "3", "--populations", "3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("scae: error: ") and "n_cells (--cells) = 3; expected at least 2 cells per population" in err
    assert not (tmp_path / "s" / "counts.npy").exists()


# ---------------------------------------------------------------- the subprocess run
def test_study_subprocess_exit_code_and_clean_stderr(study_run):
    out, proc = study_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "scae: training" not in proc.stderr  # --quiet: no stage messages
    assert str(out / "report.html") in proc.stdout


def test_output_files_exist(study_out, metrics):
    for name in ("report.html", "metrics.json", "results.h5ad"):
        assert (study_out / name).is_file() and (study_out / name).stat().st_size > 0
    assert sorted(p.name for p in (study_out / "models").iterdir()) == sorted(f"{n}.pt" for n in RUN_NAMES)
    stems = expected_figure_stems(metrics)
    assert len(stems) >= 8
    assert {p.stem for p in (study_out / "figures").glob("*.png")} == stems
    for png in (study_out / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert not list(study_out.rglob("*.part"))  # no temporary files left


# ---------------------------------------------------------------- report.html
def test_report_is_self_contained(report, study_out):
    assert report.startswith("<!DOCTYPE html>")
    assert report.rstrip().endswith("</html>")
    assert "data:image/png;base64," in report
    assert 'src="http' not in report and "src='http" not in report
    assert "<script" not in report.lower()
    assert "<link" not in report.lower()
    # every figure file is embedded, byte for byte
    pngs = sorted((study_out / "figures").glob("*.png"))
    assert report.count("<img ") == len(pngs)
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode("ascii") in report
        assert f"figures/{png.name}" in report


def test_report_sections_and_findings(report, metrics):
    for q in ("Q1", "Q2", "Q3", "Q4", "Q5"):
        assert f"<h2>{q} " in report
    assert report.index("<h2>Q1") < report.index("<h2>Q2") < report.index("<h2>Q3") < report.index("<h2>Q4") < report.index("<h2>Q5")
    assert report.count("Findings") >= 5
    split = metrics["split"]
    assert f"{split['n_train']} training / {split['n_test']} test cells" in report
    assert f"{STUDY_CELLS} cells × {STUDY_GENES} genes" in report
    assert "counts.npy + labels.txt" in report
    assert f"{STUDY_EPOCHS} epochs" in report


# ---------------------------------------------------------------- metrics.json
def test_metrics_structure(metrics, inputs):
    X, labels = inputs
    assert {"dataset", "config", "split", "runs", "representations", "timings"} <= set(metrics)
    d = metrics["dataset"]
    assert d["n_cells"] == STUDY_CELLS and d["n_genes"] == STUDY_GENES
    assert d["storage"] == "dense"
    classes, counts = np.unique(labels, return_counts=True)
    assert d["label_counts"] == {str(c): int(n) for c, n in zip(classes, counts)}
    assert d["zero_fraction"] == pytest.approx(float(np.mean(X == 0)), abs=1e-6)
    assert d["value_min"] == pytest.approx(float(X.min())) and d["value_max"] == pytest.approx(float(X.max()))
    cfg = metrics["config"]
    assert cfg["epochs"] == STUDY_EPOCHS and cfg["seed"] == 0 and cfg["hidden"] == [100]
    assert "progress" not in cfg
    split = metrics["split"]
    assert split["n_test"] == math.ceil(0.2 * STUDY_CELLS)
    assert split["n_train"] + split["n_test"] == STUDY_CELLS
    assert split["n_scored"] == STUDY_CELLS
    assert sorted(metrics["runs"]) == sorted(RUN_NAMES)
    assert all(isinstance(v, (int, float)) and v >= 0 for v in metrics["timings"].values())
    assert {f"train_{n}" for n in RUN_NAMES} <= set(metrics["timings"])


@pytest.mark.parametrize("name", RUN_NAMES)
def test_metrics_runs(metrics, name):
    run = metrics["runs"][name]
    assert run["latent_dim"] == LATENT[name]
    assert run["loss"] == ("nonzero_mse" if name.endswith("nonzero") else "mse")
    assert run["model_params"]["latent_dim"] == LATENT[name]
    assert run["model_params"]["epochs"] == STUDY_EPOCHS
    h = run["history"]
    assert len(h) == STUDY_EPOCHS + 1
    assert [r["epoch"] for r in h] == list(range(STUDY_EPOCHS + 1))
    for r in h:
        assert {"train_loss", "test_loss", "test_mse"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("train_loss", "test_loss", "test_mse"))
    for part in ("train", "test"):
        assert set(run["errors"][part]) == {"mse", "nonzero_mse"}
        assert all(v > 0 and math.isfinite(v) for v in run["errors"][part].values())
    losses = [r["test_loss"] for r in h]
    assert run["convergence_epoch"] == conv_epoch_95(losses)
    if "epoch_within_1pct_of_best" in run:
        best = min(losses)
        assert run["epoch_within_1pct_of_best"] == next(i for i, v in enumerate(losses) if v <= best + 0.01 * abs(best))
    # the history's last test numbers are the final errors on the test cells
    assert h[-1]["test_mse"] == pytest.approx(run["errors"]["test"]["mse"], rel=1e-5)
    assert h[-1]["test_loss"] == pytest.approx(run["errors"]["test"][run["loss"]], rel=1e-5)
    assert h[-1]["test_loss"] < h[0]["test_loss"]  # even 3 epochs improve on the untrained net


def test_metrics_representations(metrics):
    reps = metrics["representations"]
    expected = {"original", "original_pca2", "original_pca10", "original_pca50"}
    expected |= {f"{n}_latent" for n in RUN_NAMES} | {f"{n}_reconstruction" for n in RUN_NAMES}
    assert set(reps) == expected
    for key, r in reps.items():
        assert -0.5 <= r["ari"] <= 1 and 0 <= r["nmi"] <= 1 and -1 <= r["silhouette"] <= 1, key
        assert r["ari_std"] >= 0 and r["nmi_std"] >= 0
        if r["dims"] <= 50:
            assert 0 <= r["linear_accuracy"] <= 1
        else:
            assert "linear_accuracy" not in r
    for n in RUN_NAMES:
        assert reps[f"{n}_latent"]["dims"] == LATENT[n]
        assert reps[f"{n}_reconstruction"]["dims"] == STUDY_GENES
    assert reps["original"]["dims"] == STUDY_GENES
    assert reps["original_pca10"]["dims"] == 10


def test_metrics_pca_baselines_match_sklearn(metrics, results):
    X = np.asarray(results.X, dtype=np.float64)
    test = (results.obs["split"] == "test").to_numpy()
    base = metrics["pca_baselines"]
    assert set(base) == {"pca2", "pca10", "pca50"}
    for k in (2, 10, 50):
        pca = PCA(n_components=k, svd_solver="full").fit(X[~test])
        for part, M in (("train", X[~test]), ("test", X[test])):
            R = pca.inverse_transform(pca.transform(M))
            mask = M != 0
            assert base[f"pca{k}"][part]["mse"] == pytest.approx(np.mean((M - R) ** 2), rel=1e-3)
            assert base[f"pca{k}"][part]["nonzero_mse"] == pytest.approx(
                np.sum((M[mask] - R[mask]) ** 2) / mask.sum(), rel=1e-3
            )
    ev = metrics["pca_explained_variance"]
    cumulative = np.cumsum(PCA(n_components=50, svd_solver="full").fit(X).explained_variance_ratio_)
    for k in (2, 10, 50):
        assert ev[str(k)] == pytest.approx(cumulative[k - 1], rel=1e-4)


# ---------------------------------------------------------------- results.h5ad
def test_results_h5ad_contents(results, inputs, metrics):
    X, labels = inputs
    n = STUDY_CELLS
    assert results.shape == (n, STUDY_GENES)
    np.testing.assert_array_equal(np.asarray(results.X), X)
    assert results.obs["label"].astype(str).tolist() == labels.tolist()
    assert (results.obs["split"] == "test").sum() == metrics["split"]["n_test"]
    assert (results.obs["split"] == "train").sum() == metrics["split"]["n_train"]
    assert results.obs["scored"].all()
    for name in RUN_NAMES:
        Z = results.obsm[f"X_{name}"]
        assert Z.shape == (n, LATENT[name]) and np.all(np.isfinite(Z))
        R = results.layers[f"{name}_reconstruction"]
        assert R.shape == X.shape and np.all(np.isfinite(R))
    assert results.obsm["X_pca"].shape == (n, 50)
    for key in ("X_tsne", "X_ae10_tsne", "X_ae10_nonzero_tsne", "X_ae10_reconstruction_tsne"):
        assert results.obsm[key].shape == (n, 2) and np.all(np.isfinite(results.obsm[key])), key
    config = json.loads(results.uns["scae"]["config"])
    assert config == metrics["config"]


def test_split_is_stratified(results):
    obs = results.obs
    total_test = int((obs["split"] == "test").sum())
    for label, group in obs.groupby("label", observed=True):
        n_test = int((group["split"] == "test").sum())
        assert abs(n_test - len(group) * total_test / STUDY_CELLS) <= 1, label


@pytest.mark.parametrize("name", RUN_NAMES)
def test_metrics_errors_match_h5ad(metrics, results, name):
    X = np.asarray(results.X, dtype=np.float64)
    R = np.asarray(results.layers[f"{name}_reconstruction"], dtype=np.float64)
    errors = metrics["runs"][name]["errors"]
    for part in ("train", "test"):
        rows = (results.obs["split"] == part).to_numpy()
        x, r = X[rows], R[rows]
        mask = x != 0
        assert errors[part]["mse"] == pytest.approx(np.mean((x - r) ** 2), rel=1e-5)
        assert errors[part]["nonzero_mse"] == pytest.approx(np.sum(mask * (x - r * mask) ** 2) / mask.sum(), rel=1e-5)


def test_representation_scores_match_h5ad(metrics, results):
    labels = results.obs["label"].astype(str).to_numpy()
    reps = metrics["representations"]
    assert reps["ae10_latent"]["silhouette"] == pytest.approx(silhouette_score(results.obsm["X_ae10"], labels), abs=1e-4)
    assert reps["ae2_latent"]["silhouette"] == pytest.approx(silhouette_score(results.obsm["X_ae2"], labels), abs=1e-4)
    # the input and the reconstructions are scored on their coordinates on the input's top 50 PCs
    assert reps["original"]["scored_on"] == "its coordinates on the input's top 50 PCs"
    assert reps["original"]["silhouette"] == pytest.approx(silhouette_score(results.obsm["X_pca"], labels), abs=1e-4)
    assert reps["original_pca10"]["silhouette"] == pytest.approx(
        silhouette_score(results.obsm["X_pca"][:, :10], labels), abs=1e-4
    )
    X = np.asarray(results.X, dtype=np.float64)
    R = np.asarray(results.layers["ae50_reconstruction"], dtype=np.float64)
    pca = PCA(n_components=50, svd_solver="full").fit(X)  # the input's axes
    projected = results.obsm["X_ae50_reconstruction_pca"]
    np.testing.assert_allclose(np.abs(projected), np.abs(pca.transform(R)), atol=2e-3)
    assert reps["ae50_reconstruction"]["silhouette"] == pytest.approx(silhouette_score(projected, labels), abs=1e-4)


@pytest.mark.parametrize("name", RUN_NAMES)
def test_saved_models_reproduce_results(study_out, results, metrics, name):
    model = scae.Autoencoder.load(study_out / "models" / f"{name}.pt")
    assert model.latent_dim == LATENT[name]
    assert model.loss == metrics["runs"][name]["loss"]
    assert model.history_ == metrics["runs"][name]["history"]
    X = np.asarray(results.X)
    np.testing.assert_allclose(model.transform(X), results.obsm[f"X_{name}"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.reconstruct(X), results.layers[f"{name}_reconstruction"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- determinism
def test_second_run_same_seed_identical(sim_dir, study_out, metrics, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(study_args(sim_dir, out)) == 0
    capsys.readouterr()
    again = strict_json(out / "metrics.json")
    a, b = _without_timings(metrics), _without_timings(again)
    assert a == b
    r1, r2 = ad.read_h5ad(study_out / "results.h5ad"), ad.read_h5ad(out / "results.h5ad")
    for key in ("X_ae10", "X_ae2", "X_pca"):
        np.testing.assert_array_equal(r1.obsm[key], r2.obsm[key])
    np.testing.assert_array_equal(r1.layers["ae10_nonzero_reconstruction"], r2.layers["ae10_nonzero_reconstruction"])
    np.testing.assert_array_equal(r1.obsm["X_tsne"], r2.obsm["X_tsne"])
    np.testing.assert_array_equal(r1.obsm["X_ae10_nonzero_tsne"], r2.obsm["X_ae10_nonzero_tsne"])


# ---------------------------------------------------------------- h5ad input, escaping, subsampling
@pytest.fixture(scope="module")
def h5ad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("h5ad_run")
    ds = scae.simulate_dataset(260, 100, 3, seed=2)
    names = {"pop0": "<script>alert('x')</script>", "pop1": "B & T <b>cells</b>", "pop2": "plain"}
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([names[lab] for lab in ds.labels]), "batch": "one"},
        index=[f"bc{i}" for i in range(260)],
    )
    path = tmp / "input.h5ad"
    ad.AnnData(X=sp.csr_matrix(ds.X), obs=obs).write_h5ad(path)
    out = tmp / "out"
    rc = main(["study", "--h5ad", str(path), "--label-key", "cell_type", "--out", str(out), "--epochs", "2",
               "--quiet", "--max-embed-cells", "200", "--hidden", "32", "--seed", "5"])
    return SimpleNamespace(rc=rc, out=out, path=path, dataset=ds, obs=obs, names=names)


def test_h5ad_input_study(h5ad_run):
    assert h5ad_run.rc == 0
    m = strict_json(h5ad_run.out / "metrics.json")
    assert m["dataset"]["n_cells"] == 260 and m["dataset"]["n_genes"] == 100
    assert m["dataset"]["storage"] == "sparse CSR"
    assert "input.h5ad" in m["dataset"]["name"] and "cell_type" in m["dataset"]["name"]
    assert set(m["dataset"]["label_counts"]) == set(h5ad_run.names.values())
    assert m["config"]["hidden"] == [32] and m["config"]["seed"] == 5
    assert all(len(r["history"]) == 3 for r in m["runs"].values())
    res = ad.read_h5ad(h5ad_run.out / "results.h5ad")
    assert res.obs_names.tolist() == h5ad_run.obs.index.tolist()
    assert res.obs["label"].astype(str).tolist() == h5ad_run.obs["cell_type"].astype(str).tolist()
    np.testing.assert_array_equal(
        res.X.toarray() if sp.issparse(res.X) else np.asarray(res.X), h5ad_run.dataset.X.toarray()
    )


def test_h5ad_run_subsamples_scored_cells(h5ad_run):
    m = strict_json(h5ad_run.out / "metrics.json")
    assert m["split"]["n_scored"] == 200
    res = ad.read_h5ad(h5ad_run.out / "results.h5ad")
    scored = res.obs["scored"].to_numpy()
    assert scored.sum() == 200
    tsne = res.obsm["X_tsne"]
    assert np.all(np.isfinite(tsne[scored])) and np.all(np.isnan(tsne[~scored]))
    assert np.all(np.isfinite(res.obsm["X_pca"]))  # PCA covers every cell
    assert np.all(np.isfinite(res.obsm["X_ae10"]))


def test_report_escapes_label_html(h5ad_run):
    html = (h5ad_run.out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html
    assert "<b>cells</b>" not in html
    assert "&lt;script&gt;" in html
    assert "B &amp; T &lt;b&gt;cells&lt;/b&gt;" in html


# ---------------------------------------------------------------- bad input
@pytest.fixture
def small_files(tmp_path):
    X = scae.simulate_dataset(40, 20, 2, seed=0).X.toarray()
    counts = tmp_path / "counts.npy"
    np.save(counts, X)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(["a", "b"] * 20) + "\n")
    h5 = tmp_path / "in.h5ad"
    ad.AnnData(X=X, obs=pd.DataFrame({"ct": ["a", "b"] * 20}, index=[f"c{i}" for i in range(40)])).write_h5ad(h5)
    return SimpleNamespace(dir=tmp_path, X=X, counts=counts, labels=labels, h5ad=h5)


def _bad_case(case: str, f) -> tuple[list[str], str]:
    """CLI arguments (without --out) for one bad-input case, and a phrase the error must contain."""
    d = f.dir
    if case == "missing_counts":
        return ["--counts", str(d / "absent.npy"), "--labels", str(f.labels)], f"{d / 'absent.npy'}: counts file not found"
    if case == "labels_mismatch":
        short = d / "short.txt"
        short.write_text("\n".join(["a", "b"] * 19 + ["a"]) + "\n")
        return ["--counts", str(f.counts), "--labels", str(short)], "39 labels, but"
    if case == "nan":
        X = f.X.copy()
        X[5, 7] = np.nan
        bad = d / "nan.npy"
        np.save(bad, X)
        return ["--counts", str(bad), "--labels", str(f.labels)], "row 5, column 7"
    if case == "unknown_label_key":
        return ["--h5ad", str(f.h5ad), "--label-key", "celltype"], "no obs column 'celltype'"
    if case == "unknown_layer":
        return ["--h5ad", str(f.h5ad), "--label-key", "ct", "--layer", "raw"], "no layer 'raw'"
    if case == "counts_without_labels":
        return ["--counts", str(f.counts)], "--counts and --labels go together"
    if case == "h5ad_without_label_key":
        return ["--h5ad", str(f.h5ad)], "--label-key is required"
    if case == "h5ad_and_counts":
        return ["--h5ad", str(f.h5ad), "--label-key", "ct", "--counts", str(f.counts), "--labels", str(f.labels)], "not both"
    if case == "label_key_without_h5ad":
        return ["--counts", str(f.counts), "--labels", str(f.labels), "--label-key", "ct"], "go with --h5ad"
    if case == "pickled_counts":
        bad = d / "obj.npy"
        np.save(bad, np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
        return ["--counts", str(bad), "--labels", str(f.labels)], "pickle"
    if case == "single_label":
        one = d / "one.txt"
        one.write_text("a\n" * 40)
        return ["--counts", str(f.counts), "--labels", str(one)], "only 1 distinct label"
    raise AssertionError(case)


BAD_CASES = [
    "missing_counts", "labels_mismatch", "nan", "unknown_label_key", "unknown_layer", "counts_without_labels",
    "h5ad_without_label_key", "h5ad_and_counts", "label_key_without_h5ad", "pickled_counts", "single_label",
]


def assert_one_line_error(capsys, needle: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("scae: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert needle in err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exit_2_single_line(small_files, capsys, case):
    args, needle = _bad_case(case, small_files)
    out = small_files.dir / "out"
    rc = main(["study", *args, "--out", str(out), "--epochs", "1", "--quiet"])
    assert rc == 2
    assert_one_line_error(capsys, needle)
    assert not (out / "report.html").exists()
    assert not (out / "metrics.json").exists()
    assert not (out / "results.h5ad").exists()


@pytest.mark.parametrize("beneath", [False, True])
def test_output_path_is_a_file(small_files, capsys, beneath):
    blocker = small_files.dir / "blocker"
    blocker.write_text("keep me\n")
    out = blocker / "sub" if beneath else blocker
    rc = main(["study", "--counts", str(small_files.counts), "--labels", str(small_files.labels),
               "--out", str(out), "--epochs", "1", "--quiet"])
    assert rc == 2
    err = assert_one_line_error(capsys, "cannot write the output directory")
    assert str(out) in err
    assert blocker.read_text() == "keep me\n"


def test_previous_report_kept_when_input_is_bad(small_files, study_out, capsys):
    out = small_files.dir / "previous"
    out.mkdir()
    shutil.copy(study_out / "report.html", out / "report.html")
    shutil.copy(study_out / "metrics.json", out / "metrics.json")
    (out / "notes.txt").write_text("user file\n")
    rc = main(["study", "--counts", str(small_files.dir / "absent.npy"), "--labels", str(small_files.labels),
               "--out", str(out), "--quiet"])
    assert rc == 2
    assert_one_line_error(capsys, "not found")
    # the run never started: the previous, complete report is left as it was
    assert (out / "report.html").read_bytes() == (study_out / "report.html").read_bytes()
    assert (out / "metrics.json").read_bytes() == (study_out / "metrics.json").read_bytes()
    assert (out / "notes.txt").read_text() == "user file\n"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["study", "--out", "x", "--epochs", "0"], "expected an integer in [1, 1000000], got 0"),
        (["study", "--out", "x", "--hidden", "-3"], "expected an integer in [1, 100000], got -3"),
        (["study", "--out", "x", "--activation", "swish"], "invalid choice"),
        (["study"], "--out"),
        (["bogus"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x" / "report.html").exists()


def test_keyboard_interrupt_exit_130(small_files, capsys, monkeypatch):
    import scae.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(scae.cli, "load_input", interrupted)
    out = small_files.dir / "interrupted"
    rc = main(["study", "--counts", str(small_files.counts), "--labels", str(small_files.labels),
               "--out", str(out), "--quiet"])
    assert rc == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "report.html").exists() and not (out / "metrics.json").exists()


def _without_timings(value):
    """``value`` with every dict key named 'timings' removed, at any depth."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "timings"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_version_flag_prints_package_version(capsys):
    import scae

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"scae {scae.__version__}"


def test_study_refuses_to_overwrite_its_h5ad_input(tmp_path, capsys):
    data = scae.simulate_dataset(200, 60, 3, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    source = out / "results.h5ad"
    data.to_anndata().write_h5ad(source)
    before = source.read_bytes()
    code = main(["study", "--h5ad", str(source), "--label-key", "label", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "the study would remove or overwrite it" in err and err.startswith("scae: error:")
    assert source.read_bytes() == before


# ---------------------------------------------------------------- raw counts and --top-genes (reading only)
def test_simulate_writes_the_raw_counts_beside(sim_dir):
    raw = np.load(sim_dir / "raw_counts.npy", allow_pickle=False)
    expected = scae.simulate_dataset(STUDY_CELLS, STUDY_GENES, 3, SIM_SEED)
    assert raw.dtype == np.float32
    np.testing.assert_array_equal(raw, expected.raw.toarray())
    ds = scae.read_counts_labels(sim_dir / "counts.npy", sim_dir / "labels.txt", raw_counts_path=sim_dir / "raw_counts.npy")
    assert not ds.counts and ds.has_counts  # the log-normalised matrix for MSE, the counts for count models
    np.testing.assert_array_equal(ds.count_source().tensor(slice(None)).numpy(), raw)


def _parsed(*argv: str):
    from scae.cli import build_parser

    return build_parser().parse_args(["study", "--out", "unused", *argv])


def test_input_options_for_raw_counts_reach_the_readers(sim_dir, tmp_path):
    from scae.cli import load_input

    ds = load_input(_parsed("--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                            "--raw-counts", str(sim_dir / "raw_counts.npy"), "--top-genes", str(STUDY_GENES)))
    assert ds.raw_origin == str(sim_dir / "raw_counts.npy") and ds.has_counts
    X = np.load(sim_dir / "counts.npy")
    raw = np.load(sim_dir / "raw_counts.npy")
    obs = pd.DataFrame({"ct": pd.Categorical(np.loadtxt(sim_dir / "labels.txt", dtype=str))},
                       index=[f"c{i}" for i in range(STUDY_CELLS)])
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=obs, layers={"umi": sp.csr_matrix(raw)})
    adata.raw = ad.AnnData(X=sp.csr_matrix(raw), var=adata.var)
    adata.write_h5ad(tmp_path / "in.h5ad")
    for option, origin in ((["--counts-layer", "umi"], "layer 'umi'"), (["--counts-raw"], "adata.raw")):
        args = _parsed("--h5ad", str(tmp_path / "in.h5ad"), "--label-key", "ct", *option, "--stream")
        ds = load_input(args)
        assert ds.on_disk and ds.raw_origin == origin and ds.raw.on_disk
        np.testing.assert_array_equal(ds.count_source().tensor(np.array([0, 9])).numpy(), raw[[0, 9]])
    assert _parsed("--top-genes", "25").top_genes == 25 and _parsed().top_genes is None


@pytest.mark.parametrize("extra, needle", [
    (["--counts-layer", "c"], "--counts-layer and --counts-raw go with --h5ad; with --counts and --labels, give the raw "
     "counts as --raw-counts raw.npy"),
    (["--counts-raw"], "--counts-layer and --counts-raw go with --h5ad"),
    (["--top-genes", "21"], "--top-genes 21: the input has 20 genes; expected at most 20"),
])
def test_raw_count_options_combined_wrongly_with_counts_labels(small_files, capsys, extra, needle):
    rc = main(["study", "--counts", str(small_files.counts), "--labels", str(small_files.labels),
               "--out", str(small_files.dir / "out"), "--quiet", *extra])
    assert rc == 2
    assert_one_line_error(capsys, needle)
    assert not (small_files.dir / "out" / "report.html").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--raw-counts", "r.npy"], "--raw-counts goes with --counts and --labels; with --h5ad, name the raw counts with "
     "--counts-layer or --counts-raw"),
    (["--counts-layer", "c", "--counts-raw"], "give either --counts-layer or --counts-raw (where the raw counts are), not both"),
    (["--counts-layer", "c"], "no layer 'c' for the raw counts; available layers: none"),
    (["--counts-raw"], "has no adata.raw for the raw counts"),
])
def test_raw_count_options_combined_wrongly_with_h5ad(small_files, capsys, extra, needle):
    rc = main(["study", "--h5ad", str(small_files.h5ad), "--label-key", "ct", "--out", str(small_files.dir / "out"),
               "--quiet", *extra])
    assert rc == 2
    assert_one_line_error(capsys, needle)


def test_raw_counts_without_input_and_top_genes_below_one(tmp_path, capsys, monkeypatch):
    rc = main(["study", "--raw-counts", str(tmp_path / "r.npy"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert_one_line_error(capsys, "--raw-counts goes with --counts and --labels; the built-in dataset has its simulated counts")
    monkeypatch.chdir(tmp_path)
    for command in ("study", "fit"):
        for value in ("0", "1"):  # a model needs at least 2 genes
            with pytest.raises(SystemExit) as info:
                main([command, "--out", "x", "--top-genes", value])
            assert info.value.code == 2
            assert f"argument --top-genes: expected an integer >= 2, got {value}" in capsys.readouterr().err


def test_reading_with_top_genes_imports_no_heavy_module(small_files):
    """The input is read (and --top-genes checked) before PyTorch, scikit-learn or scikit-misc load."""
    import subprocess
    import sys

    from conftest import REPO, scae_env

    raw = small_files.dir / "raw.npy"
    np.save(raw, np.round(np.expm1(small_files.X)))
    code = (
        "import sys; from scae.cli import build_parser, load_input; "
        f"args = build_parser().parse_args(['study', '--out', 'o', '--counts', {str(small_files.counts)!r}, "
        f"'--labels', {str(small_files.labels)!r}, '--raw-counts', {str(raw)!r}, '--top-genes', '5']); "
        "ds = load_input(args); assert ds.n_genes == 20 and args.top_genes == 5 and ds.raw is not None; "
        "print(sorted(m for m in ('torch', 'sklearn', 'skmisc') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=scae_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- scae fit: presets and model options
@pytest.fixture(scope="module")
def count_h5ad(tmp_path_factory) -> SimpleNamespace:
    """An .h5ad whose X holds raw counts (200 cells × 40 genes, 3 populations, obs 'ct'), and a
    counts.npy + labels.txt pair of its log-normalised matrix (no raw counts beside)."""
    d = tmp_path_factory.mktemp("fit_counts")
    counts, populations = scae.simulate_counts(200, 40, 3, seed=2)
    labels = np.array([f"type{p}" for p in populations])
    obs = pd.DataFrame({"ct": pd.Categorical(labels)}, index=[f"c{i}" for i in range(200)])
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(40)])).write_h5ad(d / "counts.h5ad")
    dense = counts.toarray()
    lognorm = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    np.save(d / "lognorm.npy", lognorm)
    (d / "labels.txt").write_text("\n".join(labels) + "\n")
    return SimpleNamespace(dir=d, h5ad=d / "counts.h5ad", counts=dense, labels=labels, lognorm=d / "lognorm.npy",
                           labels_file=d / "labels.txt")


def _fit(count_h5ad, out: Path, *extra: str) -> int:
    return main(["fit", "--h5ad", str(count_h5ad.h5ad), "--label-key", "ct", "--out", str(out), "--device", "cpu",
                 "--quiet", *extra])


def test_fit_preset_recommended_saves_the_presets_parameters(count_h5ad, tmp_path, capsys):
    from scae.presets import RECOMMENDED, preset

    out = tmp_path / "rec.pt"
    assert _fit(count_h5ad, out, "--preset", "recommended", "--epochs", "2") == 0
    assert f"model: {out}" in capsys.readouterr().out
    params = scae.Autoencoder.load(out).get_params()
    expected = {**scae.Autoencoder().get_params(), **preset(RECOMMENDED), "epochs": 2, "random_state": 0,
                "device": "cpu", "progress": False}
    assert {k: tuple(v) if k == "hidden" else v for k, v in params.items()} == expected
    assert params["loss"] == preset(RECOMMENDED)["loss"] and params["epochs"] == 2  # the option beats the preset's


def test_fit_option_given_beats_the_preset(count_h5ad, tmp_path):
    from scae.presets import preset

    out = tmp_path / "layer.pt"
    assert _fit(count_h5ad, out, "--preset", "zinb_ae", "--epochs", "1", "--norm", "layer", "--dropout", "0.2",
                "--no-early-stopping") == 0
    params = scae.Autoencoder.load(out).get_params()
    assert preset("zinb_ae")["norm"] == "batch" and preset("zinb_ae")["early_stopping"] is True
    assert params["norm"] == "layer" and params["dropout"] == 0.2 and params["early_stopping"] is False
    assert params["loss"] == "zinb" and params["lr_schedule"] == "plateau" and tuple(params["hidden"]) == (128,)


def test_model_params_order_option_preset_default():
    from scae.cli import build_parser, model_params

    def params(*argv):
        return model_params(build_parser().parse_args(["fit", "--out", "m.pt", *argv]))

    plain = params()
    assert plain == {**{k: v for k, v in scae.Autoencoder().get_params().items()
                        if k not in ("random_state", "device", "progress", "validation_fraction")}}
    assert params("--preset", "nb_ae")["lr_schedule"] == "plateau"
    assert params("--preset", "nb_ae", "--lr-schedule", "cosine", "--hidden", "32", "16")["lr_schedule"] == "cosine"
    assert params("--preset", "nb_ae", "--hidden", "32", "16")["hidden"] == (32, 16)
    assert params("--preset", "nb_vae", "--no-variational")["variational"] is False
    assert params("--variational")["variational"] is True and params("--variational")["loss"] == "mse"


@pytest.mark.parametrize("extra", [["--loss", "nb"], ["--preset", "recommended"], ["--loss", "poisson"]])
def test_fit_count_loss_without_counts_is_one_line(count_h5ad, tmp_path, capsys, extra):
    out = tmp_path / "m.pt"
    rc = main(["fit", "--counts", str(count_h5ad.lognorm), "--labels", str(count_h5ad.labels_file),
               "--out", str(out), "--epochs", "1", "--quiet", *extra])
    assert rc == 2
    err = assert_one_line_error(capsys, "models raw counts and lognorm.npy + labels.txt has none")
    assert "--counts-layer" in err and "--raw-counts" in err
    assert not out.exists()


def test_fit_nb_on_integer_h5ad_trains_on_the_raw_counts(count_h5ad, tmp_path):
    from scae.data import stratified_split

    out = tmp_path / "nb.pt"
    assert _fit(count_h5ad, out, "--loss", "nb", "--epochs", "2", "--latent", "4", "--hidden", "16", "--seed", "3") == 0
    saved = scae.Autoencoder.load(out)
    train_idx, test_idx = stratified_split(count_h5ad.labels, 0.2, 3)
    by_hand = scae.Autoencoder(latent_dim=4, hidden=(16,), loss="nb", epochs=2, random_state=3, device="cpu")
    by_hand.fit(count_h5ad.counts[train_idx], eval_X=count_h5ad.counts[test_idx])
    assert [row["epoch"] for row in saved.history_] == [0, 1, 2]
    for saved_row, hand_row in zip(saved.history_, by_hand.history_, strict=True):
        assert saved_row == pytest.approx(hand_row, rel=1e-6)
    np.testing.assert_allclose(saved.transform(count_h5ad.counts), by_hand.transform(count_h5ad.counts), rtol=1e-5,
                               atol=1e-6)
    # the log-normalised matrix gives another history: the counts, not their normalisation, were used
    lognorm = np.load(count_h5ad.lognorm)
    mse = scae.Autoencoder(latent_dim=4, hidden=(16,), loss="mse", epochs=2, random_state=3, device="cpu")
    mse.fit(lognorm[train_idx], eval_X=lognorm[test_idx])
    assert mse.history_[0]["train_loss"] != pytest.approx(saved.history_[0]["train_loss"], rel=1e-3)


@pytest.mark.parametrize(("n_cells", "max_embed", "cores", "expected"), [
    (300, 20_000, 2, 1),       # a small input: one worker, whose imports overlap this process's
    (300, 20_000, 16, 1),
    (5000, 20_000, 16, 7),     # half the cores, at most one per t-SNE
    (5000, 20_000, 8, 4),
    (5000, 1500, 16, 1),       # few cells scored
    (5000, 20_000, 1, 0),      # one core: no worker
])
def test_the_study_command_starts_its_workers_by_input_size_and_cores(monkeypatch, n_cells, max_embed, cores, expected):
    import scae.background
    from scae.cli import _background_jobs

    monkeypatch.setattr(scae.background, "available_cores", lambda: cores)
    started = []
    monkeypatch.setattr(scae.background.BackgroundJobs, "_start_workers", lambda self: started.append(self.workers))
    args = SimpleNamespace(seed=4, max_embed_cells=max_embed, quiet=True)
    with _background_jobs(args, n_cells) as jobs:
        assert jobs.workers == expected and jobs.seed == 4
    assert started == ([expected] if expected else [])


def test_the_study_command_knows_how_many_t_snes_its_study_runs():
    from scae.cli import STUDY_TSNES
    from scae.results import STUDY_RUNS

    assert STUDY_TSNES == 1 + sum(spec.tsne_latent + spec.tsne_reconstruction for spec in STUDY_RUNS)


def test_a_file_name_too_long_for_the_system_is_one_line(sim_dir, tmp_path, capsys):
    long = "x" * 300  # above the 255 bytes a name may have
    cases = [
        (["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
          "--epochs", "1", "--quiet", "--out", str(tmp_path / f"{long}.pt")], f"{long[:20]}"),
        (["study", "--counts", str(tmp_path / f"{long}.npy"), "--labels", str(sim_dir / "labels.txt"),
          "--epochs", "1", "--quiet", "--out", str(tmp_path / "s")], ".npy: File name too long"),
        (["study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(tmp_path / long),
          "--epochs", "1", "--quiet", "--out", str(tmp_path / "s")], "File name too long"),
        (["embed", str(tmp_path / f"{long}.h5ad"), "--out", str(tmp_path / "o.h5ad")], "File name too long"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("scae: error: ") and err.count("\n") == 1 and needle in err, err
        assert "…" in err and len(err) < 200  # the name shortened in the middle
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_a_study_runs_with_its_error_stream_closed(sim_dir, tmp_path):
    """``2>&-``: the progress bars and messages go nowhere instead of failing the run."""
    import subprocess
    import sys

    from conftest import REPO, scae_env

    out = tmp_path / "out"
    command = [sys.executable, "-m", "scae.cli", *study_args(sim_dir, out)]
    command.remove("--quiet")  # progress bars on: they write to standard error
    proc = subprocess.run(command, cwd=REPO, env=scae_env(), stdout=subprocess.PIPE, text=True, timeout=300,
                          preexec_fn=lambda: __import__("os").close(2))
    assert proc.returncode == 0
    assert "study finished" in proc.stdout and (out / "report.html").is_file()


def test_a_study_whose_error_stream_reader_leaves_finishes(sim_dir, tmp_path):
    """``scae study … 2>&1 | head -1``: once the reader of standard error is gone, the progress
    lines go to the null device and the study finishes (it failed with status 1, writing nothing)."""
    import subprocess
    import sys

    from conftest import REPO, scae_env

    out = tmp_path / "out"
    command = [str(Path(sys.executable).with_name("scae")), *study_args(sim_dir, out)]  # the console script
    command.remove("--quiet")
    proc = subprocess.Popen(command, cwd=REPO, env=scae_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr.readline().startswith(b"scae: ")  # the first line; then the reader leaves
    proc.stderr.close()
    assert proc.wait(timeout=300) == 0
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()


def test_repeated_cell_and_gene_names_are_kept_without_warnings(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(1.0, (120, 30)).astype(np.float32))
    obs = pd.DataFrame({"ct": pd.Categorical(np.repeat(["a", "b", "c"], 40))}, index=[f"c{i % 100}" for i in range(120)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j % 25}" for j in range(30)])).write_h5ad(tmp_path / "d.h5ad")
    assert main(["embed", str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "o.h5ad"), "--epochs", "1",
                 "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's, reading the names back here
        out = ad.read_h5ad(tmp_path / "o.h5ad")
    assert list(out.obs_names) == list(obs.index) and out.var_names[25] == "g0"


def test_a_refused_study_leaves_no_folder_it_made(sim_dir, tmp_path, capsys):
    base = ["study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
            "--epochs", "1", "--quiet", "--max-embed-cells", "20"]  # refused once the input is read
    assert main([*base, "--out", str(tmp_path / "new" / "deeper" / "out")]) == 2
    assert "--max-embed-cells" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # every folder it made
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    assert main([*base, "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_an_output_path_through_a_folder_that_does_not_exist_makes_only_the_folders_it_names(sim_dir, tmp_path,
                                                                                              monkeypatch, capsys):
    """``--out q1/../q2/q3`` while ``q1`` does not exist is ``q2/q3``: a refused run removes what it
    made and a finished one leaves no empty ``q1``; a ``..`` after an existing folder is kept."""
    from scae.cli import settled_path

    monkeypatch.chdir(tmp_path)
    assert settled_path(Path("q1/../q2/q3")) == Path("q2/q3")
    assert settled_path(Path("q1/../../q2")) == Path("../q2")
    assert settled_path(Path("q1/..")) == Path(".")
    (tmp_path / "here").mkdir()
    assert settled_path(Path("here/../q2")) == Path("here/../q2")  # exists: the system resolves it
    assert settled_path(Path("here/x/../q2")) == Path("here/q2")
    assert settled_path(tmp_path / "a" / ".." / "b") == tmp_path / "b"
    base = ["study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
            "--epochs", "1", "--quiet"]
    assert main([*base, "--top-genes", "9999", "--out", "q1/../q2/q3"]) == 2
    assert "--top-genes" in capsys.readouterr().err
    assert not (tmp_path / "q1").exists() and not (tmp_path / "q2").exists()
    assert main(["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--loss", "nb", "--out", "f1/f2/m.pt"]) == 2  # no raw counts: refused after the folders were made
    assert "raw counts" in capsys.readouterr().err and not (tmp_path / "f1").exists()


@pytest.mark.parametrize("entry", ["figures/notes.txt", "figures/q1_loss_history.png/keep", "models/ae10.pt/keep",
                                   "models/readme.md", "figures/my_own_plot.png", "models/my_model.pt",
                                   "models/._notes"])
def test_a_study_refuses_an_output_folder_holding_files_it_did_not_write(sim_dir, tmp_path, capsys, entry):
    """OUT/figures and OUT/models are replaced whole when a study finishes: anything in them that is not a
    figure (.png) or a model (.pt) is refused before the run, and stays."""
    out = tmp_path / "out"
    path = out / entry
    path.parent.mkdir(parents=True)
    path.write_text("mine")
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / "q4_latent_2d.png").write_bytes(b"png")  # a figure of an earlier run is the study's own
    (out / "figures" / ".DS_Store").write_bytes(b"")  # and a file browser's litter goes with the folder
    (out / "figures" / "._q4_latent_2d.png").write_bytes(b"")  # (macOS's companion of a file)
    assert main(["study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--epochs", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    folder, name = entry.split("/")[:2]
    foreign = out / folder / name
    what = "a folder" if foreign.is_dir() else f"not a {'figure' if folder == 'figures' else 'model'} a study writes"
    assert err == (f"scae: error: {foreign}: is {what}, and the study replaces the whole {folder} folder when it "
                   "finishes; move it or choose another output directory\n")
    assert path.read_text() == "mine" and not (out / "report.html").exists()


def test_the_last_line_lost_to_a_full_or_closed_output_does_not_fail_the_command(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, scae_env

    command = [sys.executable, "-m", "scae.cli", "simulate", "--cells", "60", "--genes", "10"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*command, "--out", str(tmp_path / "a")], cwd=REPO, env=scae_env(), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["counts.npy", "labels.txt", "raw_counts.npy"]
    piped = subprocess.Popen([*command, "--out", str(tmp_path / "b")], cwd=REPO, env=scae_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    piped.stdout.close()  # the reader is gone (| head, | true)
    assert piped.wait(timeout=120) == 0 and piped.stderr.read() == ""


# ---------------------------------------------------------------- the environment it runs in
def _scae(args: list[str], cwd: Path, **env: str):
    import os
    import subprocess
    import sys

    command = [str(Path(sys.executable).with_name("scae")), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "abc", "RANK": "0"}, "environment variable WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "environment variable RANK='x' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "environment variable RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29500"},
     "torchrun: MASTER_ADDR='no-such-host.invalid' (the address of process 0) does not resolve"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "torchrun: process 0 of 2 could not join its group (Error initializing "
                                       "torch.distributed using env:// rendezvous: environment variable MASTER_ADDR "
                                       "expected, but not set)"),
])
@pytest.mark.parametrize("command", ["study", "fit"])
def test_malformed_torchrun_variables_are_one_line(sim_dir, tmp_path, capsys, monkeypatch, env, needle, command):
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / ("out" if command == "study" else "m.pt")
    args = study_args(sim_dir, out) if command == "study" else [
        "fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"scae: error: {needle}") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_removed_working_directory_is_one_line(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    import os
    import subprocess
    import sys

    code = f"import os, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); sys.argv = ['scae', 'simulate', '--out', {str(tmp_path / 's')!r}]\n" \
           "from scae.__main__ import console; console()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 2
    assert done.stderr == ("scae: error: the current directory no longer exists (it was removed); cd to an existing "
                           "directory and run again\n")
    assert not (tmp_path / "s").exists()


def test_an_unhelpful_environment_leaves_a_study_quiet(sim_dir, tmp_path):
    """An ASCII-only standard output, an unknown matplotlib backend, a malformed OpenMP thread
    count and an unusable matplotlib folder: the study completes, and says nothing but its line."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = _scae(["study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                  "--out", str(tmp_path / "out"), "--epochs", "1", "--quiet"], tmp_path,
                 PYTHONIOENCODING="ascii", LC_ALL="C", MPLBACKEND="nonsense", OMP_NUM_THREADS="abc",
                 MPLCONFIGDIR=str(blocker), XDG_CACHE_HOME=str(blocker))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("scae: study finished in ") and (tmp_path / "out" / "report.html").is_file()
    fit = _scae(["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--out", str(tmp_path / "m.pt"), "--epochs", "1", "--quiet"], tmp_path, PYTHONIOENCODING="ascii")
    assert fit.returncode == 0 and fit.stderr == "" and "\\xd7" in fit.stdout  # the × escaped, not an error


def test_a_count_model_with_normalize_none_names_the_option(sim_dir, tmp_path, capsys):
    assert main(["fit", "--counts", str(sim_dir / "raw_counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--loss", "nb", "--normalize", "none", "--out", str(tmp_path / "m.pt")]) == 2
    assert "--loss nb models raw counts, and --normalize none takes X as given (not as counts)" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_stray_rank_variables_without_a_group_are_ignored(sim_dir, tmp_path, capsys, monkeypatch):
    """RANK or LOCAL_RANK set by something else (a scheduler, a shell), without a WORLD_SIZE above 1:
    one process, as before."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "node7")
    monkeypatch.setenv("LOCAL_RANK", "")
    assert main(["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--epochs", "1", "--quiet", "--out", str(tmp_path / "m.pt")]) == 0
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--epochs", "1", "--quiet", "--out", str(tmp_path / "m2.pt")]) == 0


def test_the_names_a_study_may_write_in_its_folders_are_the_figures_and_models_it_writes():
    """files.STUDY_FIGURES / STUDY_MODELS (which a study's check of OUT reads without heavy imports)
    list exactly report.figure_plan's figures and the study's runs."""
    import inspect
    import re

    from scae import report
    from scae.files import STUDY_FIGURES, STUDY_MODELS
    from scae.results import STUDY_RUNS

    planned = set(re.findall(r'plan\["([a-z0-9_]+)"\]', inspect.getsource(report)))
    assert {f"{stem}.png" for stem in planned} == STUDY_FIGURES
    assert {f"{spec.name}.pt" for spec in STUDY_RUNS} == STUDY_MODELS


def test_outputs_go_through_a_link_followed_by_dotdot_where_the_system_says(sim_dir, tmp_path, monkeypatch):
    """``--out lnk/../new``: the folder beside the link's target (as mkdir -p and the shell see it);
    tempfile takes '..' out by spelling, which wrote beside the link or failed."""
    (tmp_path / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "deep" / "inner")
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", "lnk/../new"]) == 0
    assert (tmp_path / "deep" / "new" / "counts.npy").is_file() and not (tmp_path / "new").exists()
    assert main(["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--epochs", "1", "--quiet", "--out", "lnk/../m.pt"]) == 0
    assert (tmp_path / "deep" / "m.pt").is_file() and not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- the process's surroundings
def _run_scae(args: list[str], cwd: Path, **kwargs):
    import subprocess
    import sys

    from conftest import scae_env

    env = {**scae_env(), **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "scae.cli", *args], cwd=cwd, env=env, timeout=300, **kwargs)


def test_an_input_whose_name_is_not_utf8_is_read_and_named_with_escapes(sim_dir, tmp_path):
    """Its name went into results.h5ad, metrics.json and a benchmark's figure, which cannot hold
    undecodable bytes: a traceback after the training."""
    import os

    counts = tmp_path / os.fsdecode(b"\xff\xfe.npy")
    shutil.copy(sim_dir / "counts.npy", counts)
    labels = str(sim_dir / "labels.txt")
    out = tmp_path / "out"
    assert main(["study", "--counts", str(counts), "--labels", labels, "--out", str(out), "--epochs", "1",
                 "--quiet", "--hidden", "8"]) == 0
    assert strict_json(out / "metrics.json")["dataset"]["name"] == "\\xff\\xfe.npy + labels.txt"
    assert ad.read_h5ad(out / "results.h5ad").uns["scae"]["input"] == "\\xff\\xfe.npy + labels.txt"
    raw = tmp_path / os.fsdecode(b"r\xfe.npy")
    shutil.copy(sim_dir / "raw_counts.npy", raw)
    streamed = tmp_path / "streamed"  # its storage line and the raw counts' origin name the files too
    assert main(["study", "--counts", str(counts), "--labels", labels, "--raw-counts", str(raw), "--stream",
                 "--out", str(streamed), "--epochs", "1", "--quiet", "--hidden", "8"]) == 0
    dataset = strict_json(streamed / "metrics.json")["dataset"]
    assert dataset["storage"].endswith("\\xff\\xfe.npy") and dataset["count_data"].endswith("r\\xfe.npy")
    bench = tmp_path / "bench"
    assert main(["benchmark", "--counts", str(counts), "--labels", labels, "--methods", "pca10", "--seeds", "1",
                 "--quiet", "--out", str(bench)]) == 0
    assert [r["dataset"] for r in strict_json(bench / "benchmark.json")["results"]] == ["\\xff\\xfe"]


def test_a_standard_error_that_cannot_be_written_does_not_stop_the_command(sim_dir, tmp_path):
    """2>/dev/full (or a full disk under 2>>log): the progress lines are lost, the command is not."""
    args = ["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"), "--epochs", "1",
            "--out", str(tmp_path / "m.pt")]
    with open(os.devnull if not Path("/dev/full").exists() else "/dev/full", "w") as full:
        done = _run_scae(args, tmp_path, stderr=full, stdout=subprocess.PIPE, text=True)
        assert done.returncode == 0 and (tmp_path / "m.pt").is_file()
        refused = _run_scae([*args[:2], str(tmp_path / "missing.npy"), *args[3:]], tmp_path, stderr=full)
        assert refused.returncode == 2


@pytest.mark.parametrize(("env", "line"), [
    ({"PYTHONOPTIMIZE": "2"}, "scae: error: Python runs with -OO (PYTHONOPTIMIZE=2), which strips the docstrings "
                              "anndata needs to load; unset PYTHONOPTIMIZE (or set it to 1)\n"),
    ({"TORCH_LOGS": "garbage"}, "scae: error: PyTorch cannot load with TORCH_LOGS='garbage' (Invalid log settings: "
                                "garbage); unset it or fix it\n"),
])
def test_an_environment_that_breaks_a_library_is_one_line_before_any_work(tmp_path, env, line):
    out = tmp_path / "out"
    done = _run_scae(["study", "--out", str(out)], tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == line
    assert not out.exists()


def test_a_study_into_the_folder_above_the_working_directory_it_replaces(sim_dir, tmp_path):
    """--out .. from inside OUT/models: the commit moves that folder, and '..' moved with it."""
    out = tmp_path / "out"
    first = study_args(sim_dir, out)
    assert main(first) == 0
    args = [*first[:first.index("--out")], "--out", "..", *first[first.index("--out") + 2:]]
    done = _run_scae(args, out / "models", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "report.html").is_file() and not (out / ".scae-staging").exists()
    assert {p.name for p in (out / "models").iterdir()} == {f"{spec.name}.pt" for spec in DEFAULT_RUNS}


def test_a_model_file_name_of_255_bytes_is_written(sim_dir, tmp_path):
    """Its temporary beside it (.NAME.xxxxxxxx.part) was longer than the system's 255 bytes."""
    out = tmp_path / ("é" * 126 + ".pt")  # 255 bytes, the most a name may have
    assert main(["fit", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                 "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]
