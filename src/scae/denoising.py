"""Denoising (imputation) evaluation: hide a seeded share of the nonzero entries, score their recovery.

The protocol of scVI (Lopez et al. 2018) and DCA (Eraslan et al. 2019): a seeded ``fraction``
of the nonzero entries of the evaluated cells is set to 0, every model (and two baselines,
:func:`baseline_reconstructions`) reconstructs the corrupted cells, and
:func:`imputation_scores` measures how close the reconstruction comes to the hidden original
values on the log-normalised scale (median and mean absolute error, Pearson and Spearman
correlation). Lopez et al. report the median L1 distance on the corrupted entries.

For raw counts the hiding happens on the counts: the corrupted cell has a smaller library (as
if sequencing had missed those molecules), and a model sees it normalised with that library.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.stats

from scae.data import dense_if_small
from scae.embeddings import fit_pca, subsample_indices
from scae.sources import library_sizes, normalize_counts

MAX_BASELINE_TRAIN_CELLS = 20_000
"""The baselines are fitted on a seeded sample of at most this many training cells."""

BASELINE_DENSE_BYTES = 256 * 1024**2
"""A sparse training sample is densified for the PCA baseline up to this size as float32 (measured:
20,000 × 2,000 at 10% nonzero, one thread, fits in 2.2 s dense against 4.0 s sparse)."""


@dataclass(frozen=True, eq=False)  # arrays: no meaningful ==
class HiddenEntries:
    """Cells with hidden entries, and what was hidden.

    Attributes
    ----------
    rows
        Row of each hidden entry in ``values`` (and ``counts``), sorted by row, then column.
    cols
        Gene (column) of each hidden entry.
    truth
        Each hidden entry's original value on the log-normalised scale (float32):
        ``log1p(count / original library × 10⁴)`` for counts, the value itself otherwise.
    values
        The evaluated cells after hiding, on the model-input (log-normalised) scale, dense
        float32, cells × genes: what a model is given.
    counts
        The same cells' raw counts after hiding (dense float32) when the data are counts, else
        ``None``.
    cells
        Which cells were evaluated: sorted row indices into the matrix given to
        :func:`hide_entries`.
    """

    rows: np.ndarray
    cols: np.ndarray
    truth: np.ndarray
    values: np.ndarray
    counts: np.ndarray | None
    cells: np.ndarray

    @property
    def n_hidden(self) -> int:
        """Number of hidden entries."""
        return int(self.rows.size)


def hide_entries(
    matrix, fraction: float = 0.1, seed: int = 0, *, counts: bool = False, max_cells: int = 2000,
    library: np.ndarray | None = None,
) -> HiddenEntries:
    """Set a seeded ``fraction`` of the nonzero entries of (a sample of) the cells to 0.

    Parameters
    ----------
    matrix
        The cells to evaluate (e.g. the test cells), cells × genes, dense or sparse; never
        modified. With ``counts=True`` raw counts (non-negative), else values already on the
        log-normalised scale.
    fraction
        Share of the evaluated cells' nonzero entries to hide, in (0, 1). Exactly
        ``round(fraction × nonzero entries)`` are hidden, fewer only where that would leave a
        cell without any nonzero entry (see below).
    seed
        Seed of the cell sample and of the hidden entries.
    counts
        Whether ``matrix`` holds raw counts. Then the counts are hidden and both the original
        and the corrupted cells are normalised with :func:`scae.sources.normalize_counts`
        (each with its own library size).
    max_cells
        At most this many cells are evaluated (a seeded sample, sorted), so the dense arrays
        stay within ``max_cells × genes`` at any input size; every gene is kept.
    library
        With ``counts``: each cell's library over *all* its genes when ``matrix`` holds only some
        of them (a gene selection; log-normalised models were trained on values scaled by the
        full library). The corrupted cells' libraries shrink by what was hidden. By default the
        row sums of ``matrix``.

    Returns
    -------
    HiddenEntries

    Notes
    -----
    Every cell keeps at least one nonzero entry (a cell with library 0 cannot be normalised,
    and a model would be given nothing of it): the nonzero entries are visited in a seeded
    random order and hidden one by one, skipping an entry that is the last one still visible
    in its cell, until the target number is hidden. Equivalently, each cell keeps one
    uniformly chosen nonzero entry (its last in that order) and the hidden entries are a
    uniform sample of the others. Cells with a single nonzero entry are never corrupted; the
    same rule holds with and without counts.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
    else:
        matrix = np.asarray(matrix)  # no copy: only the sampled rows are copied below
        if matrix.ndim != 2:
            raise ValueError(f"hide_entries needs a cells × genes matrix, got {matrix.ndim} dimensions")
    cells = subsample_indices(matrix.shape[0], max_cells, seed)
    block = matrix[cells]
    original = block.toarray().astype(np.float32) if sp.issparse(block) else np.array(block, dtype=np.float32)
    if not np.isfinite(original).all():
        raise ValueError("hide_entries needs finite values")
    if counts and (original < 0).any():
        raise ValueError("hide_entries with counts=True needs non-negative counts")

    rows, cols = _entries_to_hide(original, fraction, seed)
    corrupted = original.copy()
    corrupted[rows, cols] = 0.0
    if counts:
        full = library_sizes(original) if library is None else np.asarray(library, dtype=np.float64)[cells]
        truth = normalize_counts(original, full)[rows, cols]
        values = normalize_counts(corrupted, full - library_sizes(original - corrupted))
    else:
        truth, values = original[rows, cols], corrupted
    return HiddenEntries(
        rows=rows,
        cols=cols,
        truth=np.asarray(truth, dtype=np.float32),
        values=np.asarray(values, dtype=np.float32),
        counts=corrupted if counts else None,
        cells=cells,
    )


