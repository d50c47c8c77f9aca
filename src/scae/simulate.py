"""The built-in simulated single-cell dataset (used when the user gives no input).

A small Splatter-like count model: gamma-distributed baseline gene means, per-population
differential expression (lognormal fold changes, up and down), unequal population sizes,
transitional cells that partly express another population's program, lognormal library
sizes, logistic dropout of lowly expressed genes and negative-binomial (gamma-Poisson) noise
with gene-wise dispersion.  Cells are generated in chunks of :data:`CHUNK_SIZE`, each with
its own random stream spawned from the seed, so the result depends only on the arguments
and memory stays bounded by one chunk (no dense ``n_cells × n_genes`` matrix is built).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from scae.data import Dataset, make_dataset
from scae.errors import ScaeInputError

DEFAULT_N_CELLS = 5000
DEFAULT_N_GENES = 1000
DEFAULT_N_POPULATIONS = 3
DEFAULT_SEED = 0

CHUNK_SIZE = 2_000  #: cells per chunk; a constant, so output depends only on the arguments
TARGET_SUM = 1e4  #: counts per cell after library-size normalization
RAW_ORIGIN = "simulated counts"  #: where the built-in dataset's raw counts come from (for the report)

# Count-model parameters, tuned for ~76 % zeros and populations that overlap in PCA.
MEAN_SHAPE = 0.6  # baseline gene means ~ Gamma(shape, 1): many low, few high genes
POP_DECAY = 0.6  # population sizes ∝ POP_DECAY**i: 51/31/18 % for three populations
DE_FRACTION = 0.1  # fraction of genes differentially expressed in each population
DE_LOG_MEAN, DE_LOG_SD = 1.0, 0.3  # |log fold change| ~ N(mean, sd), half up, half down
MIX_MAX = 0.5  # each cell expresses a share ~ U(0, MIX_MAX) of another population's program
LIB_LOG_MEDIAN, LIB_LOG_SD = math.log(2000.0), 0.4  # library size ~ lognormal
DISPERSION, DISPERSION_LOG_SD = 0.3, 0.5  # NB dispersion: global × gene-wise lognormal
# P(dropout) = expit(slope·(mid − log μ)) with μ the gene's expected count in the cell's
# expression profile at the median library size (so dropout does not track sequencing depth).
DROPOUT_MID, DROPOUT_SLOPE = 1.0, 1.0


_OPTIONS = {"n_cells": "--cells", "n_genes": "--genes", "n_populations": "--populations", "seed": "--seed"}
"""The command-line option of each parameter, named in messages beside it."""


def _check_args(n_cells: int, n_genes: int, n_populations: int, seed: int) -> None:
    args = {"n_cells": n_cells, "n_genes": n_genes, "n_populations": n_populations, "seed": seed}

    def named(name: str) -> str:
        return f"{name} ({_OPTIONS[name]}) = {args[name]!r}"

    for name, value in args.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ScaeInputError(f"{named(name)}; expected an integer")
    if n_populations < 2:
        raise ScaeInputError(f"{named('n_populations')}; expected at least 2 populations")
    if n_cells < 2 * n_populations:
        raise ScaeInputError(
            f"{named('n_cells')}; expected at least 2 cells per population "
            f"({2 * n_populations} for {n_populations} populations)"
        )
    if n_genes < 10:
        raise ScaeInputError(f"{named('n_genes')}; expected at least 10 genes")
    if seed < 0:
        raise ScaeInputError(f"{named('seed')}; expected a non-negative integer")


def _population_model(
    n_cells: int, n_genes: int, n_populations: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw, once per seed, the labels, log baseline means, log fold changes and dispersions."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    weights = POP_DECAY ** np.arange(n_populations)
    sizes = 2 + np.floor(weights / weights.sum() * (n_cells - 2 * n_populations)).astype(int)
    sizes[0] += n_cells - sizes.sum()
    labels = rng.permutation(np.repeat(np.arange(n_populations, dtype=np.int32), sizes))
    log_base = np.log(rng.gamma(MEAN_SHAPE, 1.0, size=n_genes)).astype(np.float32)
    is_de = rng.random((n_populations, n_genes)) < DE_FRACTION
    sign = np.where(rng.random(is_de.shape) < 0.5, -1.0, 1.0)
    log_fc = sign * is_de * rng.normal(DE_LOG_MEAN, DE_LOG_SD, size=is_de.shape)
    dispersion = DISPERSION * rng.lognormal(0.0, DISPERSION_LOG_SD, size=n_genes)
    return labels, log_base, log_fc.astype(np.float32), dispersion


def _simulate_chunk(
    rng: np.random.Generator,
    labels: np.ndarray,
    log_base: np.ndarray,
    log_fc: np.ndarray,
    dispersion: np.ndarray,
) -> sp.csr_matrix:
    """Counts for one chunk of cells as a float32 CSR matrix; every cell gets ≥ 1 count."""
    n, n_pops = labels.size, log_fc.shape[0]
    lib = rng.lognormal(LIB_LOG_MEDIAN, LIB_LOG_SD, size=n)
    other = (labels + rng.integers(1, n_pops, size=n)) % n_pops
    mix = rng.uniform(0.0, MIX_MAX, size=(n, 1)).astype(np.float32)
    log_mu = log_fc[labels]
    log_mu += mix * (log_fc[other] - log_mu)
    log_mu += log_base
    log_mu -= np.log(np.exp(log_mu).sum(axis=1, keepdims=True))  # log expression proportions
    drop_logit = DROPOUT_SLOPE * (DROPOUT_MID - LIB_LOG_MEDIAN - log_mu)
    rows, cols = np.nonzero(rng.random(log_mu.shape, dtype=np.float32) >= expit(drop_logit))
    mean = np.exp(log_mu[rows, cols]) * lib[rows]  # NB noise only where nothing dropped out
    disp = dispersion[cols]
    counts = rng.poisson(rng.standard_gamma(1.0 / disp) * (mean * disp))  # gamma-Poisson
    nz = counts > 0
    rows, cols, counts = rows[nz], cols[nz], counts[nz].astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    X = sp.csr_matrix((counts, cols.astype(np.int32), indptr), shape=log_mu.shape)
    empty = np.flatnonzero(np.diff(X.indptr) == 0)
    if empty.size:  # rare: give a cell without counts one count in its top gene
        top = np.argmax(log_mu[empty], axis=1)
        ones = np.ones(empty.size, dtype=np.float32)
        X = (X + sp.csr_matrix((ones, (empty, top)), shape=X.shape)).tocsr()
    return X


def _simulate(
    n_cells: int, n_genes: int, n_populations: int, seed: int, normalize: bool
) -> tuple[sp.csr_matrix, sp.csr_matrix | None, np.ndarray]:
    """Counts and (with ``normalize``) their log-normalized values, generated chunk-wise."""
    _check_args(n_cells, n_genes, n_populations, seed)
    labels, log_base, log_fc, dispersion = _population_model(n_cells, n_genes, n_populations, seed)
    count_chunks, normalized_chunks = [], []
    for i, start in enumerate(range(0, n_cells, CHUNK_SIZE)):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, i)))
        chunk_labels = labels[start : start + CHUNK_SIZE]
        counts = _simulate_chunk(rng, chunk_labels, log_base, log_fc, dispersion)
        count_chunks.append(counts)
        if normalize:
            X = counts.copy()
            scale = TARGET_SUM / np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
            X.data *= np.repeat(scale.astype(np.float32), np.diff(X.indptr))
            np.log1p(X.data, out=X.data)
            normalized_chunks.append(X)
    counts = sp.vstack(count_chunks, format="csr", dtype=np.float32)
    normalized = sp.vstack(normalized_chunks, format="csr", dtype=np.float32) if normalize else None
    return counts, normalized, labels


def simulate_counts(
    n_cells: int = DEFAULT_N_CELLS,
    n_genes: int = DEFAULT_N_GENES,
    n_populations: int = DEFAULT_N_POPULATIONS,
    seed: int = DEFAULT_SEED,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Simulate raw UMI-like counts for cells from several populations.

    Parameters
    ----------
    n_cells, n_genes
        Matrix size; ``n_cells >= 2 * n_populations`` and ``n_genes >= 10``.
    n_populations
        Number of populations (at least 2), with decreasing sizes (≈ 51/31/18 % for 3).
    seed
        Non-negative integer; the same arguments always give bitwise identical output.

    Returns
    -------
    counts
        Cells × genes ``csr_matrix`` of float32 values holding integers; every cell has counts.
    labels
        Population index (``int32``, ``0 … n_populations-1``) of each cell.

    Raises
    ------
    ScaeInputError
        If an argument is not an integer or out of range.
    """
    counts, _, labels = _simulate(n_cells, n_genes, n_populations, seed, normalize=False)
    return counts, labels


