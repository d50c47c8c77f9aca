"""The study through the Python API on edge-case shapes, and its helpers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import scae
from scae.embeddings import BackgroundTSNE, TSNEConfig, tsne_coordinates
import scae.genes
from scae.results import RECOMMENDED_RUN
from scae.study import RunSpec, StudyConfig

FAST_TSNE = TSNEConfig(early_exaggeration_iter=30, n_iter=30)


def fast_config(**kwargs) -> StudyConfig:
    return StudyConfig(epochs=1, progress=False, kmeans_seeds=1, tsne=FAST_TSNE, hidden=(16,), **kwargs)


def test_study_config_to_dict_is_json():
    cfg = StudyConfig(epochs=7, hidden=(64, 32), seed=3)
    d = cfg.to_dict()
    assert "progress" not in d
    assert d["epochs"] == 7 and d["hidden"] == [64, 32] and d["seed"] == 3
    assert [r["name"] for r in d["runs"]] == ["ae10", "ae50", "ae2", "ae10_nonzero", "recommended"]
    assert [r["preset"] for r in d["runs"]] == [None, None, None, None, "recommended"]
    json.dumps(d, allow_nan=False)


def test_run_study_without_output_dir(small_dataset):
    result = scae.run_study(small_dataset, None, fast_config())
    assert set(result.runs) == {"ae10", "ae50", "ae2", "ae10_nonzero", "recommended"}  # the data has counts
    n = small_dataset.n_cells
    assert result.train_idx.size + result.test_idx.size == n
    for run in result.runs.values():
        assert run.latent.shape == (n, run.spec.latent_dim)
        assert run.reconstruction.shape == (n, small_dataset.n_genes)
    assert result.views["X_tsne"].shape == (n, 2)
    adata = result.to_anndata()
    assert adata.obsm["X_ae2"].shape == (n, 2)
    json.dumps(result.metrics(), allow_nan=False)


def test_write_study_keeps_the_compute_timings(small_dataset, tmp_path):
    from scae.study import write_study

    result = scae.run_study(small_dataset, None, fast_config())
    write_study(result, tmp_path / "out")
    timings = json.loads((tmp_path / "out" / "metrics.json").read_text())["timings"]
    assert {"split", "train_ae10", "pca", "tsne_wait", "figures", "write_models_h5ad"} <= set(timings)
    assert (tmp_path / "out" / "report.html").is_file()


def test_background_tsne_independent_of_workers():
    rng = np.random.default_rng(0)
    inputs = {"a": rng.normal(size=(90, 12)), "b": rng.normal(size=(90, 70)).astype(np.float32)}
    results = {}
    for workers in (0, 2):
        with BackgroundTSNE(inputs, seed=2, config=FAST_TSNE, workers=workers) as jobs:
            results[workers] = jobs.results()
        assert set(jobs.seconds) == {"a", "b"} and all(v > 0 for v in jobs.seconds.values())
    one, two = results[0], results[2]
    assert list(one) == list(two) == ["a", "b"]
    for key in inputs:
        assert one[key].shape == (90, 2) and one[key].dtype == np.float32
        np.testing.assert_array_equal(one[key], two[key])
        np.testing.assert_array_equal(one[key], tsne_coordinates(inputs[key], 2, FAST_TSNE))


def test_study_results_do_not_depend_on_background_workers(tmp_path):
    """Scores, t-SNEs and figures computed by a background worker (the first two while the models
    train) equal those computed in this process (every job single-threaded)."""
    from scae.study import TSNE_WORKERS_FROM_CELLS

    ds = scae.simulate_dataset(TSNE_WORKERS_FROM_CELLS, 60, 3, seed=1)
    runs = tuple(spec for spec in StudyConfig().runs if spec.name in ("ae10", "recommended"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the study trains on the cores its workers leave: the same thread count in both
    try:
        one, two = (scae.run_study(ds, tmp_path / f"w{w}", fast_config(runs=runs, tsne_workers=w)) for w in (0, 1))
    finally:
        torch.set_num_threads(threads)
    figures = {w: {p.name: p.read_bytes() for p in (tmp_path / f"w{w}" / "figures").iterdir()} for w in (0, 1)}
    assert len(figures[0]) >= 6 and figures[0] == figures[1]
    drawn_by_worker = [k for k in two.timings if k.startswith("figure_worker_")]
    assert len(drawn_by_worker) == len(figures[1]) // 2
    assert not [k for k in one.timings if k.startswith("figure_worker_")]
    assert list(one.representations) == list(two.representations)
    assert list(one.representations)[:4] == ["original", "original_pca2", "original_pca10", "original_pca50"]
    assert one.representations == two.representations
    assert set(one.views) == set(two.views)
    for key in one.views:
        np.testing.assert_array_equal(one.views[key], two.views[key])
    assert {"tsne_worker_X_tsne", "scores_worker_ae10_latent"} <= set(two.timings)
    # the top PCs that are all of the input's PCs share its cluster scores, and add linear accuracy
    original, top = one.representations["original"], one.representations["original_pca50"]
    assert top["ari"] == original["ari"] and "linear_accuracy" in top and "linear_accuracy" not in original


def test_study_uses_workers_its_caller_started(tmp_path):
    """The command line starts the workers before its heavy imports, also for a small input (below
    the size at which the study would start its own): the results are those of a study without
    workers, and workers with other t-SNE settings are refused."""
    ds = scae.simulate_dataset(200, 30, 3, seed=1)
    runs = tuple(spec for spec in StudyConfig().runs if spec.name == "ae10")
    config = fast_config(runs=runs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = scae.run_study(ds, tmp_path / "alone", config)
        with BackgroundTSNE(None, config.seed, FAST_TSNE, workers=1) as jobs:
            given = scae.run_study(ds, tmp_path / "given", config, jobs=jobs)
            assert jobs.workers == 1
    finally:
        torch.set_num_threads(threads)
    assert [k for k in given.timings if k.startswith("figure_worker_")]  # the worker drew some figures
    assert not [k for k in alone.timings if k.startswith("figure_worker_")]
    assert given.representations == alone.representations
    np.testing.assert_array_equal(given.views["X_tsne"], alone.views["X_tsne"])
    with BackgroundTSNE(None, config.seed + 1, FAST_TSNE, workers=0) as jobs:
        with pytest.raises(ValueError, match="seed 1 .* the study has seed 0"):
            scae.run_study(ds, None, config, jobs=jobs)


def test_the_study_imports_matplotlib_only_to_write_outputs():
    """The study's figure libraries are imported while its workers finish (``import_writers``),
    not when it starts: the command line's start-up imports only what training needs."""
    code = "import sys, scae.study; print(sorted(m for m in ('matplotlib', 'jinja2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_score_rows_follow_the_report_order_whatever_the_run_names():
    ds = scae.simulate_dataset(150, 30, 3, seed=0)
    runs = (RunSpec("ae2", 2, "mse"), RunSpec("original_wide", 10, "mse"))
    result = scae.run_study(ds, None, fast_config(runs=runs))
    assert list(result.representations) == [
        "original", "original_pca2", "original_pca10",
        "ae2_reconstruction", "ae2_latent", "original_wide_reconstruction", "original_wide_latent",
    ]


