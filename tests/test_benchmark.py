"""``scae benchmark`` and :mod:`scae.benchmark`: methods fitted on labelled datasets, latents scored."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import scae
from scae import benchmark
from scae.cli import main
from scae.presets import PRESETS

CELLS, GENES = 150, 30
METHODS = ["pca5", "ae2", "nb_ae", "scvi"]
SEEDS = 2
RECORD_KEYS = {"dataset", "method", "seed", "ari", "nmi", "silhouette", "knn_accuracy", "fit_seconds"}
SCVI_NOTE = "scvi-tools is not installed (pip install 'scae[peers]')"
COUNTS_NOTE = "needs raw counts; the dataset has none"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lognorm(counts: np.ndarray) -> np.ndarray:
    """log1p(counts / library size × 1e4), written out independently of scae."""
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """``counts.h5ad`` (X raw counts, obs 'ct') and ``lognorm.npy`` + ``labels.txt`` (its
    log-normalised matrix, no raw counts): 150 cells × 30 genes, 3 populations."""
    d = tmp_path_factory.mktemp("bench_in")
    counts, populations = scae.simulate_counts(CELLS, GENES, 3, seed=6)
    labels = np.array([f"type{p}" for p in populations])
    obs = pd.DataFrame({"ct": pd.Categorical(labels)}, index=[f"c{i}" for i in range(CELLS)])
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(GENES)])).write_h5ad(d / "counts.h5ad")
    dense = counts.toarray()
    np.save(d / "lognorm.npy", _lognorm(dense))
    (d / "labels.txt").write_text("\n".join(labels) + "\n")
    return SimpleNamespace(dir=d, h5ad=d / "counts.h5ad", npy=d / "lognorm.npy", labels_file=d / "labels.txt",
                           counts=dense, labels=labels)


def _bench_args(files, out: Path, *extra: str) -> list[str]:
    return ["benchmark", "--h5ad", str(files.h5ad), "--label-key", "ct", "--counts", str(files.npy),
            "--labels", str(files.labels_file), "--out", str(out), "--device", "cpu", "--quiet", *extra]


@pytest.fixture
def no_scvi(monkeypatch):
    """scvi-tools treated as not installed (it is not in the project's venv), whatever the environment."""
    import scae.peers

    monkeypatch.setattr(scae.peers, "scvi_available", lambda: False)


@pytest.fixture(scope="module")
def run(files, tmp_path_factory) -> SimpleNamespace:
    """One ``scae benchmark`` of pca5, ae2, nb_ae and scvi on both datasets with 2 seeds."""
    import scae.peers

    out = tmp_path_factory.mktemp("bench") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scae.peers, "scvi_available", lambda: False)
        assert main(_bench_args(files, out, "--methods", *METHODS, "--seeds", str(SEEDS))) == 0
    content = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    return SimpleNamespace(out=out, content=content)


