"""Highly variable genes: the genes a study keeps with ``--top-genes N``.

Two documented rules, as scanpy implements them (``scanpy.pp.highly_variable_genes``, without
batches):

- with raw counts, ``seurat_v3`` (Stuart et al. 2019, Seurat's ``vst``): per gene the mean and
  variance of the counts; a loess curve (span 0.3, degree 2, scikit-misc's ``loess`` as in
  scanpy) of log10 variance on log10 mean over the genes whose variance is above 0 gives each
  gene an expected standard deviation; every count is standardised by it, clipped at
  √(number of cells), and the genes are ranked by the variance of those clipped values;
- without counts (a log-normalised matrix), ``seurat`` (Satija et al. 2015, scanpy's default):
  the dispersion (variance / mean) of the ``expm1`` values, its log, z-scored within 20 bins
  of the genes' log1p mean; genes are ranked by that normalised dispersion.

The per-gene sums are accumulated block by block over the rows a :class:`~scae.sources.RowSource`
hands out, sparse-aware (implicit zeros add nothing), so a matrix on disk takes one streamed pass
for the moments plus, for ``seurat_v3``, one for the clipped sums; a matrix in memory goes
through the same passes over its rows in memory. The blocks are the same in both cases, so the
two give the same genes bit for bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scae.data import Dataset
from scae.errors import ScaeInputError

SEURAT_V3 = "seurat_v3"
SEURAT = "seurat"
LOESS_SPAN = 0.3
LOESS_DEGREE = 2
LOESS_MIN_GENES = 20
"""Fewest genes with varying counts the ``seurat_v3`` loess fit is attempted on: with fewer, a
span of 0.3 covers too few points for a degree-2 local fit (and scikit-misc may crash)."""
SEURAT_BINS = 20
"""Bins of the genes' mean expression in which ``seurat`` z-scores the dispersions."""
BLOCK_ROWS = 4096
"""Rows read at a time; a constant, so that results do not depend on where the data lies."""


def hvg_flavor(dataset: Dataset) -> str:
    """The rule :func:`highly_variable_genes` applies to ``dataset``: ``"seurat_v3"`` when it
    has raw counts, ``"seurat"`` otherwise."""
    return SEURAT_V3 if dataset.has_counts else SEURAT


