"""Hiding entries and scoring their recovery (the imputation evaluation)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import scipy.sparse as sp

from scae import denoising
from scae.denoising import baseline_reconstructions, hide_entries, imputation_scores
from scae.embeddings import subsample_indices
from scae.sources import normalize_counts

COUNTS_3x4 = np.array([[1, 0, 3, 6], [0, 2, 0, 0], [4, 4, 0, 2]])  # libraries 10, 2, 10


@contextmanager
def strict_warnings():
    """Every warning becomes an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def random_counts(cells=200, genes=300, density=0.1, seed=0) -> sp.csr_matrix:
    """Sparse counts 1–20 at a random ``density`` of the entries."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(cells, genes, density=density, format="csr", random_state=seed, dtype=np.float32)
    matrix.data = rng.integers(1, 21, matrix.nnz).astype(np.float32)
    return matrix


# ---------------------------------------------------------------- hide_entries
def test_hide_entries_hand_computed_on_3x4_counts():
    """Seed 0 hides 2 of the 7 nonzero counts (round(0.3 × 7)): (0, 2) = 3 and (2, 3) = 2."""
    before = COUNTS_3x4.copy()
    hidden = hide_entries(COUNTS_3x4, fraction=0.3, seed=0, counts=True)
    np.testing.assert_array_equal(hidden.rows, [0, 2])
    np.testing.assert_array_equal(hidden.cols, [2, 3])
    np.testing.assert_array_equal(hidden.cells, [0, 1, 2])
    # truth: the original counts over the original libraries (10 and 10)
    np.testing.assert_allclose(hidden.truth, [np.log1p(3 / 10 * 1e4), np.log1p(2 / 10 * 1e4)], rtol=1e-6)
    # values: the corrupted counts over the corrupted libraries (7, 2, 8)
    expected_counts = np.array([[1, 0, 0, 6], [0, 2, 0, 0], [4, 4, 0, 0]], dtype=np.float32)
    expected_values = np.array([
        [np.log1p(1 / 7 * 1e4), 0, 0, np.log1p(6 / 7 * 1e4)],
        [0, np.log1p(1e4), 0, 0],
        [np.log1p(4 / 8 * 1e4), np.log1p(4 / 8 * 1e4), 0, 0],
    ])
    np.testing.assert_array_equal(hidden.counts, expected_counts)
    np.testing.assert_allclose(hidden.values, expected_values, rtol=1e-6)
    assert hidden.values.dtype == np.float32 and hidden.counts.dtype == np.float32
    np.testing.assert_array_equal(COUNTS_3x4, before)


def test_hide_entries_of_log_values_hides_them_directly():
    log_values = normalize_counts(COUNTS_3x4)
    hidden = hide_entries(sp.csr_matrix(log_values), fraction=0.3, seed=0)
    np.testing.assert_array_equal(hidden.rows, [0, 2])
    np.testing.assert_array_equal(hidden.cols, [2, 3])
    np.testing.assert_array_equal(hidden.truth, log_values[[0, 2], [2, 3]])
    expected = log_values.copy()
    expected[[0, 2], [2, 3]] = 0.0
    np.testing.assert_array_equal(hidden.values, expected)
    assert hidden.counts is None


@pytest.mark.parametrize("fraction", [0.1, 0.25])
@pytest.mark.parametrize("sparse", [False, True])
def test_hide_entries_hides_the_fraction_of_nonzero_entries_exactly(fraction, sparse):
    matrix = random_counts()
    original = matrix.toarray()
    hidden = hide_entries(matrix if sparse else original, fraction=fraction, seed=5)
    assert hidden.n_hidden == int(np.floor(fraction * matrix.nnz + 0.5))
    assert np.all(original[hidden.rows, hidden.cols] != 0)  # only nonzero entries hidden
    np.testing.assert_array_equal(hidden.truth, original[hidden.rows, hidden.cols])
    assert np.all(hidden.values[hidden.rows, hidden.cols] == 0)
    untouched = np.ones(original.shape, dtype=bool)
    untouched[hidden.rows, hidden.cols] = False
    np.testing.assert_array_equal(hidden.values[untouched], original[untouched])  # everything else as it was
    assert len(set(zip(hidden.rows.tolist(), hidden.cols.tolist()))) == hidden.n_hidden  # no entry twice
    order = np.lexsort((hidden.cols, hidden.rows))
    np.testing.assert_array_equal(order, np.arange(hidden.n_hidden))  # sorted by row, then column


def test_hide_entries_leaves_every_cell_a_nonzero_entry():
    """Two nonzero entries per cell and 90% to hide: only one per cell can go (the cap)."""
    matrix = np.zeros((50, 10), dtype=np.float32)
    matrix[np.arange(50), np.arange(50) % 10] = 3.0
    matrix[np.arange(50), (np.arange(50) + 1) % 10] = 5.0
    matrix[0] = 0.0  # an empty cell stays empty
    matrix[1] = 0.0
    matrix[1, 4] = 2.0  # a single nonzero entry is never hidden
    for counts in (False, True):
        hidden = hide_entries(matrix, fraction=0.9, seed=1, counts=counts)
        assert hidden.n_hidden == 48
        np.testing.assert_array_equal(np.bincount(hidden.rows, minlength=50), [0, 0] + [1] * 48)
        assert np.all(np.count_nonzero(hidden.values[1:], axis=1) == 1)
        assert np.all(np.isfinite(hidden.values))


def test_hide_entries_is_deterministic_in_the_seed():
    matrix = random_counts()
    a, b = hide_entries(matrix, seed=3, counts=True), hide_entries(matrix, seed=3, counts=True)
    for field in ("rows", "cols", "truth", "values", "counts", "cells"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = hide_entries(matrix, seed=4, counts=True)
    assert not (np.array_equal(a.rows, c.rows) and np.array_equal(a.cols, c.cols))


def test_hide_entries_samples_at_most_max_cells():
    matrix = random_counts(cells=1000, genes=40, density=0.3)
    hidden = hide_entries(matrix, seed=2, counts=True, max_cells=100)
    np.testing.assert_array_equal(hidden.cells, subsample_indices(1000, 100, 2))
    assert np.all(np.diff(hidden.cells) > 0)
    assert hidden.values.shape == (100, 40) and hidden.counts.shape == (100, 40)
    sampled = matrix[hidden.cells].toarray()
    assert hidden.n_hidden == int(np.floor(0.1 * np.count_nonzero(sampled) + 0.5))
    restored = hidden.counts.copy()
    restored[hidden.rows, hidden.cols] = sampled[hidden.rows, hidden.cols]
    np.testing.assert_array_equal(restored, sampled)  # the rows are those cells
    np.testing.assert_allclose(hidden.truth, normalize_counts(sampled)[hidden.rows, hidden.cols], rtol=1e-6)
    assert not np.array_equal(hidden.cells, hide_entries(matrix, seed=3, counts=True, max_cells=100).cells)
    assert hide_entries(matrix, max_cells=5000).cells.size == 1000


@pytest.mark.parametrize(
    "kwargs,message",
    [({"fraction": 0.0}, "fraction"), ({"fraction": 1.0}, "fraction"), ({"max_cells": 0}, "max_cells")],
)
def test_hide_entries_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hide_entries(COUNTS_3x4, **kwargs)


def test_hide_entries_rejects_negative_counts_and_non_matrices():
    with pytest.raises(ValueError, match="non-negative"):
        hide_entries(-COUNTS_3x4, counts=True)
    with pytest.raises(ValueError, match="cells × genes"):
        hide_entries(np.arange(5.0))


# ---------------------------------------------------------------- imputation_scores
@pytest.mark.parametrize("counts", [False, True])
def test_a_perfect_reconstruction_scores_zero_error_and_correlation_one(counts):
    matrix = random_counts()
    hidden = hide_entries(matrix, counts=counts, seed=0)
    original = matrix[hidden.cells].toarray()
    perfect = normalize_counts(original) if counts else original
    scores = imputation_scores(hidden, perfect)
    assert scores["median_abs_error"] == 0.0 and scores["mean_abs_error"] == 0.0
    assert scores["pearson"] == pytest.approx(1.0) and scores["spearman"] == pytest.approx(1.0)
    assert scores["n_hidden"] == hidden.n_hidden > 0


def test_imputation_scores_hand_computed():
    hidden = hide_entries(COUNTS_3x4, fraction=0.3, seed=0, counts=True)  # truth ≈ 8.0067, 7.6014
    reconstruction = np.zeros((3, 4))
    reconstruction[0, 2], reconstruction[2, 3] = 7.0, 8.0
    truth = hidden.truth.astype(np.float64)
    scores = imputation_scores(hidden, reconstruction)
    errors = [abs(7.0 - truth[0]), abs(8.0 - truth[1])]
    assert scores["median_abs_error"] == pytest.approx(np.median(errors))
    assert scores["mean_abs_error"] == pytest.approx(np.mean(errors))
    assert scores["pearson"] == pytest.approx(-1.0)  # two points, ordered the other way
    assert scores["spearman"] == pytest.approx(-1.0)
    assert scores["n_hidden"] == 2


def test_constant_predictions_score_correlation_zero_without_warnings():
    hidden = hide_entries(random_counts(), seed=0)
    with strict_warnings():
        scores = imputation_scores(hidden, np.zeros(hidden.values.shape))
        ones = hide_entries(np.ones((20, 10)), seed=0)  # every hidden truth the same value
        constant_truth = imputation_scores(ones, np.random.default_rng(0).normal(size=(20, 10)))
    assert scores["pearson"] == 0.0 and scores["spearman"] == 0.0
    assert scores["median_abs_error"] == pytest.approx(float(np.median(hidden.truth)))
    assert constant_truth["pearson"] == 0.0 and constant_truth["spearman"] == 0.0


def test_imputation_scores_with_nothing_hidden_is_nan_without_warnings():
    hidden = hide_entries(np.eye(4), seed=0)  # one nonzero entry per cell: none can be hidden
    with strict_warnings():
        scores = imputation_scores(hidden, np.eye(4))
    assert scores["n_hidden"] == 0 and np.isnan(scores["median_abs_error"]) and scores["pearson"] == 0.0


def test_imputation_scores_rejects_a_reconstruction_of_another_shape():
    hidden = hide_entries(COUNTS_3x4, fraction=0.3, counts=True)
    with pytest.raises(ValueError, match=r"shape of the evaluated cells \(3, 4\)"):
        imputation_scores(hidden, np.zeros((4, 3)))


# ---------------------------------------------------------------- baselines
@pytest.mark.parametrize("sparse", [False, True])
def test_gene_mean_baseline_is_the_training_column_means(sparse, monkeypatch):
    monkeypatch.setattr(denoising, "BASELINE_DENSE_BYTES", 0)  # sparse stays sparse
    train = normalize_counts(random_counts(seed=1).toarray())
    hidden = hide_entries(random_counts(cells=30, seed=2), seed=0, counts=True)
    before = train.copy()
    baselines = baseline_reconstructions(sp.csr_matrix(train) if sparse else train, hidden, n_components=5)
    assert set(baselines) == {"gene_mean", "pca5"}
    assert baselines["gene_mean"].shape == hidden.values.shape and baselines["gene_mean"].dtype == np.float32
    np.testing.assert_allclose(baselines["gene_mean"], np.broadcast_to(train.mean(axis=0), (30, 300)), rtol=1e-5)
    np.testing.assert_array_equal(train, before)


@pytest.mark.parametrize("sparse", [False, True])
def test_pca_baseline_with_every_component_reproduces_the_corrupted_values(sparse, monkeypatch):
    monkeypatch.setattr(denoising, "BASELINE_DENSE_BYTES", 0)  # sparse stays sparse
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 12)).astype(np.float32)
    hidden = hide_entries(np.abs(rng.normal(size=(25, 12))) + 0.1, seed=0)
    baselines = baseline_reconstructions(sp.csr_matrix(train) if sparse else train, hidden, n_components=12)
    np.testing.assert_allclose(baselines["pca12"], hidden.values, atol=1e-4)
    low = baseline_reconstructions(train, hidden, n_components=3)["pca3"]
    assert np.abs(low - hidden.values).max() > 0.1  # three components cannot


def test_pca_baseline_equals_projection_on_the_training_principal_axes():
    rng = np.random.default_rng(1)
    train = (rng.normal(size=(300, 3)) @ rng.normal(size=(3, 20)) + 0.05 * rng.normal(size=(300, 20)))
    hidden = hide_entries(np.abs(train[:40]) + 0.1, seed=0)
    got = baseline_reconstructions(train, hidden, n_components=3)["pca3"]
    mean = train.mean(axis=0)
    axes = np.linalg.svd(train - mean, full_matrices=False)[2][:3]
    expected = mean + (hidden.values - mean) @ axes.T @ axes
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_baselines_fit_on_a_seeded_sample_of_the_training_cells(monkeypatch):
    monkeypatch.setattr(denoising, "MAX_BASELINE_TRAIN_CELLS", 50)
    train = normalize_counts(random_counts(cells=400, genes=30, density=0.4, seed=3).toarray())
    hidden = hide_entries(random_counts(cells=10, genes=30, density=0.4, seed=4), seed=0, counts=True)
    sampled = train[subsample_indices(400, 50, 7)]
    got = baseline_reconstructions(train, hidden, n_components=4, seed=7)["gene_mean"]
    np.testing.assert_allclose(got[0], sampled.mean(axis=0), rtol=1e-5)
    assert not np.allclose(got[0], train.mean(axis=0), rtol=1e-5)


def test_baselines_from_raw_training_counts_equal_those_from_their_log_values():
    train_counts = random_counts(seed=5)
    hidden = hide_entries(random_counts(cells=30, seed=6), seed=0, counts=True)
    from_counts = baseline_reconstructions(train_counts, hidden, counts=True)
    from_log = baseline_reconstructions(normalize_counts(train_counts), hidden)
    for name in ("gene_mean", "pca10"):
        np.testing.assert_allclose(from_counts[name], from_log[name], atol=1e-5)


def test_baselines_reject_another_number_of_genes():
    hidden = hide_entries(COUNTS_3x4, fraction=0.3, counts=True)
    with pytest.raises(ValueError, match="5 genes, the evaluated cells 4"):
        baseline_reconstructions(np.zeros((10, 5)), hidden)


def test_baselines_recover_far_more_than_zeros_on_simulated_data(small_dataset):
    """On the built-in kind of data both baselines land far closer to the hidden values than 0 does
    (measured: median errors 0.88 gene mean, 1.24 PCA, 4.23 zeros; Pearson 0.76, 0.70)."""
    X = small_dataset.X
    hidden = hide_entries(X[200:], seed=0)
    baselines = baseline_reconstructions(X[:200], hidden, n_components=10)
    zeros = imputation_scores(hidden, np.zeros(hidden.values.shape))["median_abs_error"]
    for reconstruction in baselines.values():
        scores = imputation_scores(hidden, reconstruction)
        assert scores["median_abs_error"] < zeros / 2
        assert scores["pearson"] > 0.5


def test_a_given_library_scales_truth_and_corrupted_values():
    """With a gene selection, cells are scaled by their library over all genes, minus what was hidden."""
    counts = np.array([[4.0, 0.0, 6.0, 2.0], [1.0, 3.0, 0.0, 5.0]], dtype=np.float32)
    library = np.array([100.0, 50.0])  # the cells hold more counts in genes not given here
    hidden = hide_entries(counts, 0.5, seed=3, counts=True, library=library)
    lost = np.zeros(2)
    np.add.at(lost, hidden.rows, counts[hidden.rows, hidden.cols])
    np.testing.assert_allclose(hidden.truth, np.log1p(counts[hidden.rows, hidden.cols] / library[hidden.rows] * 1e4), rtol=1e-6)
    expected = np.log1p(hidden.counts / (library - lost)[:, None] * 1e4)
    np.testing.assert_allclose(hidden.values, expected, rtol=1e-6)
    assert lost.sum() > 0
