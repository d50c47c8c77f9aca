"""Low-dimensional views for plots: PCA (scikit-learn) and t-SNE (openTSNE), all seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

COVARIANCE_MAX_FEATURES = 2048
TSNE_INPUT_DIMS = 50
"""t-SNE runs on the representation itself up to this many dimensions, else on its top PCs."""


@dataclass(frozen=True)
class TSNEConfig:
    """openTSNE settings.

    The defaults (Barnes-Hut with ``theta=0.8``, 250 early-exaggeration plus 250 normal
    iterations, learning rate n/12) reach the same KL divergence as openTSNE's 250 + 500
    default on 5,000 cells in about half the time; see ``benchmarks/``.
    """

    perplexity: float = 30.0
    early_exaggeration_iter: int = 250
    n_iter: int = 250
    theta: float = 0.8
    fft_above: int = 20_000
    """Use FFT-accelerated gradients instead of Barnes-Hut above this many cells."""


def fit_pca(X, n_components: int = 50, seed: int = 0) -> PCA:
    """Fit a seeded PCA on dense or sparse input (sparse is centred implicitly, never densified).

    Up to :data:`COVARIANCE_MAX_FEATURES` features the exact covariance eigensolver is used (one
    pass over the data, fastest for many cells); above it a randomized (dense) or ARPACK
    (sparse) solver.
    """
    n_components = max(1, min(n_components, X.shape[0] - 1, X.shape[1]))
    if X.shape[1] <= COVARIANCE_MAX_FEATURES and X.shape[0] > X.shape[1]:
        solver = "covariance_eigh"
    else:
        solver = "arpack" if sp.issparse(X) else "randomized"
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
    return PCA(n_components=n_components, svd_solver=solver, random_state=seed).fit(X)


def pca_coordinates(X, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """Top principal-component coordinates of ``X`` as float32."""
    return fit_pca(X, n_components, seed).transform(X).astype(np.float32)


def tsne_coordinates(
    X,
    seed: int = 0,
    config: TSNEConfig = TSNEConfig(),
    n_jobs: int = 1,
    progress: bool = False,
    description: str = "t-SNE",
) -> np.ndarray:
    """2-D openTSNE embedding with PCA initialisation.

    ``X`` with more than :data:`TSNE_INPUT_DIMS` columns is first reduced to its top 50
    principal components.
    """
    from openTSNE import TSNE

    X = pca_coordinates(X, TSNE_INPUT_DIMS, seed) if X.shape[1] > TSNE_INPUT_DIMS else X
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    total = config.early_exaggeration_iter + config.n_iter
    every = 25
    bar = tqdm(total=total, desc=description, unit="it", disable=not progress, leave=False)

    def advance(iteration: int, error: float, embedding: np.ndarray) -> bool:
        bar.update(every)
        return False

    tsne = TSNE(
        n_components=2,
        perplexity=min(config.perplexity, max(1.0, (n - 1) / 3.0)),
        early_exaggeration_iter=config.early_exaggeration_iter,
        n_iter=config.n_iter,
        theta=config.theta,
        negative_gradient_method="fft" if n > config.fft_above else "bh",
        initialization="pca",
        n_jobs=n_jobs,
        random_state=seed,
        callbacks=advance if progress else None,
        callbacks_every_iters=every,
    )
    try:
        embedding = tsne.fit(X)
    finally:
        bar.close()
    return np.asarray(embedding, dtype=np.float32)


def subsample_indices(n: int, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """Sorted seeded random subset of ``range(n)`` of size ``min(n, max_cells)``."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))