def simulate_dataset(
    n_cells: int = DEFAULT_N_CELLS,
    n_genes: int = DEFAULT_N_GENES,
    n_populations: int = DEFAULT_N_POPULATIONS,
    seed: int = DEFAULT_SEED,
) -> Dataset:
    """The built-in dataset: simulated counts, normalized to 1e4 per cell and ``log1p``-ed, with
    the counts themselves beside them (for count models).

    Parameters
    ----------
    n_cells, n_genes, n_populations, seed
        As for :func:`simulate_counts`, whose counts (same arguments) this transforms.

    Returns
    -------
    Dataset
        Float32 CSR matrix ``log1p(counts / total * 1e4)`` with labels ``'pop0'``, ``'pop1'``, …;
        :attr:`~scae.data.Dataset.raw` holds the counts (those of :func:`simulate_counts` with
        the same arguments, generated once), ``raw_origin`` is ``"simulated counts"``.

    Raises
    ------
    ScaeInputError
        If an argument is not an integer or out of range.
    """
    counts, X, labels = _simulate(n_cells, n_genes, n_populations, seed, normalize=True)
    name = (
        f"built-in simulated dataset ({n_cells} cells × {n_genes} genes, "
        f"{n_populations} populations, seed {seed})"
    )
    return make_dataset(
        X, np.char.add("pop", labels.astype(str)), name=name, source="simulated",
        raw=counts, raw_origin=RAW_ORIGIN,
    )
