"""Numbers that say how well a representation keeps the cell populations apart, and convergence."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from scae.data import dense_if_small

SILHOUETTE_MAX_CELLS = 10_000
"""Silhouette is quadratic in the number of cells; above this it is computed on a seeded sample."""

KNN_TREE_MAX_DIMS = 4
""":func:`knn_accuracy` searches neighbours with a k-d tree up to this many dimensions (dense), by
brute force above: measured on 20,000 cells, one thread, a k-d tree takes 0.14 s at 1-D and 0.8 s
at 5-D but 5 s at 10-D and 24 s at 50-D, brute force 1.0–1.4 s at any dimension."""


MANY_CLASSES_WARNING = "The number of unique classes is greater than 50%"
"""scikit-learn's classifiers warn with this when most labels have a cell or two (which a real atlas
may well have: the scores stay defined); the warning repeated for every fold and representation."""


def cluster_scores(
    X, labels: np.ndarray, n_seeds: int = 5, seed: int = 0, silhouette_max_cells: int = SILHOUETTE_MAX_CELLS
) -> dict[str, float]:
    """k-means agreement with the labels and the labels' silhouette.

    k-means uses k = number of distinct labels and is repeated with seeds ``seed … seed +
    n_seeds - 1``; ARI and NMI are reported as mean and standard deviation over those runs.
    A representation with fewer distinct points than k (collapsed, or duplicated cells) gets
    fewer clusters, and scores accordingly, without a warning. The silhouette of the known
    labels uses Euclidean distance in ``X``; it is 0 when it is undefined (every cell its own
    label).

    Returns
    -------
    dict
        ``ari``, ``ari_std``, ``nmi``, ``nmi_std``, ``silhouette``.
    """
    labels = np.asarray(labels)
    X = dense_if_small(X)  # pairwise distances are several times faster dense
    k = min(np.unique(labels).size, X.shape[0])
    aris, nmis = [], []
    for s in range(seed, seed + n_seeds):
        with warnings.catch_warnings():  # "Number of distinct clusters (1) found smaller than n_clusters"
            warnings.filterwarnings("ignore", message="Number of distinct clusters", category=ConvergenceWarning)
            predicted = KMeans(n_clusters=k, n_init=1, random_state=s).fit_predict(X)
        aris.append(adjusted_rand_score(labels, predicted))
        nmis.append(normalized_mutual_info_score(labels, predicted))
    rows = slice(None)
    if X.shape[0] > silhouette_max_cells:  # the same seeded sample as scikit-learn's sample_size
        rows = np.random.RandomState(seed).permutation(X.shape[0])[:silhouette_max_cells]
    n_sampled, k_sampled = labels[rows].size, np.unique(labels[rows]).size
    silhouette = label_silhouette(X[rows], labels[rows]) if 2 <= k_sampled <= n_sampled - 1 else 0.0
    return {
        "ari": float(np.mean(aris)),
        "ari_std": float(np.std(aris)),
        "nmi": float(np.mean(nmis)),
        "nmi_std": float(np.std(nmis)),
        "silhouette": float(silhouette),
    }


def label_silhouette(X, labels: np.ndarray, chunk_rows: int = 1024) -> float:
    """Mean silhouette (Euclidean) of the known labels, exactly as :func:`sklearn.metrics.silhouette_score`.

    Distances are computed a block of rows at a time from the Gram matrix of the centred data
    (float32, the per-label sums in float64) and summed per label with one matrix product, which
    is several times faster than scikit-learn's generic path; the distance matrix is never held
    whole. Agrees with scikit-learn to about 1e-6. A cell alone in its label scores 0, as there.
    """
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    X -= X.mean(axis=0)  # centred: smaller norms, so the Gram-matrix distances lose less precision
    X32 = X.astype(np.float32)
    codes, labels_index = np.unique(np.asarray(labels), return_inverse=True)
    n, k = X.shape[0], codes.size
    if not 2 <= k <= n - 1:
        raise ValueError(f"silhouette needs 2 to n - 1 labels, got {k} for {n} cells")
    counts = np.bincount(labels_index, minlength=k).astype(np.float64)
    onehot = np.zeros((n, k), dtype=np.float32)
    onehot[np.arange(n), labels_index] = 1.0
    squares = np.einsum("ij,ij->i", X, X).astype(np.float32)
    total = 0.0
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        d = X32[start:stop] @ X32.T
        d *= -2.0
        d += squares[start:stop, None]
        d += squares[None, :]
        np.maximum(d, 0.0, out=d)
        np.sqrt(d, out=d)
        d[np.arange(stop - start), np.arange(start, stop)] = 0.0
        sums = (d @ onehot).astype(np.float64)
        own = labels_index[start:stop]
        rows = np.arange(stop - start)
        own_size = counts[own] - 1.0
        a = sums[rows, own] / np.maximum(own_size, 1.0)
        means = sums / counts
        means[rows, own] = np.inf
        b = means.min(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.nan_to_num((b - a) / np.maximum(a, b))
        s[own_size == 0] = 0.0
        total += float(s.sum())
    return total / n


def representation_scores(
    embedded: np.ndarray,
    labels: np.ndarray,
    kmeans_seeds: int,
    seed: int = 0,
    linear: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    cluster: bool = True,
) -> dict[str, float]:
    """Every score of one representation: k-means ARI/NMI and label silhouette
    (:func:`cluster_scores`; left out with ``cluster=False``), 15-NN accuracy
    (:func:`knn_accuracy`), all on the rows ``embedded``, and, given ``linear = (fit, fit_labels,
    evaluate, eval_labels)``, its :func:`linear_separability` (``linear_accuracy``)."""
    row = cluster_scores(embedded, labels, kmeans_seeds, seed) if cluster else {}
    row["knn_accuracy"] = knn_accuracy(embedded, labels, seed=seed)
    if linear is not None:
        row["linear_accuracy"] = linear_separability(*linear, seed)
    return row


def convergence_epoch(losses: list[float], fraction: float = 0.95) -> int | None:
    """First epoch at which the loss has made ``fraction`` of its total decrease.

    ``losses[0]`` is the loss before training (epoch 0) and the total decrease is
    ``losses[0] - min(losses)``. Returns ``None`` when the loss never went below its start.
    """
    values = np.asarray(losses, dtype=float)
    total = values[0] - values.min()
    if not total > 0:
        return None
    target = values[0] - fraction * total
    return int(np.flatnonzero(values <= target)[0])


def epochs_to_near_best(losses: list[float], tolerance: float = 0.01) -> int:
    """First epoch whose loss is within ``tolerance`` (relative) of the lowest loss reached."""
    values = np.asarray(losses, dtype=float)
    best = values.min()
    return int(np.flatnonzero(values <= best + tolerance * abs(best))[0])


def linear_separability(
    Z_train: np.ndarray, y_train: np.ndarray, Z_test: np.ndarray, y_test: np.ndarray, seed: int = 0
) -> float:
    """Balanced accuracy on held-out cells of a logistic regression fitted on training cells.

    Answers "can a linear boundary in this representation tell the populations apart?" without
    rewarding memorisation: the classifier never sees the cells it is scored on.

    Balanced accuracy is the mean recall over the labels present among the test cells, as in
    scikit-learn; labels seen only in training (too rare for the test share) count as wrong
    answers when predicted, not as classes to score. With a single label among the training
    cells every cell is predicted as it. A classifier that has not converged after 1000
    iterations is scored as it stands, without a warning.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if np.unique(y_train).size < 2:
        predicted = np.full(y_test.shape, y_train[0] if y_train.size else None, dtype=object)
    else:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            warnings.filterwarnings("ignore", message=MANY_CLASSES_WARNING, category=UserWarning)
            classifier.fit(dense_if_small(Z_train), y_train)
        predicted = classifier.predict(dense_if_small(Z_test))
    return balanced_accuracy(y_test, predicted)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the labels in ``y_true`` (scikit-learn's ``balanced_accuracy_score``
    without its warning for predicted labels absent from ``y_true``); 0 for no cells."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return 0.0
    recalls = [float(np.mean(y_pred[y_true == label] == label)) for label in np.unique(y_true)]
    return float(np.mean(recalls))