def assert_one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("scae: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert needle in err and "Traceback" not in err
    return err


# ---------------------------------------------------------------- the command's outputs
def test_benchmark_json_structure(run):
    content = run.content
    assert set(content) == {"scae_version", "settings", "results", "summary", "skipped"}
    assert content["scae_version"] == scae.__version__
    settings = content["settings"]
    assert settings["seeds"] == [0, 1] and settings["top_genes"] == 2000 and settings["methods"] == METHODS
    assert settings["datasets"] == {"counts": "counts.h5ad (labels: obs['ct'])", "lognorm": "lognorm.npy + labels.txt"}
    assert all(set(record) == RECORD_KEYS for record in content["results"])
    assert (run.out / "benchmark.png").read_bytes().startswith(PNG_MAGIC)
    assert (run.out / "benchmark.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_benchmark_one_record_per_dataset_method_seed(run):
    fitted = [(r["dataset"], r["method"], r["seed"]) for r in run.content["results"]]
    expected = [("counts", m, s) for m in ("pca5", "ae2", "nb_ae") for s in (0, 1)]
    expected += [("lognorm", m, s) for m in ("pca5", "ae2") for s in (0, 1)]
    assert fitted == expected
    skipped = {(s["dataset"], s["method"]): s["reason"] for s in run.content["skipped"]}
    assert skipped == {("counts", "scvi"): SCVI_NOTE, ("lognorm", "nb_ae"): COUNTS_NOTE,
                       ("lognorm", "scvi"): COUNTS_NOTE}


def test_benchmark_scores_in_range(run):
    for record in run.content["results"]:
        assert -0.5 <= record["ari"] <= 1 and 0 <= record["nmi"] <= 1
        assert -1 <= record["silhouette"] <= 1 and 0 <= record["knn_accuracy"] <= 1
        assert record["fit_seconds"] >= 0
        # 15-NN accuracy is a fraction of the cells: k / 150
        assert record["knn_accuracy"] * CELLS == pytest.approx(round(record["knn_accuracy"] * CELLS), abs=1e-9)


def test_benchmark_summary_is_mean_and_sd_over_seeds(run):
    results, summary = run.content["results"], run.content["summary"]
    assert [(row["dataset"], row["method"]) for row in summary] == [
        ("counts", "pca5"), ("counts", "ae2"), ("counts", "nb_ae"), ("lognorm", "pca5"), ("lognorm", "ae2")]
    for row in summary:
        records = [r for r in results if (r["dataset"], r["method"]) == (row["dataset"], row["method"])]
        assert row["seeds"] == len(records) == SEEDS
        for key in ("ari", "nmi", "silhouette", "knn_accuracy", "fit_seconds"):
            values = [r[key] for r in records]
            assert row[key] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert row[f"{key}_sd"] == pytest.approx(statistics.pstdev(values), abs=1e-12)
    # PCA does not depend on the seed: its labels' silhouette is the same for every seed
    pca = next(row for row in summary if row["method"] == "pca5" and row["dataset"] == "counts")
    assert pca["silhouette_sd"] == pytest.approx(0, abs=1e-12)


def test_benchmark_records_score_the_methods_latent(run, files):
    """The pca5 record of seed 1 on the counts dataset, recomputed with scikit-learn."""
    dataset = scae.read_h5ad(files.h5ad, "ct")
    latent = benchmark.method("pca5").fit(dataset, 1)
    record = next(r for r in run.content["results"] if (r["dataset"], r["method"], r["seed"]) == ("counts", "pca5", 1))
    kmeans = [KMeans(n_clusters=3, n_init=1, random_state=s).fit_predict(latent) for s in range(1, 6)]
    assert record["ari"] == pytest.approx(np.mean([adjusted_rand_score(files.labels, k) for k in kmeans]), abs=1e-9)
    assert record["nmi"] == pytest.approx(np.mean([normalized_mutual_info_score(files.labels, k) for k in kmeans]),
                                          abs=1e-9)
    assert record["silhouette"] == pytest.approx(silhouette_score(latent, files.labels), abs=1e-5)
    folds = StratifiedKFold(5, shuffle=True, random_state=1)
    knn = cross_val_score(KNeighborsClassifier(15), latent, files.labels, cv=folds).mean()
    assert record["knn_accuracy"] == pytest.approx(knn, abs=1e-9)


def test_benchmark_html_tables_and_notes(run):
    html = (run.out / "benchmark.html").read_text(encoding="utf-8")
    assert "<h2>counts</h2>" in html and "<h2>lognorm</h2>" in html
    assert "scvi on counts: scvi-tools is not installed (pip install &#39;scae[peers]&#39;)" in html
    assert f"nb_ae on lognorm: {COUNTS_NOTE}" in html
    pca = next(row for row in run.content["summary"] if row["method"] == "pca5" and row["dataset"] == "counts")
    assert f"{pca['ari']:.3f} ± {pca['ari_sd']:.3f}" in html
    assert 'src="data:image/png;base64,' in html


def test_benchmark_html_escapes_a_hostile_dataset_name(files, tmp_path, no_scvi):
    hostile = tmp_path / "<b>x<i>&co.h5ad"  # the stem becomes the dataset's name
    shutil.copy(files.h5ad, hostile)
    out = tmp_path / "out"
    assert main(["benchmark", "--h5ad", str(hostile), "--h5ad", str(hostile), "--label-key", "ct", "--out", str(out),
                 "--methods", "pca5", "--seeds", "1", "--quiet"]) == 0
    content = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert [r["dataset"] for r in content["results"]] == ["<b>x<i>&co", "<b>x<i>&co_2"]  # names kept apart
    html = (out / "benchmark.html").read_text(encoding="utf-8")
    assert "<b>" not in html and "<i>" not in html and "&lt;b&gt;x&lt;i&gt;&amp;co" in html


# ---------------------------------------------------------------- refused input
@pytest.mark.parametrize("case, needle", [
    ("unknown_method", "unknown method 'umap'; expected one of: pca<k>, pca<k>_scaled, ae10, ae50, ae2, ae10_nonzero, "
                       + ", ".join(PRESETS) + ", recommended, scvi"),
    ("pca0", "unknown method 'pca0'"),
    ("pca05", "method 'pca05': write it pca5"),
    ("pca05_scaled", "method 'pca05_scaled': write it pca5_scaled"),
    ("pca_scaled", "unknown method 'pca_scaled'"),
    ("pca_superscript", "unknown method 'pca²'"),
    ("few_cells", "small19.npy + "),
    ("no_label_key", "--label-key is required with --h5ad (the obs column of cell labels)"),
    ("unknown_label_key", "no obs column 'celltype'"),
    ("unpaired", "--counts and --labels go in pairs: one labels file after each counts file"),
    ("no_dataset", "give at least one dataset"),
    *((f"pair_with_{option}", "--label-key, --counts-layer and --counts-raw go with --h5ad; a --counts file's labels "
                              "are its --labels file") for option in ("label_key", "counts_layer", "counts_raw")),
])
def test_benchmark_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, case, needle):
    out = tmp_path / "out"
    base = ["benchmark", "--out", str(out), "--quiet", "--methods", "pca5"]
    args = {
        "unknown_method": ["--h5ad", str(files.h5ad), "--label-key", "ct", "--methods", "pca5", "umap"],
        "pca0": ["--h5ad", str(files.h5ad), "--label-key", "ct", "--methods", "pca0"],
        "no_label_key": ["--h5ad", str(files.h5ad)],
        "unknown_label_key": ["--h5ad", str(files.h5ad), "--label-key", "celltype"],
        "unpaired": ["--counts", str(files.npy), "--labels", str(files.labels_file), "--counts", str(files.npy)],
        "no_dataset": [],
        "pca05": ["--h5ad", str(files.h5ad), "--label-key", "ct", "--methods", "pca05"],
        "pca05_scaled": ["--h5ad", str(files.h5ad), "--label-key", "ct", "--methods", "pca05_scaled"],
        "pca_scaled": ["--h5ad", str(files.h5ad), "--label-key", "ct", "--methods", "pca_scaled"],
        "pca_superscript": ["--h5ad", str(files.h5ad), "--label-key", "ct", "--methods", "pca²"],
        "few_cells": ["--counts", str(tmp_path / "small19.npy"), "--labels", str(tmp_path / "small19.txt")],
        **{f"pair_with_{option}": ["--counts", str(files.npy), "--labels", str(files.labels_file), *extra]
           for option, extra in (("label_key", ["--label-key", "ct"]), ("counts_layer", ["--counts-layer", "umi"]),
                                 ("counts_raw", ["--counts-raw"]))},
    }[case]
    _small(tmp_path, 19)
    assert main([*base, *args]) == 2
    assert_one_line_error(capsys, needle)
    assert not out.exists() or not any(out.rglob("*"))


def _small(folder: Path, cells: int) -> tuple[Path, Path]:
    """small<cells>.npy + small<cells>.txt: ``cells`` cells × 12 genes, two labels."""
    rng = np.random.default_rng(cells)
    np.save(folder / f"small{cells}.npy", _lognorm(rng.poisson(2.0, (cells, 12)).astype(np.float32) + 1))
    (folder / f"small{cells}.txt").write_text("\n".join("ab"[i % 2] for i in range(cells)) + "\n")
    return folder / f"small{cells}.npy", folder / f"small{cells}.txt"


def test_benchmark_names_the_files_and_skips_pca_beyond_the_genes(files, tmp_path, capsys):
    out = tmp_path / "out"
    counts, labels = _small(tmp_path, 20)  # the fewest cells it scores
    assert main(["benchmark", "--counts", str(counts), "--labels", str(labels), "--methods", "pca5", "pca13",
                 "--seeds", "1", "--out", str(out), "--quiet"]) == 0
    content = json.loads((out / "benchmark.json").read_text())
    assert content["settings"]["paths"] == {"small20": f"{counts.resolve()} + {labels.resolve()}"}
    assert [r["method"] for r in content["results"]] == ["pca5"]
    assert content["skipped"] == [{"dataset": "small20", "method": "pca13",
                                   "reason": "13 principal components of 20 cells × 12 genes (at most 12)"}]


def test_benchmark_seeds_out_of_range_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["benchmark", "--out", str(tmp_path / "o"), "--seeds", "0"])
    assert info.value.code == 2
    assert "argument --seeds: expected an integer in [1, 100], got 0" in capsys.readouterr().err


