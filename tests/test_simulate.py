"""Tests for the built-in simulated dataset (scae.simulate)."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, silhouette_score

import scae.simulate as simulate
from scae.errors import ScaeInputError
from scae.simulate import simulate_counts, simulate_dataset


@pytest.fixture(scope="module")
def default():
    return simulate_dataset()


def _same(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return (
        a.shape == b.shape
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data)
    )


def _row_totals(X: sp.csr_matrix) -> np.ndarray:
    """Per-cell sum of expm1(X), i.e. the normalized counts before log1p."""
    return np.asarray(X.astype(np.float64).expm1().sum(axis=1)).ravel()


def test_default_shape_dtype_and_storage(default):
    X = default.X
    assert X.shape == (simulate.DEFAULT_N_CELLS, simulate.DEFAULT_N_GENES) == (5000, 1000)
    assert sp.issparse(X) and X.format == "csr"
    assert X.dtype == np.float32
    assert X.has_canonical_format
    assert all(part in default.name for part in ("5000 cells", "1000 genes", "seed 0"))


def test_default_labels_and_proportions(default):
    assert default.labels.shape == (5000,)
    classes, counts = np.unique(default.labels, return_counts=True)
    assert classes.tolist() == ["pop0", "pop1", "pop2"]
    fractions = counts / counts.sum()
    np.testing.assert_allclose(fractions, [0.5, 0.3, 0.2], atol=0.05)
    assert fractions[0] > fractions[1] > fractions[2]


def test_default_zero_fraction(default):
    assert 0.6 <= default.zero_fraction() <= 0.9


def test_values_finite_nonnegative_and_normalized(default):
    data = default.X.data
    assert np.isfinite(data).all() and (data > 0).all()  # stored entries are real nonzeros
    np.testing.assert_allclose(_row_totals(default.X), 1e4, rtol=1e-4)


def test_dataset_is_log_normalized_counts():
    counts, labels = simulate_counts(400, 60, seed=2)
    ds = simulate_dataset(400, 60, seed=2)
    assert counts.format == "csr" and counts.dtype == np.float32 and counts.shape == (400, 60)
    assert np.array_equal(counts.data, np.round(counts.data)) and (counts.data >= 1).all()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    assert (totals > 0).all()
    expected = np.log1p(counts.toarray() / totals[:, None] * 1e4)
    np.testing.assert_allclose(ds.X.toarray(), expected, rtol=1e-5, atol=1e-6)
    assert ds.labels.tolist() == [f"pop{i}" for i in labels]


def test_deterministic_across_chunks_and_global_state():
    n_cells = 2 * simulate.CHUNK_SIZE + 500  # three chunks
    np.random.seed(1)
    a = simulate_dataset(n_cells, 50, seed=3)
    np.random.seed(2)
    b = simulate_dataset(n_cells, 50, seed=3)
    assert _same(a.X, b.X) and np.array_equal(a.labels, b.labels)
    c = simulate_dataset(n_cells, 50, seed=4)
    assert not _same(a.X, c.X)
    assert not np.array_equal(a.labels, c.labels)


def test_chunks_use_different_random_streams():
    n = simulate.CHUNK_SIZE
    counts, _ = simulate_counts(2 * n, 30, seed=0)
    first, second = counts[:n].toarray(), counts[n:].toarray()
    assert not np.array_equal(first, second)
    assert abs(first.mean() - second.mean()) < 0.05 * first.mean()  # same model in each chunk


@pytest.mark.parametrize(
    "n_cells, n_genes, n_populations",
    [(300, 200, 3), (6, 10, 3), (12, 10, 2), (1000, 40, 5)],
)
def test_small_sizes(n_cells, n_genes, n_populations):
    ds = simulate_dataset(n_cells, n_genes, n_populations, seed=1)
    assert ds.X.shape == (n_cells, n_genes) and ds.X.format == "csr"
    classes, counts = np.unique(ds.labels, return_counts=True)
    assert classes.tolist() == [f"pop{i}" for i in range(n_populations)]
    assert counts.min() >= 2
    assert np.isfinite(ds.X.data).all() and (ds.X.data >= 0).all()
    np.testing.assert_allclose(_row_totals(ds.X), 1e4, rtol=1e-4)


def test_cells_without_counts_are_repaired(monkeypatch):
    monkeypatch.setattr(simulate, "LIB_LOG_MEDIAN", math.log(0.5))  # most cells would be empty
    counts, _ = simulate_counts(300, 50)
    assert (np.diff(counts.indptr) > 0).all()
    ds = simulate_dataset(300, 50)
    assert np.isfinite(ds.X.data).all()
    np.testing.assert_allclose(_row_totals(ds.X), 1e4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_populations": 1}, "n_populations"),
        ({"n_cells": 5, "n_populations": 3}, "n_cells"),
        ({"n_genes": 9}, "n_genes"),
        ({"seed": -1}, "seed"),
        ({"n_cells": 100.5}, "integer"),
        ({"n_genes": True}, "integer"),
    ],
)
@pytest.mark.parametrize("function", [simulate_counts, simulate_dataset])
def test_invalid_arguments(function, kwargs, message):
    with pytest.raises(ScaeInputError, match=message):
        function(**kwargs)


def test_memory_stays_below_a_dense_matrix():
    n_cells, n_genes = 20_000, 1000
    tracemalloc.start()
    try:
        counts, _ = simulate_counts(n_cells, n_genes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts.shape == (n_cells, n_genes)
    assert peak < 0.75 * n_cells * n_genes * 8  # a dense float64 copy alone would exceed this


def test_populations_overlap_but_are_distinguishable(default):
    Z = PCA(n_components=50, random_state=0).fit_transform(default.X.toarray())
    aris = [
        adjusted_rand_score(default.labels, KMeans(3, random_state=s).fit_predict(Z))
        for s in range(5)
    ]
    assert 0.4 <= np.mean(aris) <= 0.85, aris
    assert 0.0 < silhouette_score(Z, default.labels) < 0.5


# ---------------------------------------------------------------- the counts beside the model input
# sha256 of X's CSR arrays (data, indices, indptr) as simulate_dataset made them before the
# raw counts were added: the four assignment runs must see the same matrix, bit for bit.
X_SHA256 = {
    (): "31edba49df7be6a8a8c43afeacadc30b59f5064cce5d056eb5d5e2a8801fbe05",
    (300, 40, 3, 1): "f767fc743f84516721790228cf2fee3958886c8fd5cab541062d5b8a402ccc07",
    (2500, 50, 4, 7): "2aed91aef4cf7495a62b8e0ed60c554a94b532c513eb96ca52ed3149d5549d5c",
}


def _sha256(X: sp.csr_matrix) -> str:
    import hashlib

    digest = hashlib.sha256()
    for part in (X.data, X.indices, X.indptr):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("args", list(X_SHA256))
def test_model_input_is_unchanged_and_raw_holds_the_simulated_counts(args, default):
    ds = default if args == () else simulate_dataset(*args)
    assert _sha256(ds.X) == X_SHA256[args]
    counts, labels = simulate_counts(*args)
    assert _same(ds.raw, counts)
    assert not ds.counts and ds.has_counts and ds.raw_origin == "simulated counts"
    assert ds.summary()["count_data"] == "simulated counts"
    rows = np.array([0, 1, ds.n_cells - 1])
    np.testing.assert_array_equal(ds.count_source().tensor(rows).numpy(), counts[rows].toarray())
    assert ds.labels.tolist() == [f"pop{i}" for i in labels]
