"""Cluster scores, convergence, separability, PCA baselines, t-SNE and subsampling."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import scipy.sparse as sp

from scae.embeddings import (
    fit_pca,
    pca_coordinates,
    subsample_indices,
    tsne_coordinates,
)
from scae.metrics import (
    cluster_scores,
    convergence_epoch,
    knn_accuracy,
    linear_separability,
    pca_reconstruction_errors,
)


def blobs(n_per=60, k=3, dims=8, spread=0.3, seed=0):
    """Well-separated Gaussian blobs (centres 10 apart) and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(k, dims) * 10.0
    X = np.concatenate([c + spread * rng.normal(size=(n_per, dims)) for c in centres])
    y = np.repeat([f"c{i}" for i in range(k)], n_per)
    order = rng.permutation(len(y))
    return X[order].astype(np.float32), y[order]


# ---------------------------------------------------------------- convergence_epoch
@pytest.mark.parametrize(
    "losses,expected",
    [
        # start 10, min 0 -> target 10 - 0.95*10 = 0.5: first epoch with loss <= 0.5
        ([10, 5, 2, 1, 0.5, 0.2, 0], 4),
        ([10, 5, 2, 1, 0.6, 0.2, 0], 5),
        # min 2 at the end -> target 10 - 0.95*8 = 2.4
        ([10, 6, 3, 2.5, 2.4, 2.0], 4),
        # drops at once
        ([4.0, 1.0, 1.0, 1.0], 1),
        # rises again after the minimum (overfitting): target from min 1 -> 4 - 2.85 = 1.15
        ([4.0, 2.0, 1.1, 1.0, 1.5, 3.0], 2),
        # numpy and torch floats, not only python floats
        (list(np.array([3.0, 2.0, 1.0], dtype=np.float32)), 2),
    ],
)
def test_convergence_epoch_95_percent_rule(losses, expected):
    got = convergence_epoch(losses)
    assert got == expected
    assert isinstance(got, int)


@pytest.mark.parametrize("losses", [[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [5.0], [2.0, 2.0, 2.5]])
def test_convergence_epoch_never_decreasing_is_none(losses):
    assert convergence_epoch(losses) is None


@pytest.mark.parametrize(
    "losses,expected",
    [
        ([10, 5, 2.015, 2.0, 2.5], 2),  # best 2.0: within 1% means <= 2.02
        ([10, 5, 2.025, 2.0, 2.5], 3),
        ([3.0, 3.0, 3.0], 0),
        ([1.0, 2.0, 3.0], 0),  # the start is the best
        ([-2.0, -2.965, -2.975, -3.0], 2),  # relative to |best|: <= -2.97
    ],
)
def test_epochs_to_near_best(losses, expected):
    from scae.metrics import epochs_to_near_best

    assert epochs_to_near_best(losses) == expected


def test_convergence_epoch_custom_fraction():
    losses = [10, 8, 6, 4, 2, 0]
    assert convergence_epoch(losses, fraction=0.5) == 3  # target 5
    assert convergence_epoch(losses, fraction=1.0) == 5  # target 0
    assert convergence_epoch(losses, fraction=0.2) == 1  # target 8


# ---------------------------------------------------------------- cluster_scores
def test_cluster_scores_well_separated():
    X, y = blobs()
    s = cluster_scores(X, y, n_seeds=3, seed=0)
    assert set(s) == {"ari", "ari_std", "nmi", "nmi_std", "silhouette"}
    assert s["ari"] > 0.99 and s["nmi"] > 0.99
    assert s["silhouette"] > 0.8
    assert 0 <= s["ari_std"] < 0.01 and 0 <= s["nmi_std"] < 0.01
    assert all(isinstance(v, float) for v in s.values())


def test_cluster_scores_random_labels():
    X, y = blobs(seed=1)
    rng = np.random.default_rng(5)
    random_labels = rng.permutation(y)
    s = cluster_scores(X, random_labels, n_seeds=3, seed=0)
    assert abs(s["ari"]) < 0.05
    assert s["nmi"] < 0.1
    assert s["silhouette"] < 0.05


def test_cluster_scores_deterministic_and_sampled_silhouette():
    X, y = blobs(n_per=40, seed=2)
    a = cluster_scores(X, y, n_seeds=2, seed=3)
    b = cluster_scores(X, y, n_seeds=2, seed=3)
    assert a == b
    c = cluster_scores(X, y, n_seeds=2, seed=3, silhouette_max_cells=50)  # sampled silhouette
    assert c["silhouette"] == pytest.approx(a["silhouette"], abs=0.05)
    assert c["ari"] == a["ari"]


def test_cluster_scores_ari_matches_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 4)).astype(np.float32)
    X[:30, 0] += 1.5  # weak structure: k-means varies by seed
    y = np.repeat(["a", "b", "c"], 30)
    s = cluster_scores(X, y, n_seeds=4, seed=2)
    aris = [adjusted_rand_score(y, KMeans(3, n_init=1, random_state=r).fit_predict(X)) for r in range(2, 6)]
    assert s["ari"] == pytest.approx(np.mean(aris), abs=1e-12)
    assert s["ari_std"] == pytest.approx(np.std(aris), abs=1e-12)
    assert s["silhouette"] == pytest.approx(silhouette_score(X, y), abs=1e-6)