# ---------------------------------------------------------------- the module
def test_pca_method_is_scikit_learns_pca_of_the_log_normalised_matrix(files):
    reference = PCA(n_components=10, svd_solver="full").fit_transform(_lognorm(files.counts).astype(np.float64))
    for dataset in (scae.read_h5ad(files.h5ad, "ct"), scae.read_counts_labels(files.npy, files.labels_file)):
        latent = benchmark.method("pca10").fit(dataset, 0)
        assert latent.shape == (CELLS, 10) and latent.dtype == np.float32
        signs = np.sign(np.sum(latent * reference, axis=0))  # each component is defined up to its sign
        np.testing.assert_allclose(latent * signs, reference, atol=2e-3 * np.abs(reference).max())
        np.testing.assert_array_equal(benchmark.method("pca10").fit(dataset, 7), latent)  # no seed dependence


def test_scaled_pca_is_scanpys_scale_then_pca(files):
    """Each gene standardised over the cells (sample standard deviation) and clipped at ±10 (a
    constant gene is 0), then PCA:
    what ``sc.pp.scale(adata, max_value=10)`` and ``sc.tl.pca`` compute."""
    X = _lognorm(files.counts).astype(np.float64)
    X[:, 3] = 1.5  # a constant gene
    X[0, 5] = 1e3  # a value far above its gene's spread: clipped
    scaled = benchmark.scaled_genes(X)
    z = (X[:, 5] - X[:, 5].mean()) / X[:, 5].std(ddof=1)
    assert scaled[0, 5] == 10.0 and z[0] > 10
    np.testing.assert_allclose(scaled[1:, 5], z[1:], rtol=1e-5, atol=1e-6)
    assert np.all(scaled[:, 3] == 0)
    j = 7 if X[:, 7].std() > 0 else int(np.argmax(X[:, 6:].std(axis=0))) + 6  # a gene that varies
    np.testing.assert_allclose(scaled[:, j], np.clip((X[:, j] - X[:, j].mean()) / X[:, j].std(ddof=1), -10, 10),
                               rtol=1e-5, atol=1e-6)
    dataset = scae.make_dataset(X.astype(np.float32), files.labels)
    latent = benchmark.method("pca4_scaled").fit(dataset, 0)
    reference = PCA(n_components=4, svd_solver="full").fit_transform(benchmark.scaled_genes(dataset.X).astype(np.float64))
    signs = np.sign(np.sum(latent * reference, axis=0))
    np.testing.assert_allclose(latent * signs, reference, atol=2e-3 * np.abs(reference).max())
    sc = pytest.importorskip("scanpy")
    adata = ad.AnnData(X=X.copy())
    sc.pp.scale(adata, max_value=10)
    np.testing.assert_allclose(scaled, adata.X, rtol=1e-4, atol=1e-4)


