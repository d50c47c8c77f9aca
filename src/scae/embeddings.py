"""Low-dimensional views for plots: PCA (scikit-learn) and t-SNE (openTSNE), all seeded."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def tsne_input(X, seed: int = 0) -> np.ndarray:
    """What t-SNE runs on: ``X`` itself up to :data:`TSNE_INPUT_DIMS` columns, else its top PCs."""
    if X.shape[1] > TSNE_INPUT_DIMS:
        X = pca_coordinates(X, TSNE_INPUT_DIMS, seed)
    elif sp.issparse(X):
        X = X.toarray()
    return np.asarray(X, dtype=np.float64)


def tsne_coordinates(X, seed: int = 0, config: TSNEConfig = TSNEConfig(), n_jobs: int = 1) -> np.ndarray:
    """2-D openTSNE embedding of ``X`` (reduced by :func:`tsne_input`), PCA initialisation, seeded."""
    from openTSNE import TSNE

    X = tsne_input(X, seed)
    n = X.shape[0]
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
    )
    return np.asarray(tsne.fit(X), dtype=np.float32)


def _single_threaded_tsne(X: np.ndarray, seed: int, config: TSNEConfig) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return tsne_coordinates(X, seed, config, n_jobs=1)


def tsne_many(
    inputs: dict[str, np.ndarray],
    seed: int = 0,
    config: TSNEConfig = TSNEConfig(),
    workers: int = 1,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """t-SNE of several matrices, run side by side in ``workers`` single-threaded processes.

    Independent single-threaded runs use the cores better than one multi-threaded run at a
    time (openTSNE's threads scale poorly, and badly when the machine is busy). Results do not
    depend on ``workers``.
    """
    reduced = {key: tsne_input(X, seed) for key, X in inputs.items()}
    bar = tqdm(total=len(reduced), desc="t-SNE", unit="embedding", disable=not progress, leave=False)
    try:
        if workers <= 1 or len(reduced) <= 1:
            out = {}
            for key, X in reduced.items():
                out[key] = _single_threaded_tsne(X, seed, config)
                bar.update()
            return out
        context = multiprocessing.get_context("spawn")  # no fork after OpenMP/torch threads
        with ProcessPoolExecutor(max_workers=min(workers, len(reduced)), mp_context=context) as pool:
            futures = {pool.submit(_single_threaded_tsne, X, seed, config): key for key, X in reduced.items()}
            out = {}
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                bar.update()
        return {key: out[key] for key in reduced}
    finally:
        bar.close()


def subsample_indices(n: int, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """Sorted seeded random subset of ``range(n)`` of size ``min(n, max_cells)``."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))
