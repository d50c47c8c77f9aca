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

    Early exaggeration runs with FFT-accelerated gradients, the normal phase with Barnes-Hut
    (``theta``) up to ``fft_above`` cells and FFT above: each is the faster method for its phase
    at a few thousand cells. Measured on the built-in dataset (``benchmarks/tsne_settings.py``,
    single-threaded): about a third of the time of openTSNE's default (250 + 500 iterations),
    with an exact KL divergence 2-3% higher and the same neighbourhood preservation and 10-NN
    label accuracy in 2-D (within 0.005).
    """

    perplexity: float = 30.0
    early_exaggeration_iter: int = 250
    n_iter: int = 250
    theta: float = 0.8
    fft_above: int = 20_000
    exact_neighbors_below: int = 10_000


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
    """2-D t-SNE coordinates of ``X`` as float32 (see :func:`tsne_embedding`)."""
    return np.asarray(tsne_embedding(X, seed, config, n_jobs), dtype=np.float32)


def tsne_embedding(X, seed: int = 0, config: TSNEConfig = TSNEConfig(), n_jobs: int = 1):
    """openTSNE ``TSNEEmbedding`` of ``X`` (reduced by :func:`tsne_input`), PCA initialisation, seeded.

    openTSNE's two phases (early exaggeration 12, then exaggeration 1; momentum 0.8 in both,
    learning rate n / exaggeration) on perplexity-based affinities; exact nearest
    neighbours up to :attr:`TSNEConfig.exact_neighbors_below` cells, Annoy above.
    """
    from openTSNE import TSNEEmbedding, affinity, initialization

    X = tsne_input(X, seed)
    n = X.shape[0]
    affinities = affinity.PerplexityBasedNN(
        X,
        perplexity=min(config.perplexity, max(1.0, (n - 1) / 3.0)),
        method="exact" if n < config.exact_neighbors_below else "annoy",
        n_jobs=n_jobs,
        random_state=seed,
    )
    embedding = TSNEEmbedding(
        initialization.pca(X, random_state=seed),
        affinities,
        negative_gradient_method="fft",
        theta=config.theta,
        n_jobs=n_jobs,
        random_state=seed,
    )
    embedding = embedding.optimize(n_iter=config.early_exaggeration_iter, exaggeration=12, momentum=0.8)
    main_method = "fft" if n > config.fft_above else "bh"
    return embedding.optimize(n_iter=config.n_iter, momentum=0.8, negative_gradient_method=main_method)


def _single_threaded_tsne(X: np.ndarray, seed: int, config: TSNEConfig) -> tuple[np.ndarray, float]:
    """Coordinates and the seconds they took, on one thread."""
    import time

    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with threadpool_limits(1):
        coords = tsne_coordinates(X, seed, config, n_jobs=1)
    return coords, time.perf_counter() - started


class BackgroundTSNE:
    """t-SNE of several matrices, computed in worker processes while the caller does other work.

    Each embedding runs single-threaded and ``workers`` run side by side: independent
    single-threaded runs use the cores better than one multi-threaded run at a time (openTSNE's
    threads scale poorly, and badly on a busy machine). Results do not depend on ``workers``;
    with ``workers <= 1`` everything runs in this process when :meth:`results` is called.

    After :meth:`results`, ``seconds`` holds each embedding's own computing time. With
    ``workers > 1`` the workers are started with "spawn", so a Python *script* that starts a
    study must keep its top-level code under ``if __name__ == "__main__":``.

    Use as a context manager so the worker processes are always shut down::

        with BackgroundTSNE(inputs, seed, config, workers=2) as jobs:
            ...  # other work
            coordinates = jobs.results()
    """

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        seed: int = 0,
        config: TSNEConfig = TSNEConfig(),
        workers: int = 1,
        progress: bool = False,
    ) -> None:
        self._seed, self._config, self._progress = seed, config, progress
        self._reduced = {key: tsne_input(X, seed) for key, X in inputs.items()}
        self._pool = None
        self._futures: dict = {}
        self.seconds: dict[str, float] = {}
        if workers > 1 and len(self._reduced) > 1:
            context = multiprocessing.get_context("spawn")  # no fork after OpenMP/torch threads
            self._pool = ProcessPoolExecutor(max_workers=min(workers, len(self._reduced)), mp_context=context)
            self._futures = {
                self._pool.submit(_single_threaded_tsne, X, seed, config): key
                for key, X in self._reduced.items()
            }

    def results(self) -> dict[str, np.ndarray]:
        """Wait for (or compute) every embedding; keys in the order they were given."""
        bar = tqdm(total=len(self._reduced), desc="t-SNE", unit="embedding", disable=not self._progress, leave=False)
        out: dict[str, tuple[np.ndarray, float]] = {}
        try:
            if self._pool is None:
                for key, X in self._reduced.items():
                    out[key] = _single_threaded_tsne(X, self._seed, self._config)
                    bar.update()
            else:
                for future in as_completed(self._futures):
                    out[self._futures[future]] = future.result()
                    bar.update()
        finally:
            bar.close()
        self.seconds = {key: out[key][1] for key in self._reduced}
        return {key: out[key][0] for key in self._reduced}

    def __enter__(self) -> BackgroundTSNE:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def subsample_indices(n: int, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """Sorted seeded random subset of ``range(n)`` of size ``min(n, max_cells)``."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))