# ---------------------------------------------------------------- linear_separability
def test_linear_separability_separable_and_shuffled():
    X, y = blobs(n_per=80, seed=3)
    Xtr, ytr, Xte, yte = X[:160], y[:160], X[160:], y[160:]
    assert linear_separability(Xtr, ytr, Xte, yte) > 0.99
    rng = np.random.default_rng(0)
    ytr_shuffled = rng.permutation(ytr)
    acc = linear_separability(Xtr, ytr_shuffled, Xte, yte)
    assert acc < 0.6  # chance is 1/3
    assert 0.0 <= acc <= 1.0


# ---------------------------------------------------------------- PCA baselines
@pytest.mark.parametrize("sparse", [False, True])
def test_pca_reconstruction_errors_match_numpy(small_dense, sparse):
    X = small_dense
    X_train, X_test = X[:220], X[220:]
    wrap = sp.csr_matrix if sparse else (lambda M: M)
    pca = fit_pca(wrap(X_train), 10, seed=0)
    got = pca_reconstruction_errors(pca, wrap(X_train), wrap(X_test), [2, 10, 50], batch_size=64)
    assert set(got) == {"pca2", "pca10"}  # 50 > the fitted 10 components: not reported
    comps = pca.components_.astype(np.float64)
    mean = pca.mean_.astype(np.float64)
    for k in (2, 10):
        for part, M in (("train", X_train), ("test", X_test)):
            M = M.astype(np.float64)
            R = (M - mean) @ comps[:k].T @ comps[:k] + mean
            mask = M != 0
            assert got[f"pca{k}"][part]["mse"] == pytest.approx(np.mean((M - R) ** 2), rel=1e-6)
            assert got[f"pca{k}"][part]["nonzero_mse"] == pytest.approx(
                np.sum((M[mask] - R[mask]) ** 2) / mask.sum(), rel=1e-6
            )


def test_pca_truncation_equals_separately_fitted_pca(small_dense):
    """The top k of a larger PCA reconstruct like a PCA fitted with k components."""
    X_train, X_test = small_dense[:220].astype(np.float64), small_dense[220:].astype(np.float64)
    got = pca_reconstruction_errors(fit_pca(X_train, 20), X_train, X_test, [3, 20])
    for k in (3, 20):
        own = fit_pca(X_train, k)
        for part, M in (("train", X_train), ("test", X_test)):
            R = own.inverse_transform(own.transform(M))
            assert got[f"pca{k}"][part]["mse"] == pytest.approx(np.mean((M - R) ** 2), rel=1e-4)
    assert got["pca3"]["train"]["mse"] > got["pca20"]["train"]["mse"]


def test_fit_pca_caps_components():
    X = np.random.default_rng(0).normal(size=(20, 7))
    assert fit_pca(X, 50).n_components_ == 7
    assert fit_pca(X[:5], 50).n_components_ == 4
    assert pca_coordinates(X, 3).shape == (20, 3)
    assert pca_coordinates(X, 3).dtype == np.float32