def _entries_to_hide(dense: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns (sorted row-major) of the entries to hide; see :func:`hide_entries`."""
    rows, cols = np.nonzero(dense)  # row-major order
    n_nonzero = rows.size
    order = np.random.default_rng([seed, 1]).permutation(n_nonzero)  # a stream apart from the cell sample's
    rows_in_order = rows[order]
    # each cell's last entry in the order is the one it keeps
    _, last_from_end = np.unique(rows_in_order[::-1], return_index=True)
    kept = np.zeros(n_nonzero, dtype=bool)
    kept[n_nonzero - 1 - last_from_end] = True
    target = int(np.floor(fraction * n_nonzero + 0.5))
    hidden = np.sort(order[~kept][:target])  # indices into the row-major nonzero entries
    return rows[hidden], cols[hidden]


def imputation_scores(hidden: HiddenEntries, reconstruction: np.ndarray) -> dict[str, float]:
    """How well ``reconstruction`` recovers the hidden entries, on the log-normalised scale.

    Parameters
    ----------
    hidden
        From :func:`hide_entries`.
    reconstruction
        A model's output for ``hidden.values`` (or ``hidden.counts``) on the log-normalised
        scale: cells × genes, the same rows as ``hidden.values``.

    Returns
    -------
    dict
        ``median_abs_error`` and ``mean_abs_error`` of the reconstructed hidden entries against
        ``hidden.truth``; ``pearson`` and ``spearman`` correlations between the two (0.0, not
        NaN, when either side is constant or fewer than 2 entries are hidden); ``n_hidden``
        (an int).
        With no hidden entry the errors are NaN.
    """
    reconstruction = np.asarray(reconstruction)
    if reconstruction.shape != hidden.values.shape:
        raise ValueError(
            f"reconstruction must have the shape of the evaluated cells {hidden.values.shape}, "
            f"got {reconstruction.shape}"
        )
    truth = hidden.truth.astype(np.float64)
    predicted = reconstruction[hidden.rows, hidden.cols].astype(np.float64)
    errors = np.abs(predicted - truth)
    n_hidden = int(truth.size)
    varies = n_hidden >= 2 and np.ptp(truth) > 0 and np.ptp(predicted) > 0
    pearson = spearman = 0.0
    if varies:
        with warnings.catch_warnings():  # near-constant input: scipy warns, the value stands
            warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
            warnings.simplefilter("ignore", scipy.stats.NearConstantInputWarning)
            pearson = float(np.nan_to_num(scipy.stats.pearsonr(truth, predicted).statistic))
            spearman = float(np.nan_to_num(scipy.stats.spearmanr(truth, predicted).statistic))
    return {
        "median_abs_error": float(np.median(errors)) if n_hidden else float("nan"),
        "mean_abs_error": float(np.mean(errors)) if n_hidden else float("nan"),
        "pearson": pearson,
        "spearman": spearman,
        "n_hidden": n_hidden,
    }


def baseline_reconstructions(
    train_values, hidden: HiddenEntries, n_components: int = 10, seed: int = 0, *, counts: bool = False
) -> dict[str, np.ndarray]:
    """Reconstructions of ``hidden.values`` by two baselines fitted on the training cells.

    Parameters
    ----------
    train_values
        Training cells × genes, dense or sparse, log-normalised (or raw counts with
        ``counts=True``, then normalised with :func:`scae.sources.normalize_counts` after
        sampling); never modified. A seeded sample of at most
        :data:`MAX_BASELINE_TRAIN_CELLS` of them is used.
    hidden
        From :func:`hide_entries`.
    n_components
        Size of the PCA baseline (capped at what the sample allows: cells − 1 and genes).
    seed
        Seed of the training-cell sample and of the PCA solver.
    counts
        Whether ``train_values`` holds raw counts.

    Returns
    -------
    dict
        ``"gene_mean"``: every gene's mean over the sampled training cells, the same row for
        every evaluated cell; ``f"pca{n_components}"``: a PCA (:func:`scae.embeddings.fit_pca`)
        fitted on the sampled training cells applied to the corrupted cells,
        ``inverse_transform(transform(values))``. Both float32, the shape of ``hidden.values``.
    """
    if train_values.shape[1] != hidden.values.shape[1]:
        raise ValueError(
            f"train_values has {train_values.shape[1]} genes, the evaluated cells {hidden.values.shape[1]}"
        )
    if sp.issparse(train_values):
        train_values = sp.csr_matrix(train_values)
    sample = train_values[subsample_indices(train_values.shape[0], MAX_BASELINE_TRAIN_CELLS, seed)]
    if counts:
        sample = normalize_counts(sample)
    sample = dense_if_small(sample, BASELINE_DENSE_BYTES)
    if sp.issparse(sample):
        sample = sp.csr_matrix(sample, dtype=np.float32)
    else:
        sample = np.asarray(sample, dtype=np.float32)
    gene_means = np.asarray(sample.mean(axis=0, dtype=np.float64)).ravel().astype(np.float32)
    pca = fit_pca(sample, n_components, seed)
    return {
        "gene_mean": np.tile(gene_means, (hidden.values.shape[0], 1)),
        f"pca{n_components}": pca.inverse_transform(pca.transform(hidden.values)).astype(np.float32),
    }
