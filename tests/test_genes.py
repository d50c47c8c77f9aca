"""Highly variable genes (scae.genes): scanpy's seurat_v3 and seurat rules, in memory and streamed."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scae.data import make_dataset, read_counts_labels, read_h5ad
from scae.errors import ScaeInputError
from scae.genes import LOESS_MIN_GENES, highly_variable_genes, hvg_flavor
from scae.simulate import simulate_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # as tests/test_real_data.py
CELLBENCH = SHARED / "cellbench_3celllines"
BUETTNER = SHARED / "buettner_mesc_cellcycle" / "buettner_mesc_cellcycle.npz"


@pytest.fixture(scope="module")
def simulated():
    """The built-in model at a small size: log-normalised X with the simulated counts beside it."""
    return simulate_dataset(1500, 400, 3, seed=2)


def scanpy_hvg(matrix, n_top: int, flavor: str) -> np.ndarray:
    """The genes scanpy marks as highly variable (no batches)."""
    sc = pytest.importorskip("scanpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sc.pp.highly_variable_genes(ad.AnnData(X=matrix.copy()), flavor=flavor, n_top_genes=n_top, inplace=False)
    return np.flatnonzero(table["highly_variable"].to_numpy())


def labels_of(n: int) -> list[str]:
    return [f"t{i % 3}" for i in range(n)]


# ---------------------------------------------------------------- against scanpy
@pytest.mark.parametrize("n_top", [10, 100, 250])
def test_seurat_v3_on_counts_matches_scanpy(simulated, n_top):
    genes = highly_variable_genes(simulated, n_top)
    assert hvg_flavor(simulated) == "seurat_v3"
    assert genes.dtype == np.int64 and genes.size == n_top and np.all(np.diff(genes) > 0)
    np.testing.assert_array_equal(genes, scanpy_hvg(simulated.raw, n_top, "seurat_v3"))


@pytest.mark.parametrize("n_top", [10, 100, 250])
def test_seurat_on_lognormalised_values_matches_scanpy(simulated, n_top):
    lognorm = make_dataset(simulated.X, simulated.labels)  # no counts: the seurat rule
    assert hvg_flavor(lognorm) == "seurat"
    genes = highly_variable_genes(lognorm, n_top)
    assert genes.size == n_top
    np.testing.assert_array_equal(genes, scanpy_hvg(simulated.X, n_top, "seurat"))


def test_training_cells_only(simulated):
    cells = np.arange(0, simulated.n_cells, 3)
    genes = highly_variable_genes(simulated, 80, cells)
    np.testing.assert_array_equal(genes, scanpy_hvg(simulated.raw[cells], 80, "seurat_v3"))
    assert not np.array_equal(genes, highly_variable_genes(simulated, 80))  # other cells, other genes
    lognorm = make_dataset(simulated.X, simulated.labels)
    np.testing.assert_array_equal(highly_variable_genes(lognorm, 80, cells), scanpy_hvg(simulated.X[cells], 80, "seurat"))


@pytest.mark.skipif(not CELLBENCH.is_dir(), reason="shared real data not present")
def test_seurat_v3_on_real_counts_matches_scanpy():
    """CellBench Drop-seq: 225 cells × 15,127 genes of raw UMI counts, many genes never seen."""
    counts = pd.read_csv(CELLBENCH / "sc_dropseq.count.csv.gz", index_col=0)
    meta = pd.read_csv(CELLBENCH / "sc_dropseq.metadata.csv.gz", index_col=0)
    X = sp.csr_matrix(counts[meta.index].T.to_numpy().astype(np.float32))
    ds = make_dataset(X, meta["cell_line_demuxlet"].to_numpy(), var_names=counts.index.to_numpy())
    assert ds.counts
    cells = np.arange(0, ds.n_cells, 5)[1:]
    for n_top, rows in ((2000, None), (500, cells)):
        genes = highly_variable_genes(ds, n_top, rows)
        reference = X if rows is None else X[rows]
        np.testing.assert_array_equal(genes, scanpy_hvg(reference, n_top, "seurat_v3"))


@pytest.mark.skipif(not BUETTNER.is_file(), reason="shared real data not present")
def test_seurat_on_real_lognormalised_data_matches_scanpy():
    """Buettner mESC: 182 cells × 8,989 genes, log-scale normalised (no counts)."""
    data = np.load(BUETTNER)
    X, labels = data["X"], data["labels"]
    ds = make_dataset(X, labels.astype(str))
    assert not ds.has_counts
    genes = highly_variable_genes(ds, 1000)
    np.testing.assert_array_equal(genes, scanpy_hvg(X, 1000, "seurat"))


# ---------------------------------------------------------------- streamed equals in memory
def test_streamed_counts_give_the_same_genes_exactly(simulated, tmp_path):
    path = tmp_path / "counts.h5ad"
    counts = simulated.raw
    obs = pd.DataFrame({"cell_type": pd.Categorical(simulated.labels)}, index=simulated.obs_names)
    ad.AnnData(X=counts, obs=obs).write_h5ad(path)
    streamed, loaded = read_h5ad(path, "cell_type", stream=True), read_h5ad(path, "cell_type", stream=False)
    assert streamed.on_disk and streamed.counts and not loaded.on_disk and loaded.counts
    cells = np.sort(np.random.default_rng(0).choice(simulated.n_cells, 1000, replace=False))
    for n_top, rows in ((50, None), (150, cells)):
        from_disk = highly_variable_genes(streamed, n_top, rows)
        np.testing.assert_array_equal(from_disk, highly_variable_genes(loaded, n_top, rows))
        np.testing.assert_array_equal(from_disk, highly_variable_genes(simulated, n_top, rows))  # counts beside X
    np.save(tmp_path / "counts.npy", counts.toarray())
    (tmp_path / "labels.txt").write_text("\n".join(simulated.labels) + "\n")
    mapped = read_counts_labels(tmp_path / "counts.npy", tmp_path / "labels.txt", stream=True)
    np.testing.assert_array_equal(highly_variable_genes(mapped, 150, cells), highly_variable_genes(loaded, 150, cells))


def test_streamed_lognormalised_values_give_the_same_genes_exactly(simulated, tmp_path):
    path = tmp_path / "lognorm.h5ad"
    obs = pd.DataFrame({"cell_type": pd.Categorical(simulated.labels)}, index=simulated.obs_names)
    ad.AnnData(X=simulated.X, obs=obs).write_h5ad(path)
    streamed, loaded = read_h5ad(path, "cell_type", stream=True), read_h5ad(path, "cell_type")
    assert not streamed.has_counts and not loaded.has_counts
    cells = np.arange(1, simulated.n_cells, 2)
    np.testing.assert_array_equal(highly_variable_genes(streamed, 120, cells), highly_variable_genes(loaded, 120, cells))


def test_selection_of_the_streamed_genes_feeds_the_models(simulated, tmp_path):
    """The genes chosen on disk select the same model input as in memory."""
    path = tmp_path / "counts.h5ad"
    obs = pd.DataFrame({"cell_type": pd.Categorical(simulated.labels)}, index=simulated.obs_names)
    ad.AnnData(X=simulated.raw, obs=obs).write_h5ad(path)
    streamed = read_h5ad(path, "cell_type", stream=True)
    genes = highly_variable_genes(streamed, 60)
    rows = np.array([0, 10, 1499])
    np.testing.assert_allclose(
        streamed.select_genes(genes).source().tensor(rows).numpy(),
        simulated.select_genes(genes).source().tensor(rows).numpy(), rtol=1e-6,
    )


# ---------------------------------------------------------------- edges
def test_as_many_genes_as_there_are_or_more_keeps_every_gene(simulated):
    for n_top in (simulated.n_genes, simulated.n_genes + 7):
        np.testing.assert_array_equal(highly_variable_genes(simulated, n_top), np.arange(simulated.n_genes))


def test_same_input_same_genes(simulated):
    np.testing.assert_array_equal(highly_variable_genes(simulated, 40), highly_variable_genes(simulated, 40))


@pytest.mark.parametrize("n_top", [0, -3, 2.5, True])
def test_n_top_must_be_a_positive_integer(simulated, n_top):
    with pytest.raises(ValueError, match="n_top must be an integer >= 1"):
        highly_variable_genes(simulated, n_top)


@pytest.mark.parametrize("cells, message", [
    (np.array([3, 1]), "sorted and distinct"), (np.array([0, 1500]), "0…1499"), (np.array([4]), "at least 2 cells"),
])
def test_cells_must_be_sorted_indices(simulated, cells, message):
    with pytest.raises(ValueError, match=message):
        highly_variable_genes(simulated, 10, cells)


def test_too_few_varying_genes_for_the_loess_fit_is_one_line():
    rng = np.random.default_rng(0)
    counts = np.zeros((50, 30), dtype=np.float32)
    counts[:, : LOESS_MIN_GENES - 1] = rng.poisson(3.0, size=(50, LOESS_MIN_GENES - 1))
    ds = make_dataset(counts, labels_of(50))
    with pytest.raises(ScaeInputError) as info:
        highly_variable_genes(ds, 5)
    assert str(info.value) == (
        f"highly variable genes (seurat_v3): only {LOESS_MIN_GENES - 1} genes have counts that vary over the 50 "
        f"cells measured; expected at least {LOESS_MIN_GENES} for the loess fit of variance on mean"
    )


def test_seurat_refuses_values_that_are_not_logs():
    values = np.tile(np.arange(1.0, 41.0), (10, 1)) * np.arange(1, 11)[:, None] * 10  # up to 4000: expm1 overflows
    ds = make_dataset(values, labels_of(10), normalize="none")
    with pytest.raises(ScaeInputError, match=r"^highly variable genes \(seurat\): expm1 of the values overflows"):
        highly_variable_genes(ds, 5)
