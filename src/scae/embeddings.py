"""Low-dimensional views for plots: PCA (scikit-learn) and t-SNE (openTSNE), all seeded."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Self

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from scae.data import column_range
from scae.interrupts import init_worker, signals_blocked_in_children

COVARIANCE_MAX_FEATURES = 2048
TSNE_INPUT_DIMS = 50
"""t-SNE runs on the representation itself up to this many dimensions, else on its top PCs."""


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
    than the tree search openTSNE's ``method="exact"`` picks on 50 dimensions, same
    neighbours) below :attr:`TSNEConfig.exact_neighbors_below` rows, Annoy above. Built here
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


def _single_threaded_tsne(X: np.ndarray, seed: int, config: TSNEConfig) -> tuple[np.ndarray, float]:
    """Coordinates and the seconds they took, on one thread."""
    import time

    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with threadpool_limits(1):
        coords = tsne_coordinates(X, seed, config, n_jobs=1)
    return coords, time.perf_counter() - started


def _init_background_worker(parent_pid: int) -> None:
    """:func:`~scae.interrupts.init_worker`, then the lowest CPU priority (nice 19).

    The workers then fill the cycles the caller leaves idle instead of time-slicing its
    training: multi-threaded training that shares its cores with busy processes of equal
    priority stalls at every synchronisation point (measured on 2 cores: 8.5 s for a model
    that trains in 2.9 s alone).
    """
    init_worker(parent_pid)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):  # not permitted (unusual for lowering one's own priority): run at normal priority
        pass


def _warm_up() -> None:
    """Import openTSNE in a fresh worker (while the caller does other work)."""
    import openTSNE  # noqa: F401


class BackgroundTSNE:
    """t-SNE of several matrices, computed in worker processes while the caller does other work.

    Matrices are handed over with :meth:`submit` as soon as they exist (or all at once as
    ``inputs``); :meth:`results` waits for all of them. Each embedding runs single-threaded and
    ``workers`` run side by side: independent single-threaded runs use the cores better than
    one multi-threaded run at a time (openTSNE's threads scale poorly, and badly on a busy
    machine). The workers start (and import openTSNE) at once. Results do not depend on
    ``workers``; with ``workers <= 1`` everything runs in this process when :meth:`results` is
    called.

    After :meth:`results`, ``seconds`` holds each embedding's own computing time. With
    ``workers > 1`` the workers are started with "spawn", so a Python *script* that starts a
    study must keep its top-level code under ``if __name__ == "__main__":``.

    Use as a context manager so the worker processes are always shut down (killed at once
    after an exception or an interrupt)::

        with BackgroundTSNE(seed=0, workers=2) as jobs:
            jobs.submit("X_tsne", X)
            ...  # other work, more submissions
            coordinates = jobs.results()
    """

    def __init__(
        self,
        inputs: dict[str, np.ndarray] | None = None,
        seed: int = 0,
        config: TSNEConfig = TSNEConfig(),
        workers: int = 1,
        progress: bool = False,
    ) -> None:
        self._seed, self._config, self._progress = seed, config, progress
        self._reduced: dict[str, np.ndarray] = {}
        self._pool = None
        self._futures: dict = {}
        self.seconds: dict[str, float] = {}
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork after OpenMP/torch threads
            try:
                # workers ignore SIGINT/SIGTERM from their first instruction: a Ctrl-C to the
                # process group reaches only this process, which then stops them
                with signals_blocked_in_children():
                    self._pool = ProcessPoolExecutor(
                        max_workers=workers, mp_context=context,
                        initializer=_init_background_worker, initargs=(os.getpid(),),
                    )
                    for _ in range(workers):  # one task each starts every worker now
                        self._pool.submit(_warm_up)
            except BaseException:
                self._stop_workers()
                raise
        for key, X in (inputs or {}).items():
            self.submit(key, X)

    def submit(self, key: str, X) -> None:
        """Start the t-SNE of ``X`` (reduced by :func:`tsne_input`) under the name ``key``."""
        if key in self._reduced:
            raise ValueError(f"t-SNE '{key}' was submitted twice")
        self._reduced[key] = tsne_input(X, self._seed)
        if self._pool is not None:
            try:
                self._futures[self._pool.submit(_single_threaded_tsne, self._reduced[key], self._seed, self._config)] = key
            except BaseException:
                self._stop_workers()
                raise

    def results(self) -> dict[str, np.ndarray]:
        """Wait for (or compute) every embedding; keys in the order they were submitted."""
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        """Shut the workers down; after an exception (an interrupt included) kill them at once."""
        if exc_type is None and self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        else:
            self._stop_workers()

    def _stop_workers(self, timeout: float = 1.0) -> None:
        """Kill the worker processes (no waiting for running embeddings) and reap them."""
        if self._pool is None:
            return
        # ProcessPoolExecutor.kill_workers() is public only from Python 3.14
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        for process in processes:
            process.join(timeout)
        self._pool = None


def subsample_indices(n: int, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """Sorted seeded random subset of ``range(n)`` of size ``min(n, max_cells)``."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_cells, replace=False))