def highly_variable_genes(dataset: Dataset, n_top: int, cells: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the ``n_top`` most variable genes of ``dataset``, measured on ``cells``.

    Parameters
    ----------
    dataset
        With raw counts (:meth:`~scae.data.Dataset.count_source`) the ``seurat_v3`` rule runs
        on them; without, the ``seurat`` rule on the model input (log-normalised values).
    n_top
        Number of genes to keep (≥ 1); every gene when it is at least the number of genes.
    cells
        Sorted, distinct indices of the cells to measure on (the training cells); all cells
        when ``None``.

    Returns
    -------
    numpy.ndarray
        ``min(n_top, n_genes)`` sorted gene indices (int64).

    Raises
    ------
    ScaeInputError
        When the ``seurat_v3`` loess fit is impossible (too few genes whose counts vary), or
        the values given to ``seurat`` are not logs (their ``expm1`` overflows).

    Notes
    -----
    ``seurat_v3`` keeps the genes scanpy keeps, ties included (the same ``argsort`` ranks).
    ``seurat`` keeps exactly ``n_top`` genes, ties at the cut-off going to the lower gene index,
    where scanpy keeps every gene tied with the ``n_top``-th (and fewer when fewer genes have a
    normalised dispersion); the two agree whenever no tie straddles the cut-off.
    """
    if isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer)) or n_top < 1:
        raise ValueError(f"n_top must be an integer >= 1; got {n_top!r}")
    n_genes = dataset.n_genes
    if n_top >= n_genes:
        return np.arange(n_genes, dtype=np.int64)
    rows = _cell_indices(cells, dataset.n_cells)
    if dataset.has_counts:
        variances = seurat_v3_variances(_as_stored(dataset.X if dataset.counts else dataset.raw, dataset.count_source), rows)
        # scanpy: rank = argsort(argsort(-variances)), its n_top smallest ranks are kept
        order = np.argsort(-variances.reshape(1, -1), axis=1).ravel()
    else:
        dispersions = seurat_dispersions(_as_stored(dataset.X, dataset.source), rows)
        # the largest normalised dispersions first, genes without one (NaN) last, ties by index
        order = np.argsort(-np.nan_to_num(dispersions, nan=-np.inf), kind="stable")
    return np.sort(order[:n_top]).astype(np.int64)


def top_count_genes(counts, n_top: int) -> np.ndarray:
    """Sorted indices of the ``n_top`` most variable genes of a raw-count matrix in memory (all
    its cells), by the ``seurat_v3`` rule of :func:`highly_variable_genes`."""
    from scae.sources import ArraySource

    if n_top >= counts.shape[1]:
        return np.arange(counts.shape[1], dtype=np.int64)
    variances = seurat_v3_variances(ArraySource(counts), np.arange(counts.shape[0]))
    order = np.argsort(-variances.reshape(1, -1), axis=1).ravel()
    return np.sort(order[:n_top]).astype(np.int64)


def seurat_v3_variances(source, rows: np.ndarray) -> np.ndarray:
    """Per gene, the variance of the counts standardised by the loess-fitted expected standard
    deviation and clipped at √n (``variances_norm`` of scanpy's ``seurat_v3``).

    ``source`` holds raw counts and reads them unnormalised; ``rows`` are sorted cell indices.
    """
    n = rows.size
    sums, squares = _column_sums(source, rows)
    mean, var = _mean_var(sums, squares, n)
    not_const = var > 0
    fitted = np.zeros(mean.size, dtype=np.float64)
    fitted[not_const] = _loess_fit(np.log10(mean[not_const]), np.log10(var[not_const]), n)
    reg_std = np.sqrt(10**fitted)
    clip = reg_std * np.sqrt(n) + mean
    clipped_sums, clipped_squares = _column_sums(source, rows, clip=clip)
    return (1 / ((n - 1) * np.square(reg_std))) * (n * np.square(mean) + clipped_squares - 2 * clipped_sums * mean)


def seurat_dispersions(source, rows: np.ndarray) -> np.ndarray:
    """Per gene, the normalised dispersion of scanpy's ``seurat`` flavour (NaN for genes whose
    dispersion is 0): log(variance / mean) of the ``expm1`` values, z-scored within
    :data:`SEURAT_BINS` equal-width bins of log1p(mean)."""
    sums, squares = _column_sums(source, rows, expm1=True)
    mean, var = _mean_var(sums, squares, rows.size)
    if not np.all(np.isfinite(mean)):
        raise ScaeInputError(
            "highly variable genes (seurat): expm1 of the values overflows, so they are not log-normalized "
            "expression; expected log-normalized values, or raw counts (for the seurat_v3 rule)"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        mean[mean == 0] = 1e-12
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
        mean = np.log1p(mean)
    genes = pd.DataFrame({"means": mean, "dispersions": dispersion})
    genes["mean_bin"] = pd.cut(genes["means"], bins=SEURAT_BINS)
    stats = genes.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()  # one gene in its bin: normalised dispersion 1
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[genes["mean_bin"]].set_index(genes.index)
    return ((genes["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy(dtype=np.float64)


def _as_stored(matrix, source_of_dataset):
    """The rows to measure, unnormalised: a matrix in memory as it is stored (a sparse one is not
    densified, unlike the models' source), anything else through the dataset's source."""
    from scae.sources import ArraySource

    if isinstance(matrix, np.ndarray) or sp.issparse(matrix):
        return ArraySource(matrix)
    return source_of_dataset()


def _cell_indices(cells: np.ndarray | None, n_cells: int) -> np.ndarray:
    if cells is None:
        rows = np.arange(n_cells, dtype=np.int64)
    else:
        rows = np.asarray(cells)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"cells must be a 1-D array of cell indices; got shape {rows.shape}, dtype {rows.dtype}")
        rows = rows.astype(np.int64)
        if np.any(np.diff(rows) <= 0):
            raise ValueError("cells must be sorted and distinct")
        if rows.size and (rows[0] < 0 or rows[-1] >= n_cells):
            raise ValueError(f"cells must lie in 0…{n_cells - 1}")
    if rows.size < 2:
        raise ValueError(f"highly variable genes need at least 2 cells; got {rows.size}")
    return rows


def _blocks(source, rows: np.ndarray):
    """The rows as CSR float32 blocks of :data:`BLOCK_ROWS` (duplicates summed, indices sorted)."""
    for start in range(0, rows.size, BLOCK_ROWS):
        chunk = source.read(rows[start : start + BLOCK_ROWS])
        if not sp.issparse(chunk):
            chunk = np.asarray(chunk.numpy() if hasattr(chunk, "numpy") else chunk, dtype=np.float32)
        block = sp.csr_matrix(chunk, dtype=np.float32)
        block.sum_duplicates()  # a file may repeat an entry; scipy's meaning is their sum
        yield block


def _column_sums(source, rows: np.ndarray, clip: np.ndarray | None = None, expm1: bool = False):
    """Per gene, the sum and the sum of squares of the rows' values (float64; implicit zeros add
    nothing). ``clip``: of ``min(value, clip[gene])`` (squares in float64, as scanpy);
    ``expm1``: of ``expm1(value)``; otherwise squares are taken in float32, as scanpy does."""
    n_genes = source.shape[1]
    sums = np.zeros(n_genes, dtype=np.float64)
    squares = np.zeros(n_genes, dtype=np.float64)
    for block in _blocks(source, rows):
        values, genes = block.data, block.indices
        if clip is None:
            with np.errstate(over="ignore", invalid="ignore"):  # expm1 of values that are not logs: refused later
                values = np.expm1(values) if expm1 else values
                squared = (values * values).astype(np.float64)
            values = values.astype(np.float64)
        else:
            values = np.minimum(values.astype(np.float64), clip[genes])
            squared = values * values
        sums += np.bincount(genes, weights=values, minlength=n_genes)
        squares += np.bincount(genes, weights=squared, minlength=n_genes)
    return sums, squares


def _mean_var(sums: np.ndarray, squares: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from the sums over ``n`` values (scanpy's ``_get_mean_var``)."""
    mean = sums / n
    with np.errstate(invalid="ignore", over="ignore"):
        var = squares / n - mean**2
        var *= n / (n - 1)
    return mean, var


def _loess_fit(x: np.ndarray, y: np.ndarray, n_cells: int) -> np.ndarray:
    """Fitted values of scikit-misc's loess of ``y`` on ``x`` (span 0.3, degree 2), as scanpy."""
    if x.size < LOESS_MIN_GENES:
        raise ScaeInputError(
            f"highly variable genes (seurat_v3): only {x.size} genes have counts that vary over the "
            f"{n_cells} cells measured; expected at least {LOESS_MIN_GENES} for the loess fit of variance on mean"
        )
    from skmisc.loess import loess  # imported only here: the command line stays fast without --top-genes

    model = loess(x, y, span=LOESS_SPAN, degree=LOESS_DEGREE)
    try:
        model.fit()
    except ValueError as err:
        detail = " ".join(str(err.args[0] if err.args else err).strip("b'\"").split())
        raise ScaeInputError(
            f"highly variable genes (seurat_v3): the loess fit of variance on mean over {x.size} genes failed "
            f"({detail}); expected genes whose mean counts differ more"
        ) from None
    return np.asarray(model.outputs.fitted_values, dtype=np.float64)