def reconstruction_errors(X, reconstruction, batch_size: int = 4096) -> dict[str, float]:
    """Exact MSE over all entries and over the nonzero entries of ``X``, in float64 batches.

    Parameters
    ----------
    X
        Cells × genes, dense or sparse.
    reconstruction
        An array of ``X``'s shape, or a function mapping a dense batch of rows of ``X`` to
        its reconstruction.
    """
    import torch

    from scae.losses import LossTotals

    totals = LossTotals(("mse", "nonzero_mse"))
    for start in range(0, X.shape[0], batch_size):
        x = X[start : start + batch_size]
        x = (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float64)
        x_hat = reconstruction(x) if callable(reconstruction) else reconstruction[start : start + batch_size]
        totals.add(torch.from_numpy(x), torch.from_numpy(np.asarray(x_hat, dtype=np.float64)))
    return totals.result()


def pca_reconstruction_errors(
    pca, X_train, X_test, n_components: list[int], batch_size: int = 4096
) -> dict[str, dict[str, dict[str, float]]]:
    """Reconstruction errors of a fitted PCA truncated to each of ``n_components`` (a linear baseline).

    PCA subspaces are nested, so one fit with the largest size serves every smaller one. Returns
    ``{"pca<k>": {"train": {"mse", "nonzero_mse"}, "test": {...}}}``.
    """
    mean, components = pca.mean_.astype(np.float64), pca.components_.astype(np.float64)

    def truncated(k: int):
        return lambda x: mean + ((x - mean) @ components[:k].T) @ components[:k]

    return {
        f"pca{k}": {
            "train": reconstruction_errors(X_train, truncated(k), batch_size),
            "test": reconstruction_errors(X_test, truncated(k), batch_size),
        }
        for k in n_components
        if k <= pca.n_components_
    }