# ---------------------------------------------------------------- t-SNE
@pytest.fixture(scope="module")
def tsne_input():
    X, y = blobs(n_per=70, k=3, dims=60, spread=1.0, seed=4)  # > 50 dims: PCA first
    return X[:200], y[:200]


def test_tsne_shape_dtype_deterministic(tsne_input):
    X, y = tsne_input
    a = tsne_coordinates(X, seed=0)
    b = tsne_coordinates(X, seed=0)
    assert a.shape == (200, 2)
    assert a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    # the embedding keeps the separated blobs apart
    s = cluster_scores(a, y, n_seeds=2)
    assert s["ari"] > 0.95


def test_tsne_neighbour_index_matches_opentsne_exact_search(tsne_input):
    """The brute-force index gives openTSNE's own exact affinities; Annoy's (above the exact
    limit) agree on most neighbours."""
    from openTSNE import affinity

    from scae.embeddings import TSNEConfig, neighbour_index, tsne_input as reduce

    X = reduce(tsne_input[0])
    theirs = affinity.PerplexityBasedNN(X, perplexity=30, method="exact", random_state=0)
    ours = affinity.PerplexityBasedNN(knn_index=neighbour_index(X, 90, seed=0), perplexity=30, random_state=0)
    assert abs(theirs.P - ours.P).max() < 1e-12
    exact_neighbours, _ = neighbour_index(X, 15).build()
    approx_neighbours, _ = neighbour_index(X, 15, config=TSNEConfig(exact_neighbors_below=100)).build()
    shared = np.mean([np.intersect1d(a, b).size / 15 for a, b in zip(exact_neighbours, approx_neighbours)])
    assert shared > 0.9


def test_tsne_does_not_import_pynndescent(tmp_path):
    """openTSNE's method lookup imports pynndescent and numba (0.3 s, 110 MiB a process) when installed."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from scae.embeddings import tsne_coordinates; "
        "tsne_coordinates(np.random.default_rng(0).normal(size=(120, 5)), config=__import__('scae.embeddings', "
        "fromlist=['TSNEConfig']).TSNEConfig(early_exaggeration_iter=5, n_iter=5)); "
        "print(sorted(m for m in ('pynndescent', 'numba') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tsne_different_seed_differs(tsne_input):
    X, _ = tsne_input
    from scae.embeddings import TSNEConfig

    fast = TSNEConfig(early_exaggeration_iter=50, n_iter=50)
    a = tsne_coordinates(X[:120, :20], seed=0, config=fast)
    b = tsne_coordinates(X[:120, :20], seed=1, config=fast)
    assert a.shape == (120, 2)
    assert not np.allclose(a, b)


# ---------------------------------------------------------------- subsample_indices
def test_subsample_indices():
    idx = subsample_indices(1000, 123, seed=5)
    assert idx.size == 123
    assert np.all(np.diff(idx) > 0)  # sorted and unique
    assert idx.min() >= 0 and idx.max() < 1000
    np.testing.assert_array_equal(idx, subsample_indices(1000, 123, seed=5))
    assert not np.array_equal(idx, subsample_indices(1000, 123, seed=6))


@pytest.mark.parametrize("n,max_cells", [(50, None), (50, 50), (50, 80)])
def test_subsample_indices_keeps_all_when_small(n, max_cells):
    np.testing.assert_array_equal(subsample_indices(n, max_cells, seed=1), np.arange(n))


def test_cluster_scores_sparse_equals_dense(small_dataset, small_dense):
    labels = small_dataset.labels
    a = cluster_scores(small_dataset.X, labels, n_seeds=2)
    b = cluster_scores(small_dense, labels, n_seeds=2)
    assert a["ari"] == pytest.approx(b["ari"], abs=1e-9)
    assert a["nmi"] == pytest.approx(b["nmi"], abs=1e-9)
    assert a["silhouette"] == pytest.approx(b["silhouette"], abs=1e-5)


@pytest.mark.parametrize("n_cells", [300, 800])
def test_tsne_does_not_collapse_on_small_inputs(n_cells):
    """Regression: momentum 0.5 in early exaggeration collapsed 800-cell embeddings to a point."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from scae.embeddings import tsne_coordinates
    from scae.simulate import simulate_dataset

    data = simulate_dataset(n_cells, 1000, 3, 0)
    coords = tsne_coordinates(data.X, 0)
    assert np.ptp(coords, axis=0).min() > 1.0  # a spread-out map, not a collapsed point
    accuracy = cross_val_score(KNeighborsClassifier(10), coords, data.labels, cv=5).mean()
    assert accuracy > 0.6  # neighbours in 2-D still share labels (3 classes: chance ~0.5 here)