def test_method_names_and_kinds():
    from scae.presets import PRESETS

    assert benchmark.method_names() == ["pca10", "pca10_scaled", "ae10", "ae50", "ae2", "ae10_nonzero", *PRESETS,
                                        "recommended", "scvi"]
    assert not benchmark.method("pca3").needs_counts and not benchmark.method("ae10").needs_counts
    assert benchmark.method("nb_vae").needs_counts and benchmark.method("recommended").needs_counts
    assert benchmark.method("scvi").peer and benchmark.method("scvi").needs_counts
    with pytest.raises(scae.ScaeInputError, match="unknown method 'pca'"):
        benchmark.method("pca")
    with pytest.raises(scae.ScaeInputError, match=r"^method 'pca00000001': write it pca1$"):
        benchmark.method("pca00000001")
    for suffix in ("", "_scaled"):  # more digits than int() converts: one line, not Python's limit
        with pytest.raises(scae.ScaeInputError, match=r"^method 'pca9{17}…': at most 9999999 principal components$"):
            benchmark.method("pca" + "9" * 5000 + suffix)


def test_prepare_keeps_top_genes_of_a_larger_dataset(files):
    from scae.genes import highly_variable_genes

    dataset = scae.read_h5ad(files.h5ad, "ct")
    prepared = benchmark.prepare(dataset, 12)
    assert prepared.n_genes == 12 and prepared.n_cells == CELLS
    genes = highly_variable_genes(dataset, 12)  # measured on every cell
    assert list(prepared.var_names) == [f"g{j}" for j in genes]
    kept_counts = prepared.count_source().matrix()
    kept_counts = kept_counts.toarray() if hasattr(kept_counts, "toarray") else kept_counts
    np.testing.assert_array_equal(kept_counts, files.counts[:, genes])
    assert benchmark.prepare(dataset, GENES) is dataset and benchmark.prepare(dataset, None) is dataset