def test_study_on_few_genes_dense(tmp_path):
    ds = scae.simulate_dataset(120, 30, 3, seed=0)
    dense = scae.make_dataset(ds.X.toarray(), ds.labels)
    only_q3 = (RunSpec("ae10", 10, "mse", tsne_reconstruction=True),)  # the run the Q3 section needs
    scae.run_study(dense, tmp_path, fast_config(runs=only_q3))
    assert (tmp_path / "report.html").is_file()


def test_study_on_few_genes_sparse():
    ds = scae.simulate_dataset(120, 30, 3, seed=0)
    result = scae.run_study(ds, None, fast_config())
    assert "linear_accuracy" in result.representations["original"]


def test_too_small_embed_sample_is_refused_before_training(tmp_path):
    ds = scae.simulate_dataset(120, 30, 3, seed=0)
    with pytest.raises(scae.ScaeInputError, match=r"max_embed_cells \(--max-embed-cells\) 20 is too small for 3 labels"):
        scae.run_study(ds, tmp_path / "out", fast_config(max_embed_cells=20))
    assert not (tmp_path / "out").exists()


def test_on_full_library_rescales_a_count_reconstruction():
    from scae.study import _on_full_library

    rho = np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    recon = np.log1p(rho * 1e4).astype(np.float32)
    same = _on_full_library(recon, np.array([40.0, 10.0]), np.array([40.0, 10.0]))
    np.testing.assert_allclose(same, recon, rtol=1e-6)  # no selection: unchanged
    half = _on_full_library(recon, np.array([40.0, 10.0]), np.array([80.0, 10.0]))
    np.testing.assert_allclose(half[0], np.log1p(rho[0] * 40 / 80 * 1e4), rtol=1e-6)
    np.testing.assert_allclose(_on_full_library(recon, np.array([5.0, 1.0]), np.array([0.0, 1.0]))[0], 0.0)