@pytest.mark.parametrize("n, k, dims", [(300, 3, 5), (1100, 4, 50), (57, 2, 2)])
def test_label_silhouette_equals_sklearn(n, k, dims):
    from sklearn.metrics import silhouette_score

    from scae.metrics import label_silhouette

    rng = np.random.default_rng(n)
    labels = rng.integers(0, k, n).astype(str)
    labels[0] = "alone"  # a label with a single cell scores 0, as in scikit-learn
    X = rng.normal(size=(n, dims)) + (np.unique(labels, return_inverse=True)[1][:, None] * 0.7)
    assert label_silhouette(X, labels, chunk_rows=100) == pytest.approx(silhouette_score(X, labels), abs=1e-5)


def test_cluster_scores_silhouette_sample_matches_sklearn_sample():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 6))
    labels = rng.integers(0, 3, 400).astype(str)
    scores = cluster_scores(X, labels, n_seeds=1, seed=7, silhouette_max_cells=150)
    assert scores["silhouette"] == pytest.approx(silhouette_score(X, labels, sample_size=150, random_state=7), abs=1e-5)


# ---------------------------------------------------------------- degenerate representations, rare labels
@contextmanager
def strict_warnings():
    """Every warning becomes an error (no library warning may reach the user)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("value", [0.0, 2.5])
def test_fit_pca_of_constant_input_has_zero_variance_not_nan(sparse, value):
    X = np.full((40, 12), value, dtype=np.float32)
    with strict_warnings():
        pca = fit_pca(sp.csr_matrix(X) if sparse else X, 5)
        coords = pca.transform(X)
    assert pca.n_components_ == 5
    np.testing.assert_array_equal(pca.explained_variance_ratio_, np.zeros(5))
    np.testing.assert_array_equal(pca.explained_variance_, np.zeros(5))
    np.testing.assert_allclose(coords, 0.0, atol=1e-6)


@pytest.mark.parametrize("X", [np.zeros((60, 6)), np.ones((60, 6)), np.tile(np.arange(6.0), (60, 1))])
def test_tsne_of_identical_points_is_finite(X):
    """All points equal: PCA initialisation would be NaN (and crash openTSNE's compiled code)."""
    from scae.embeddings import TSNEConfig, initial_layout

    layout = initial_layout(X, seed=0)
    assert layout.shape == (60, 2) and np.isfinite(layout).all()
    assert 5e-5 < layout.std(axis=0).min() < 2e-4  # openTSNE's scale: standard deviation 1e-4
    with strict_warnings():
        coords = tsne_coordinates(X, seed=0, config=TSNEConfig(early_exaggeration_iter=20, n_iter=20))
    assert coords.shape == (60, 2) and np.isfinite(coords).all()


def test_initial_layout_is_openTSNE_pca_for_ordinary_input():
    from openTSNE import initialization

    from scae.embeddings import initial_layout

    X, _ = blobs()
    np.testing.assert_array_equal(initial_layout(X, seed=3), initialization.pca(X, random_state=3))


def test_cluster_scores_of_a_collapsed_representation_are_zero_without_warnings():
    _, y = blobs()
    with strict_warnings():
        scores = cluster_scores(np.ones((y.size, 4), dtype=np.float32), y, n_seeds=2)
    assert scores == {"ari": 0.0, "ari_std": 0.0, "nmi": 0.0, "nmi_std": 0.0, "silhouette": 0.0}


def test_cluster_scores_with_singleton_labels():
    X, y = blobs()
    y = y.astype(object)
    y[0], y[1] = "alone", "also alone"
    with strict_warnings():
        scores = cluster_scores(X, y, n_seeds=2)
    assert 0.5 < scores["ari"] <= 1.0 and -1.0 <= scores["silhouette"] <= 1.0  # 5 labels, 3 blobs


def test_cluster_scores_silhouette_is_zero_when_every_cell_is_its_own_label():
    X, _ = blobs(n_per=4)
    scores = cluster_scores(X, np.array([f"c{i}" for i in range(12)]), n_seeds=1)
    assert scores["silhouette"] == 0.0


def test_linear_separability_with_a_label_seen_only_in_training():
    """A train-only label: no scikit-learn warning; balanced accuracy over the test labels."""
    X, y = blobs()
    y = y.astype(object)
    rare = np.flatnonzero(y == "c2")[:3]
    y[rare] = "rare"
    train = np.setdiff1d(np.arange(y.size), rare[1:])[::2]
    train = np.union1d(train, rare[:1])
    test = np.setdiff1d(np.arange(y.size), np.union1d(train, rare))
    with strict_warnings():
        accuracy = linear_separability(X[train], y[train], X[test], y[test])
    assert "rare" in set(y[train]) and "rare" not in set(y[test])
    assert accuracy == pytest.approx(1.0)


def test_balanced_accuracy_counts_predicted_train_only_labels_as_wrong():
    from sklearn.metrics import balanced_accuracy_score

    from scae.metrics import balanced_accuracy

    y_true = np.array(["a", "a", "a", "b", "b", "c"])
    y_pred = np.array(["a", "a", "b", "b", "b", "c"])
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    y_pred = np.array(["a", "rare", "a", "b", "rare", "c"])  # 'rare' is not among the test labels
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert balanced_accuracy(np.array([]), np.array([])) == 0.0


def test_linear_separability_with_one_training_label_predicts_it():
    X, y = blobs()
    assert linear_separability(X[:10], np.array(["c0"] * 10), X, y) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- knn_accuracy
def overlapping_blobs(n_per=50, seed=0):
    """Three 5-D blobs close enough that some cells' neighbours carry another label."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 5) * 1.5
    X = np.concatenate([c + rng.normal(size=(n_per, 5)) for c in centres]).astype(np.float32)
    return X, np.repeat(["a", "b", "c"], n_per)


def test_knn_accuracy_of_well_separated_blobs_is_one():
    X, y = blobs()
    with strict_warnings():
        assert knn_accuracy(X, y) == 1.0


def test_knn_accuracy_hand_computed_with_mislabelled_cells():
    """Blob A: 20 'a' cells and 5 'b' cells near 0; blob B: 20 'b' cells near 100 (1-D).

    Every training part holds >= 16 cells of blob A (16 'a' + up to 5 'b'), so a held-out cell
    of blob A has its 15 neighbours in blob A, at most 5 of them 'b': predicted 'a'. Blob B's
    training part holds >= 15 'b' cells: predicted 'b'. So the 5 'b' cells in blob A are the
    only errors, for any seed: 40 / 45.
    """
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.uniform(0, 1, 25), rng.uniform(100, 101, 20)])
    y = np.array(["a"] * 20 + ["b"] * 25)
    for seed in range(4):
        assert knn_accuracy(X, y, k=15, seed=seed) == pytest.approx(40 / 45)


def test_knn_accuracy_k_larger_than_the_training_part_votes_with_every_training_cell():
    """30 'a' and 20 'b' cells, 5 stratified folds: every training part has 24 'a' and 16 'b',
    so with k > 40 every cell is predicted 'a' whatever the geometry: 30 / 50."""
    X, _ = overlapping_blobs(n_per=25)
    y = np.array(["a"] * 30 + ["b"] * 20)
    with strict_warnings():
        assert knn_accuracy(X[:50], y, k=100) == pytest.approx(0.6)


def test_knn_accuracy_keeps_labels_rarer_than_the_folds_in_training():
    """'a' cells at 0, 10, …, 90, 'b' cells far away, two 'r' cells at 41 and 49 (k = 1).

    The 'r' cells are never held out but are the nearest training cells of a40 and a50, which
    are thus wrong; every other 'a' cell has a training 'a' at distance 10 (a fold holds out
    two 'a' cells, never both neighbours and the cell). Accuracy 18 / 20 over the 'a' and 'b'
    cells; scoring the 'r' cells too (plain StratifiedKFold) would give 18 / 22.
    """
    X = np.concatenate([np.arange(0, 100, 10.0), np.arange(1000, 1100, 10.0), [41.0, 49.0]])
    y = np.array(["a"] * 10 + ["b"] * 10 + ["r"] * 2)
    with strict_warnings():
        for seed in range(5):
            assert knn_accuracy(X, y, k=1, seed=seed) == pytest.approx(0.9)


def test_knn_accuracy_reduces_folds_for_tiny_inputs():
    X = np.array([0.0, 0.1, 0.2, 10.0, 10.1, 10.2])
    y = np.array(list("aaabbb"))
    with strict_warnings():
        assert knn_accuracy(X, y, k=1) == 1.0  # 3 folds: each held-out cell still sees 2 of its label
        # k capped at the 4 training cells: a 2–2 vote, won by 'a' (sorts first)
        assert knn_accuracy(X, y, k=15) == pytest.approx(0.5)
        assert knn_accuracy(np.arange(4.0), np.array(list("abcd"))) == 0.0  # every label a single cell
        assert knn_accuracy(np.arange(4.0), np.array(list("aaaa"))) == 1.0


@pytest.mark.parametrize("seed", [0, 3])
def test_knn_accuracy_equals_scikit_learn_cross_validation(seed):
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    X, y = overlapping_blobs()  # 3 × 50 cells: every fold holds 30 cells
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=15), X, y, cv=cv)
    got = knn_accuracy(X, y, seed=seed)
    assert got == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    # equal folds: the accuracy over all cells is the mean of the per-fold accuracies
    assert got == pytest.approx(cross_val_score(KNeighborsClassifier(n_neighbors=15), X, y, cv=cv).mean())
    assert 0.5 < got < 1.0  # the blobs overlap: a number that could have been anything


def test_knn_accuracy_is_deterministic_in_the_seed():
    X, y = overlapping_blobs()
    assert knn_accuracy(X, y, seed=1) == knn_accuracy(X, y, seed=1)
    assert len({knn_accuracy(X, y, seed=s) for s in range(6)}) > 1  # the seed decides the folds


def test_knn_accuracy_sparse_equals_dense_and_input_untouched():
    X, y = overlapping_blobs()
    X[X < 0.5] = 0.0
    before = X.copy()
    dense = knn_accuracy(X, y)
    assert knn_accuracy(sp.csr_matrix(X), y) == pytest.approx(dense)
    assert knn_accuracy(sp.csr_matrix(X), y) == pytest.approx(knn_accuracy(X.astype(np.float64), y))
    np.testing.assert_array_equal(X, before)


def test_knn_accuracy_of_duplicates_and_collapsed_representations_without_warnings():
    X, y = blobs()
    with strict_warnings():
        duplicated = knn_accuracy(np.repeat(X, 3, axis=0), np.repeat(y, 3))
        collapsed = knn_accuracy(np.zeros((y.size, 2)), y)
        one_dim = knn_accuracy(X[:, :1], y)
    assert duplicated == 1.0
    assert 0.0 <= collapsed <= 1.0
    assert one_dim == knn_accuracy(X[:, 0], y)


def test_knn_accuracy_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one label per cell"):
        knn_accuracy(np.zeros((5, 2)), np.array(["a", "b"]))


def test_scores_of_many_tiny_labels_raise_no_warning():
    """Most labels with a cell or two (rare types of an atlas): scikit-learn's warning about more classes
    than half the samples, repeated per fold and representation, is not shown; the scores stay defined."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5))
    labels = np.array(["big"] * 40 + [f"rare{i}" for i in range(80)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accuracy = knn_accuracy(X, labels)
        separability = linear_separability(X[::2], labels[::2], X[1::2], labels[1::2])
    assert 0.0 <= accuracy <= 1.0 and 0.0 <= separability <= 1.0