def test_prepare_matches_scanpy_seurat_v3_on_all_cells(files):
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("skmisc")
    adata = ad.AnnData(X=files.counts.copy(), var=pd.DataFrame(index=[f"g{j}" for j in range(GENES)]))
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=12)
    prepared = benchmark.prepare(scae.read_h5ad(files.h5ad, "ct"), 12)
    assert list(prepared.var_names) == list(adata.var_names[adata.var["highly_variable"].to_numpy()])


def test_run_benchmark_fits_the_prepared_dataset_with_each_seed(files):
    """A method given as a :class:`~scae.benchmark.Method` sees the top genes, every cell and each seed."""
    seen = []

    def fit(dataset, seed):
        seen.append((dataset.n_cells, dataset.n_genes, seed))
        return np.tile(np.arange(CELLS, dtype=np.float32)[:, None], (1, 2))

    dataset = scae.read_counts_labels(files.npy, files.labels_file)
    lines = []
    results, skipped = benchmark.run_benchmark({"d": dataset}, [benchmark.Method("probe", fit)], [3, 4, 3],
                                               top_genes=8, log=lines.append)  # a repeated seed fits once
    assert seen == [(CELLS, 8, 3), (CELLS, 8, 4)] and skipped == []
    assert [(r["method"], r["seed"]) for r in results] == [("probe", 3), ("probe", 4)]
    assert len(lines) == 2 and lines[0].startswith("d probe seed 3: ARI ")


@pytest.mark.parametrize(("returned", "problem"), [
    (np.zeros((3, 2)), f"returned a latent of shape (3, 2); expected ({CELLS}, k) with k ≥ 1, one row per cell"),
    (np.zeros(CELLS), f"returned a latent of shape ({CELLS},); expected ({CELLS}, k) with k ≥ 1, one row per cell"),
    (np.zeros((CELLS, 0)), f"returned a latent of shape ({CELLS}, 0); expected ({CELLS}, k) with k ≥ 1"),
    (np.full((CELLS, 2), np.nan), "returned a latent with NaN or infinite values (or beyond 32-bit floats' range)"),
    (None, f"returned None; expected a latent of shape ({CELLS}, k), one row per cell"),
    ([["a", "b"]] * CELLS, "returned list, not a numeric matrix"),
])
def test_a_custom_method_returning_no_latent_of_the_cells_is_one_clear_error(files, returned, problem):
    """Scored as it came, 3 rows would have been compared with the first 3 labels (ARI 0, 15-NN 1.0)."""
    dataset = scae.read_counts_labels(files.npy, files.labels_file)
    with pytest.raises(scae.ScaeInputError) as err:
        benchmark.run_benchmark({"d": dataset}, [benchmark.Method("m", lambda data, seed: returned)], [0])
    assert str(err.value).startswith(f"method 'm' on dataset 'd': {problem}")


def test_a_log_that_is_not_a_function_is_refused_before_any_fit(files):
    fitted = []
    dataset = scae.read_counts_labels(files.npy, files.labels_file)
    with pytest.raises(scae.ScaeInputError, match=r"^log must be None or a function taking one line of text; got int$"):
        benchmark.run_benchmark({"d": dataset}, [benchmark.Method("m", lambda d, s: fitted.append(s))], [0], log=5)
    assert fitted == []


def test_benchmark_runs_scvi_when_installed(files, tmp_path):
    """Only where scvi-tools is installed (not in the project's venv)."""
    pytest.importorskip("scvi")
    out = tmp_path / "out"
    assert main(["benchmark", "--h5ad", str(files.h5ad), "--label-key", "ct", "--out", str(out), "--methods", "scvi",
                 "--seeds", "1", "--quiet", "--device", "cpu"]) == 0
    content = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert content["skipped"] == [] and [(r["method"], r["seed"]) for r in content["results"]] == [("scvi", 0)]
    assert 0 <= content["results"][0]["knn_accuracy"] <= 1