def test_count_run_on_selected_genes_is_scored_on_the_mse_runs_scale():
    """With --top-genes, the recommended run's reconstruction and errors are per 10⁴ of the whole library,
    like the MSE runs' input, not per 10⁴ of the selected genes."""
    dataset = scae.simulate_dataset(300, 80, 3, seed=4)
    result = scae.run_study(dataset, None, fast_config(top_genes=30, runs=(RECOMMENDED_RUN,)))
    run = result.runs["recommended"]
    selected = scae.genes.highly_variable_genes(dataset, 30, result.train_idx)
    counts = dataset.raw.toarray()
    full = counts.sum(axis=1, keepdims=True)
    target = np.log1p(counts[:, selected] / full * 1e4)  # the MSE runs' input on these genes
    expected = np.log1p(np.expm1(run.model.reconstruct(counts[:, selected])) * counts[:, selected].sum(axis=1, keepdims=True) / full)
    np.testing.assert_allclose(run.reconstruction, expected, rtol=1e-4, atol=1e-5)
    test = result.test_idx
    assert run.errors["test"]["mse"] == pytest.approx(float(np.mean((target[test] - expected[test]) ** 2)), rel=1e-4)


def test_resume_onto_a_device_that_is_not_here_blames_the_device_not_the_models(small_dataset, tmp_path):
    import types

    from scae.errors import ScaeInputError
    from scae.study import _reusable_models

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    output = types.SimpleNamespace(models=tmp_path / "staging", path=tmp_path)
    with pytest.raises(ScaeInputError) as err:
        _reusable_models(small_dataset, StudyConfig(resume=True, device="cuda"), output)
    assert str(err.value) == "--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu or auto"


def test_a_study_of_cells_too_sparse_to_hide_entries_completes(tmp_path):
    """With 4 nonzero entries in all, 10% of the evaluated ones is no entry at all: the denoising
    measure says so (NaN scores, which metrics.json cannot hold, ended the study in a traceback)."""
    import json

    n = 300
    X = np.zeros((n, 40), dtype=np.float32)
    X[[0, 100, 200, 299], [1, 5, 9, 13]] = 1.0
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "y.txt").write_text("\n".join(["a", "b", "c"] * (n // 3)) + "\n")
    dataset = scae.read_counts_labels(tmp_path / "x.npy", tmp_path / "y.txt")
    result = scae.run_study(dataset, tmp_path / "out", scae.StudyConfig(epochs=1, progress=False))
    d = result.denoising
    assert d["n_hidden"] == 0 and d["scores"] == {}
    assert d["not_measured"] == f"the {d['n_cells']} evaluated test cells have no nonzero entry to hide"
    assert f"Not measured: the {d['n_cells']} evaluated test cells" in (tmp_path / "out" / "report.html").read_text()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["denoising"]["scores"] == {} and metrics["denoising"]["n_hidden"] == 0


def test_non_integer_counts_taken_as_counts_run_the_count_model_and_its_denoising():
    """--normalize log1p takes non-integer counts (ambient-RNA corrected, say) as counts: the count
    model trains on them and the imputation measure reconstructs them, as it does whole numbers."""
    simulated = scae.simulate_dataset(150, 30, 3, seed=0)
    counts = simulated.raw.toarray() * 0.85  # not whole numbers
    dataset = scae.make_dataset(counts, simulated.labels, normalize="log1p")
    result = scae.run_study(dataset, None, fast_config(runs=(RECOMMENDED_RUN,)))
    assert set(result.runs) == {"recommended"}
    assert set(result.denoising["scores"]) >= {"recommended", "gene_mean", "pca10"}
    assert np.isfinite(result.denoising["scores"]["recommended"]["median_abs_error"])
