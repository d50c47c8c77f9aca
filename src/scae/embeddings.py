"""Low-dimensional views for plots: PCA (scikit-learn) and t-SNE (openTSNE), all seeded."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from scae.background import BackgroundJobs
from scae.data import column_range

if TYPE_CHECKING:
    from sklearn.decomposition import PCA

COVARIANCE_MAX_FEATURES = 2048
TSNE_INPUT_DIMS = 50
"""t-SNE runs on the representation itself up to this many dimensions, else on its top PCs."""
TSNE_WORKERS_FROM_CELLS = 2000
"""Below this many scored cells a study that starts its workers itself, after its imports, runs
its t-SNEs in its own process (each takes well under a second, starting a worker ~1.5 s); the
command line, which starts them before its own imports, starts one."""


@dataclass(frozen=True)
class TSNEConfig:
    """openTSNE settings.

    Both phases use FFT-accelerated gradients (openTSNE's interpolation, 3 points per
    interval, at least ``min_num_intervals`` intervals per axis) above ``fft_above`` cells and
    Barnes-Hut (``theta``) up to it, where the FFT grid's fixed cost dominates. 125 iterations of early
    exaggeration and 200 normal ones; measured on the built-in dataset
    (``benchmarks/tsne_settings.py``, single-threaded) against openTSNE's default (250 + 500
    iterations): a fifth of its time (2.7–3.9 s against 17–21 s), an exact KL divergence
    2.1–2.9% higher (the earlier 250 + 250 iterations: 2–3%), the same or better
    15-neighbourhood preservation, and 2-D 10-NN label accuracy within 0.013 of it.
    """

    perplexity: float = 30.0
    early_exaggeration_iter: int = 125
    n_iter: int = 200
    theta: float = 0.8
    fft_above: int = 1000
    min_num_intervals: int = 20
    exact_neighbors_below: int = 10_000


def fit_pca(X, n_components: int = 50, seed: int = 0) -> PCA:
    """Fit a seeded PCA on dense or sparse input (sparse is centred implicitly, never densified).

    Up to :data:`COVARIANCE_MAX_FEATURES` features the exact covariance eigensolver is used (one
    pass over the data, fastest for many cells); above it a randomized (dense) or ARPACK
    (sparse) solver. Input without any variance gets arbitrary orthonormal axes with zero
    explained variance (coordinates all 0) instead of NaN ratios.
    """
    from sklearn.decomposition import PCA

    n_components = max(1, min(n_components, X.shape[0] - 1, X.shape[1]))
    if X.shape[1] <= COVARIANCE_MAX_FEATURES and X.shape[0] > X.shape[1]:
        solver = "covariance_eigh"
    else:
        solver = "arpack" if sp.issparse(X) else "randomized"
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
    if _is_constant(X):  # every solver divides by the total variance (0) or fails on it (ARPACK)
        rows = X[: n_components + 1]
        with np.errstate(invalid="ignore", divide="ignore"):  # explained variance 0 / 0
            pca = PCA(n_components=n_components, svd_solver="full").fit(rows.toarray() if sp.issparse(rows) else rows)
        pca.explained_variance_[:] = 0.0
        pca.explained_variance_ratio_ = np.zeros_like(pca.explained_variance_)
        pca.singular_values_[:] = 0.0
        return pca
    return PCA(n_components=n_components, svd_solver=solver, random_state=seed).fit(X)


def _is_constant(X) -> bool:
    """Whether every column of ``X`` holds one value in every row (zero variance)."""
    low, high = column_range(X)
    return bool(np.array_equal(low, high))


def pca_coordinates(X, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """Top principal-component coordinates of ``X`` as float32."""
    return fit_pca(X, n_components, seed).transform(X).astype(np.float32)


def tsne_input(X, seed: int = 0) -> np.ndarray:
    """What t-SNE runs on: ``X`` itself up to :data:`TSNE_INPUT_DIMS` columns, else its top PCs."""
    if X.shape[1] > TSNE_INPUT_DIMS:
        X = pca_coordinates(X, TSNE_INPUT_DIMS, seed)
    elif sp.issparse(X):
        X = X.toarray()
    return np.asarray(X, dtype=np.float64)


def tsne_coordinates(X, seed: int = 0, config: TSNEConfig = TSNEConfig(), n_jobs: int = 1) -> np.ndarray:
    """2-D t-SNE coordinates of ``X`` as float32 (see :func:`tsne_embedding`)."""
    return np.asarray(tsne_embedding(X, seed, config, n_jobs), dtype=np.float32)


def tsne_embedding(X, seed: int = 0, config: TSNEConfig = TSNEConfig(), n_jobs: int = 1):
    """openTSNE ``TSNEEmbedding`` of ``X`` (reduced by :func:`tsne_input`), PCA initialisation, seeded.

    openTSNE's two phases (early exaggeration 12, then exaggeration 1; momentum 0.8 in both,
    learning rate n / exaggeration) on perplexity-based affinities; exact nearest
    neighbours up to :attr:`TSNEConfig.exact_neighbors_below` cells, Annoy above.
    """
    from openTSNE import TSNEEmbedding, affinity

    X = tsne_input(X, seed)
    n = X.shape[0]
    perplexity = min(config.perplexity, max(1.0, (n - 1) / 3.0))
    affinities = affinity.PerplexityBasedNN(
        knn_index=neighbour_index(X, min(n - 1, int(3 * perplexity)), seed, config, n_jobs),
        perplexity=perplexity,
        n_jobs=n_jobs,
        random_state=seed,
    )
    method = "fft" if n > config.fft_above else "bh"  # FFT's grid costs more than Barnes-Hut on few cells
    embedding = TSNEEmbedding(
        initial_layout(X, seed),
        affinities,
        negative_gradient_method=method,
        theta=config.theta,
        n_jobs=n_jobs,
        random_state=seed,
    )
    embedding = embedding.optimize(n_iter=config.early_exaggeration_iter, exaggeration=12, momentum=0.8,
                                   min_num_intervals=config.min_num_intervals)
    return embedding.optimize(n_iter=config.n_iter, momentum=0.8, negative_gradient_method=method,
                              min_num_intervals=config.min_num_intervals)


def neighbour_index(X: np.ndarray, k: int, seed: int = 0, config: TSNEConfig = TSNEConfig(), n_jobs: int = 1):
    """openTSNE's index of the ``k`` nearest neighbours (euclidean) of every row of ``X``.

    Exact (scikit-learn's brute-force search: one distance matrix product, about 3× faster
    than the tree search openTSNE's ``method="exact"`` picks on 50 dimensions; the same
    neighbours, up to ties and the last bits of their distances) below :attr:`TSNEConfig.exact_neighbors_below` rows, Annoy above. Built here
    rather than by ``PerplexityBasedNN(method=...)``, whose method lookup imports pynndescent
    (and numba: 0.3 s and 110 MiB per process) even when it does not use it.
    """
    from openTSNE import nearest_neighbors

    if X.shape[0] < config.exact_neighbors_below:
        return nearest_neighbors.Sklearn(X, k, n_jobs=n_jobs, random_state=seed, knn_kwargs={"algorithm": "brute"})
    return nearest_neighbors.Annoy(X, k, n_jobs=n_jobs, random_state=seed)


def initial_layout(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """openTSNE's PCA initialisation of ``X`` (top 2 PCs scaled to a standard deviation of
    1e-4, jittered), or its seeded random one (same scale) when ``X`` has no spread along a
    principal axis: PCA would then divide by zero, and NaN starting points crash the
    compiled gradient code."""
    from openTSNE import initialization

    if X.shape[1] >= 2 and not _is_constant(X):
        with np.errstate(invalid="ignore", divide="ignore"):
            layout = initialization.pca(X, random_state=seed)
        if np.isfinite(layout).all():
            return layout
    return initialization.random(X.shape[0], n_components=2, random_state=seed)


class BackgroundTSNE(BackgroundJobs):
    """t-SNE of several matrices in ``workers`` background processes
    (:class:`~scae.background.BackgroundJobs`; each imports openTSNE at once; ``workers=0``:
    in this process, when the results are asked for).

    :meth:`submit_tsne` starts the embedding of a matrix (or ``inputs`` gives them all at once);
    :meth:`~scae.background.BackgroundJobs.submit` runs any other job on the same workers, and
    :meth:`~scae.background.BackgroundJobs.results` returns everything by key (embeddings as
    float32 coordinates)::

        with BackgroundTSNE(seed=0, workers=2) as jobs:
            jobs.submit_tsne("X_tsne", X)
            ...  # other work, more submissions
            coordinates = jobs.results()
    """

    def __init__(
        self,
        inputs: dict[str, np.ndarray] | None = None,
        seed: int = 0,
        config: TSNEConfig = TSNEConfig(),
        workers: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__(workers, progress, warm_up=("openTSNE", "scae.embeddings", "scae.metrics", "scae.plots"), description="background jobs")
        self.seed, self.config = seed, config
        for key, X in (inputs or {}).items():
            self.submit_tsne(key, X)

    def submit_tsne(self, key: str, X) -> None:
        """Start the t-SNE of ``X`` (reduced here by :func:`tsne_input`) under the name ``key``."""
        self.submit(key, tsne_coordinates, tsne_input(X, self.seed), self.seed, self.config)


def subsample_indices(n: int, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """Sorted seeded random subset of ``range(n)`` of size ``min(n, max_cells)``."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))