def test_benchmark_refuses_an_input_where_it_writes(tmp_path, capsys):
    counts, labels = scae.simulate_counts(60, 20, 2, seed=1)
    out = tmp_path / "bench"
    (out / "figures").mkdir(parents=True)
    path = out / "benchmark.json"  # an input where the benchmark would write its JSON
    obs = pd.DataFrame({"ct": pd.Categorical(np.char.add("t", labels.astype(str)))}, index=[f"c{i}" for i in range(60)])
    ad.AnnData(X=counts, obs=obs).write_h5ad(tmp_path / "data.h5ad")
    shutil.copy(tmp_path / "data.h5ad", path)
    before = path.read_bytes()
    assert main(["benchmark", "--h5ad", str(path), "--label-key", "ct", "--methods", "pca2", "--seeds", "1",
                 "--out", str(out), "--quiet"]) == 2
    assert "is an input, and the benchmark would remove or overwrite it" in capsys.readouterr().err
    assert path.read_bytes() == before and not (out / "benchmark.html").exists()


def test_a_method_named_twice_runs_once(files):
    dataset = scae.read_h5ad(files.h5ad, "ct")
    results, skipped = benchmark.run_benchmark({"d": dataset}, ["pca5", "pca3", "pca5"], seeds=[0])
    assert [r["method"] for r in results] == ["pca5", "pca3"] and skipped == []


def test_the_command_line_compares_the_default_methods_by_default():
    """`scae benchmark` without --methods runs benchmark.DEFAULT_METHODS, scaled PCA included."""
    from scae.benchmark import DEFAULT_METHODS
    from scae.cli import build_parser

    args = build_parser().parse_args(["benchmark", "--h5ad", "a.h5ad", "--out", "out"])
    assert args.methods == list(DEFAULT_METHODS)
    assert "pca10_scaled" in args.methods


@pytest.mark.parametrize("kwargs, needle", [
    ({"datasets": "d"}, "datasets must be a non-empty dict of name → scae.Dataset; got 'd'"),
    ({"datasets": {}}, "datasets must be a non-empty dict of name → scae.Dataset; got an empty dict"),
    ({"datasets": {"d": "AnnData?"}}, "datasets['d'] must be a scae.Dataset"),
    ({"methods": "pca10"}, "methods must be a list of method names or Methods; got 'pca10'"),
    ({"methods": []}, "methods must be a non-empty list"),
    ({"methods": [10]}, "methods must be a non-empty list of method names or Methods; got [10]"),
    ({"seeds": 3}, "seeds must be a list of seeds; got 3"),
    ({"seeds": np.array(3)}, "seeds must be a list of seeds; got a ndarray"),
    ({"seeds": [-1]}, "each seed must be an integer in [0, "),
    ({"seeds": [0.5]}, "each seed must be an integer"),
    ({"datasets": {1: "d"}}, "datasets must be named by strings (the names in the results); got the key 1"),
    ({"seeds": []}, "seeds must hold at least one seed"),
    ({"top_genes": 0}, "top_genes must be an integer"),
])
def test_run_benchmark_checks_its_arguments(files, kwargs, needle):
    """A wrong argument is a ScaeInputError (a ValueError) naming it, before any fit."""
    from scae.errors import ScaeInputError

    arguments = {"datasets": {"d": scae.read_counts_labels(files.npy, files.labels_file)}, "methods": ["pca2"],
                 "seeds": [0], **kwargs}
    with pytest.raises(ScaeInputError) as caught:
        benchmark.run_benchmark(**arguments)
    assert needle in str(caught.value)


def test_the_benchmarks_three_files_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails (a full disk, ``ulimit -f``) on the last file left this run's chart and page
    beside the previous run's results; now the previous set stays whole."""
    import errno
    from pathlib import Path

    records = [{"dataset": "d", "method": m, "seed": s, "ari": 0.5 + s / 10, "nmi": 0.5, "silhouette": 0.1,
                "knn_accuracy": 0.9, "fit_seconds": 1.0} for m in ("pca10", "ae10") for s in (0, 1)]
    benchmark.write_benchmark(tmp_path, records, [], {"seeds": [0, 1]})
    before = {name: (tmp_path / name).read_bytes() for name in ("benchmark.png", "benchmark.html", "benchmark.json")}
    write_bytes = Path.write_bytes

    def full_at_json(self, data):
        if self.name.startswith(".benchmark.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_at_json)
    with pytest.raises(OSError, match="No space left on device"):
        benchmark.write_benchmark(tmp_path, records[:2], [], {"seeds": [0]})
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary left either