def knn_accuracy(X, labels: np.ndarray, k: int = 15, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated k-nearest-neighbour label accuracy of a representation.

    The cells are split into ``folds`` stratified folds (scikit-learn's
    ``StratifiedKFold(shuffle=True, random_state=seed)``); every cell of a fold is predicted by
    the majority label of its ``k`` nearest cells (Euclidean) among the other folds
    (scikit-learn's ``KNeighborsClassifier``, uniform weights: a tied vote goes to the label
    that sorts first), and the result is the fraction of held-out cells predicted right. Unlike
    k-means scores, it does not depend on the populations forming round clusters.

    Parameters
    ----------
    X
        Cells × dimensions, dense or sparse (sparse input is densified when small, as in
        :func:`scae.data.dense_if_small`); a 1-D array is one dimension. Computed in float32;
        neighbours by brute force, or a k-d tree up to :data:`KNN_TREE_MAX_DIMS` dimensions
        (the same neighbours; only among cells at exactly equal distance may the two choose
        differently).
    labels
        One label per cell.
    k
        Neighbours per vote; a training part with fewer than ``k`` cells votes with all of them.
    folds
        Number of folds. Reduced to the number of cells of the largest label when that is
        smaller (tiny inputs).
    seed
        Seed of the fold assignment (the only random choice).

    Returns
    -------
    float
        Accuracy over the held-out cells. A label with fewer cells than the folds cannot have
        a cell in every fold: its cells are always in the training part — neighbours (and
        possible wrong answers) for the others, never scored themselves, as the study treats
        labels too rare for the test share. 0.0 when every label has a single cell (no cell's
        label can be learnt from the others).
    """
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    X = dense_if_small(X)
    if not sp.issparse(X):
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[:, None]
    X = X.astype(np.float32)  # a copy: the input is never touched
    if X.ndim != 2 or labels.ndim != 1 or labels.shape[0] != X.shape[0]:
        raise ValueError(f"knn_accuracy needs a cells × dimensions matrix and one label per cell, "
                         f"got shape {X.shape} and {labels.shape[0] if labels.ndim else 0} labels")
    if k < 1 or folds < 2:
        raise ValueError(f"knn_accuracy needs k >= 1 and folds >= 2, got k={k}, folds={folds}")
    if labels.size == 0:
        return 0.0
    _, codes, label_sizes = np.unique(labels, return_inverse=True, return_counts=True)
    codes = codes.ravel()
    folds = min(folds, int(label_sizes.max()))
    if folds < 2:
        return 0.0
    scored = label_sizes[codes] >= folds
    algorithm = "kd_tree" if not sp.issparse(X) and X.shape[1] <= KNN_TREE_MAX_DIMS else "brute"
    scored_cells, train_only = np.flatnonzero(scored), np.flatnonzero(~scored)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    correct = 0
    for train_part, test_part in splitter.split(np.zeros((scored_cells.size, 1)), codes[scored_cells]):
        train = np.sort(np.concatenate([scored_cells[train_part], train_only]))
        test = scored_cells[test_part]
        classifier = KNeighborsClassifier(n_neighbors=min(k, train.size), algorithm=algorithm)
        with warnings.catch_warnings():  # many labels of a cell or two are the data's, not a mistake
            warnings.filterwarnings("ignore", message=MANY_CLASSES_WARNING, category=UserWarning)
            classifier.fit(X[train], codes[train])
        correct += int(np.count_nonzero(classifier.predict(X[test]) == codes[test]))
    return correct / scored_cells.size
