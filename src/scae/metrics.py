"""Numbers that say how well a representation keeps the cell populations apart, and convergence."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans

from scae.data import dense_if_small
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

SILHOUETTE_MAX_CELLS = 10_000
"""Silhouette is quadratic in the number of cells; above this it is computed on a seeded sample."""


def cluster_scores(
    X, labels: np.ndarray, n_seeds: int = 5, seed: int = 0, silhouette_max_cells: int = SILHOUETTE_MAX_CELLS
) -> dict[str, float]:
    """k-means agreement with the labels and the labels' silhouette.

    k-means uses k = number of distinct labels and is repeated with seeds ``seed … seed +
    n_seeds - 1``; ARI and NMI are reported as mean and standard deviation over those runs.
    The silhouette of the known labels uses Euclidean distance in ``X``.

    Returns
    -------
    dict
        ``ari``, ``ari_std``, ``nmi``, ``nmi_std``, ``silhouette``.
    """
    labels = np.asarray(labels)
    X = dense_if_small(X)  # pairwise distances are several times faster dense
    k = np.unique(labels).size
    aris, nmis = [], []
    for s in range(seed, seed + n_seeds):
        predicted = KMeans(n_clusters=k, n_init=1, random_state=s).fit_predict(X)
        aris.append(adjusted_rand_score(labels, predicted))
        nmis.append(normalized_mutual_info_score(labels, predicted))
    sample = silhouette_max_cells if X.shape[0] > silhouette_max_cells else None
    silhouette = silhouette_score(X, labels, sample_size=sample, random_state=seed)
    return {
        "ari": float(np.mean(aris)),
        "ari_std": float(np.std(aris)),
        "nmi": float(np.mean(nmis)),
        "nmi_std": float(np.std(nmis)),
        "silhouette": float(silhouette),
    }


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
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    classifier.fit(dense_if_small(Z_train), y_train)
    return float(balanced_accuracy_score(y_test, classifier.predict(dense_if_small(Z_test))))


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
