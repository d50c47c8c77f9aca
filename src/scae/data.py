"""Input data: the :class:`Dataset` container, file readers, validation and the train/test split.

Every reader returns a validated :class:`Dataset` (float32 cells × genes matrix, dense or CSR,
plus one string label per cell) or raises :class:`~scae.errors.ScaeInputError` with a message
that names the file and the problem. Readers never modify their input files.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import math
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scae import params as rules
from scae.errors import ScaeInputError
from scae.files import irregular_kind, path_text

Matrix = np.ndarray | sp.csr_matrix

STREAM_BYTES = 1024**3
"""An input whose dense float32 form is larger than this is streamed from disk (an ``.h5ad``
stored as CSR or dense) or memory-mapped (a ``.npy``) instead of being loaded; see :mod:`scae.sources`."""
VALIDATE_CHUNK = 8 * 1024**2
"""Values checked at a time when an input on disk is validated in one streamed pass."""
NORMALIZE_CHOICES = ("auto", "log1p", "none")
MAX_ABS_VALUE = 1e12
"""Largest magnitude accepted in a matrix. Training and scoring compute in 32-bit floats, where
squared errors of values much above this overflow to infinity (raw counts, normalised
expression and intensities stay far below it)."""
LOG_SCALE_MAX = 30.0
"""Non-negative values taken as given that reach above this are not on a log scale (log1p of
counts per 10⁴ stays below about 10, log2 of counts per million below 20): :meth:`Dataset.scale_note`."""
CONTINUOUS_MIN_DISTINCT = 50
"""A numeric label column with more distinct values than this is taken as a continuous
measurement (and refused) when it holds non-whole numbers or more distinct values than half its
cells, or more than :data:`CONTINUOUS_ALWAYS_DISTINCT` of them."""
CONTINUOUS_ALWAYS_DISTINCT = 1000


@dataclass(frozen=True)
class Dataset:
    """A labelled expression matrix, with the raw counts of the same cells and genes when known.

    Attributes
    ----------
    X
        Cells × genes: float32 dense ``ndarray`` or ``scipy.sparse.csr_matrix`` in memory, or a
        :class:`~scae.sources.RowSource` streaming from a file on disk.
    labels
        One label per cell, as strings.
    name
        Short description of where the data came from (shown in the report).
    obs_names, var_names
        Cell and gene names.
    counts
        Whether ``X`` holds raw counts; models then see ``log1p(counts / library size × 10⁴)``,
        computed per batch (:func:`scae.sources.normalize_counts`).
    stats
        Zero fraction and value range, when they were measured while reading (inputs on disk).
    raw
        Raw counts of the same cells and genes when ``X`` itself is *not* raw counts: float32
        CSR or dense in memory, or a :class:`~scae.sources.RowSource` (``counts=False``) on
        disk; ``None`` otherwise.
    raw_origin
        Where the raw counts come from, for the report (``"X"``, ``"layer 'counts'"``,
        ``"adata.raw"``, a ``.npy`` path, ``"simulated counts"``); ``None`` without counts.
    gene_selection
        Set by :meth:`select_genes`: the number of genes before the selection, whether the
        model input was normalised with each cell's library over all of them, a hash of the
        selected indices and the fingerprint of the dataset they were selected from.
    """

    X: object
    labels: np.ndarray
    name: str
    obs_names: np.ndarray = field(default=None)  # type: ignore[assignment]
    var_names: np.ndarray = field(default=None)  # type: ignore[assignment]
    counts: bool = False
    stats: dict | None = None
    raw: object = None
    raw_origin: str | None = None
    gene_selection: dict | None = None
    normalize: str = "auto"
    """How the reader was told to take the values (``--normalize``): ``"none"``, as given, silences
    :meth:`scale_note`."""

    def __post_init__(self) -> None:
        if self.obs_names is None:
            object.__setattr__(self, "obs_names", np.array([f"cell{i}" for i in range(self.n_cells)]))
        if self.var_names is None:
            object.__setattr__(self, "var_names", np.array([f"gene{j}" for j in range(self.n_genes)]))
        if self.raw is not None:
            if self.counts:
                raise ValueError("raw is for the counts of a dataset whose X is not raw counts; X holds counts here")
            if tuple(self.raw.shape) != (self.n_cells, self.n_genes):
                raise ValueError(f"raw has shape {tuple(self.raw.shape)}; expected X's {(self.n_cells, self.n_genes)}")
            if getattr(self.raw, "counts", False):
                raise ValueError("raw must be a source whose reads are not normalised (counts=False)")

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.X.shape[1])

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct labels."""
        return np.unique(self.labels)

    @property
    def on_disk(self) -> bool:
        """Whether ``X`` streams from a file instead of being held in memory."""
        return not _in_memory(self.X)

    @property
    def has_counts(self) -> bool:
        """Whether raw counts of these cells and genes are known (``X`` itself, or :attr:`raw`)."""
        return self.counts or self.raw is not None

    def source(self):
        """``X`` as a :class:`~scae.sources.RowSource`: the model input of the MSE runs (raw counts
        come out as ``log1p(counts / library size × 10⁴)``, normalised per batch)."""
        from scae.sources import ArraySource

        return self.X if self.on_disk else ArraySource(dense_if_small(self.X), counts=self.counts)

    def count_source(self):
        """The raw counts as a :class:`~scae.sources.RowSource` whose reads are *not* normalised
        (for count models), or ``None`` when the dataset has no counts."""
        from scae.sources import ArraySource

        if self.counts:
            return self.source().raw()
        if self.raw is None:
            return None
        return ArraySource(dense_if_small(self.raw)) if _in_memory(self.raw) else self.raw

    def select_genes(self, genes: np.ndarray) -> Dataset:
        """The dataset restricted to some genes (e.g. the highly variable ones), ``X`` and
        :attr:`raw` alike.

        When ``X`` holds raw counts, the model input of the selection is still
        ``log1p(counts / library × 10⁴)`` with each cell's library over *all* genes (scanpy's
        order: ``normalize_total``, ``log1p``, then the gene subset): in memory it is computed
        once here; on disk a :class:`~scae.sources.ColumnSubsetSource` computes it per batch
        from whole rows. The selection's ``X`` is then that normalised matrix (``counts=False``)
        and its :attr:`raw` the selected genes' raw counts.

        Parameters
        ----------
        genes
            Sorted, distinct gene (column) indices.
        """
        from scae.sources import ColumnSubsetSource, library_sizes, normalize_counts

        genes = _gene_indices(genes, self.n_genes)
        if self.on_disk:
            X = ColumnSubsetSource(self.X, genes)  # normalises with the whole rows' library when X holds counts
            raw = ColumnSubsetSource(self.X.raw(), genes) if self.counts else None
        elif self.counts:
            raw = self.X[:, genes]
            X = normalize_counts(raw, library_sizes(self.X))
        else:
            X, raw = self.X[:, genes], None
        if not self.counts and self.raw is not None:
            raw = self.raw[:, genes] if _in_memory(self.raw) else ColumnSubsetSource(self.raw, genes)
        selection = {
            "n_genes_before": self.n_genes,
            "library_over_all_genes": self.counts,
            "genes_sha256": _sha256(genes.astype(np.int64)),
            "from": self.fingerprint(),
        }
        return Dataset(
            X=X, labels=self.labels, name=self.name, obs_names=self.obs_names, var_names=self.var_names[genes],
            counts=False, stats=None, raw=raw, raw_origin=self.raw_origin, gene_selection=selection,
            normalize=self.normalize,
        )

    def fingerprint(self) -> dict:
        """What identifies this input: shape, labels and names, and a hash of the matrix (in
        memory) or, on disk, the file's path, size and modification time, the matrix's row
        pointers and the value statistics of the validation pass (computed once); the same for
        the raw counts, and the gene selection."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> dict:
        names = hashlib.sha256()
        for part in (self.labels, self.obs_names, self.var_names):
            names.update("\n".join(map(str, part)).encode())
        shape = [self.n_cells, self.n_genes]
        if self.gene_selection is not None:  # the dataset it came from, and which genes
            selection = {key: value for key, value in self.gene_selection.items() if key != "from"}
            return {"shape": shape, "counts": self.counts, "labels_names_sha256": names.hexdigest(),
                    "selected_from": self.gene_selection["from"], "genes": selection}
        fingerprint = {"shape": shape, "counts": self.counts, "labels_names_sha256": names.hexdigest(),
                       "matrix": _matrix_fingerprint(self.X, self.stats)}
        if self.raw is not None:  # the counts themselves: not where they came from, whose path may be spelt otherwise
            fingerprint["raw"] = {"matrix": _matrix_fingerprint(self.raw, None)}
        return fingerprint

    @functools.cached_property
    def _measured(self) -> dict | None:
        """:attr:`stats`, or for a gene selection on disk, the same measured in one streamed pass."""
        if self.stats is not None or not self.on_disk:
            return self.stats
        return _stream_stats(self.X)

    def zero_fraction(self) -> float:
        """Fraction of entries that are exactly zero."""
        if self._measured is not None:
            return self._measured["zero_fraction"]
        nonzero = self.X.count_nonzero() if sp.issparse(self.X) else np.count_nonzero(self.X)
        return 1.0 - nonzero / (self.n_cells * self.n_genes)

    def value_range(self) -> tuple[float, float]:
        """Smallest and largest value of the matrix (implicit zeros included)."""
        if self.on_disk:
            return float(self._measured["value_min"]), float(self._measured["value_max"])
        return float(self.X.min()), float(self.X.max())

    def scale_note(self, value_range: tuple[float, float] | None = None) -> str | None:
        """A note for values taken as given (not as counts) that are non-negative but beyond any
        log scale (above :data:`LOG_SCALE_MAX`): likely counts that are not whole numbers.
        ``value_range``: :meth:`value_range`, when the caller has it already (it is a pass over the matrix)."""
        if self.counts or self.normalize == "none":
            return None
        low, high = self.value_range() if value_range is None else value_range
        if low < 0 or high <= LOG_SCALE_MAX:
            return None
        return (f"the values were used as given, but they reach {high:.4g}, beyond a log-normalised scale "
                "(log1p of counts per 10⁴ stays below about 10): if they are counts (whole numbers or not), "
                "give --normalize log1p")

    def summary(self) -> dict:
        """Plain-number description for the report and ``metrics.json``."""
        classes, counts = np.unique(self.labels, return_counts=True)
        if self.on_disk:
            from scae.sources import H5DenseSource, stored_source

            stored = stored_source(self.X)
            kind = ("sparse CSR" if hasattr(stored, "indptr") else "dense" if isinstance(stored, H5DenseSource)
                    else "dense, memory-mapped")
            storage = f"{kind}, streamed from {path_text(getattr(stored, 'path', 'disk'))}"
        else:
            storage = "sparse CSR" if sp.issparse(self.X) else "dense"
        low, high = self.value_range()
        selection = self.gene_selection
        return {
            "name": self.name,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "storage": storage,
            "raw_counts": self.counts,
            "count_data": self.raw_origin if self.has_counts else None,
            "model_input": self._model_input(),
            "gene_selection": None if selection is None else {
                "n_genes": self.n_genes, "n_genes_before": selection["n_genes_before"],
            },
            "zero_fraction": round(self.zero_fraction(), 6),
            "value_min": float(low),
            "value_max": float(high),
            "scale_note": self.scale_note((low, high)),
            "constant_genes": self.constant_genes(),
            "label_counts": {str(c): int(n) for c, n in zip(classes, counts)},
        }

    def _model_input(self) -> str:
        """What the MSE runs see, in words."""
        if self.counts:
            return "log1p(counts / library size × 1e4), computed per batch"
        selection = self.gene_selection
        if selection is None:
            return "as given"
        kept = f"{self.n_genes} of {selection['n_genes_before']} genes selected"
        if selection["library_over_all_genes"]:
            return f"log1p(counts / library size × 1e4), each cell's library over all {selection['n_genes_before']} genes; {kept}"
        return f"as given; {kept}"

    def constant_genes(self) -> int:
        """Number of genes with the same value in every cell (they carry no information)."""
        if self._measured is not None and "constant_genes" in self._measured:
            return int(self._measured["constant_genes"])
        if self.on_disk:
            return 0  # not measured
        low, high = column_range(self.X)
        return int(np.count_nonzero(low == high))

    def to_anndata(self):
        """The data as an :class:`anndata.AnnData` with labels in ``obs["label"]``.

        Data streamed from disk is not copied: ``X`` is then left empty.
        """
        import anndata as ad

        obs = pd.DataFrame(
            {"label": pd.Categorical(self.labels)}, index=pd.Index(self.obs_names.astype(str))
        )
        var = pd.DataFrame(index=pd.Index(self.var_names.astype(str)))
        return ad.AnnData(X=None if self.on_disk else self.X, obs=obs, var=var)


def _in_memory(X) -> bool:
    return isinstance(X, np.ndarray) or sp.issparse(X)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _matrix_fingerprint(X, stats: dict | None) -> dict:
    """A hash of a matrix in memory; for one on disk its file's identity (path, size,
    modification time, key), its row pointers, the validation pass's statistics and any
    column selection."""
    if _in_memory(X):
        parts = (X.data, X.indices, X.indptr) if sp.issparse(X) else (X,)
        digest = hashlib.sha256()
        for array in parts:
            digest.update(np.ascontiguousarray(array).tobytes())
        return {"sha256": digest.hexdigest()}
    columns = getattr(X, "columns", None)
    stored = X.parent if columns is not None else X
    stat = Path(stored.path).stat()
    matrix = {"file": path_text(Path(stored.path).resolve()), "bytes": stat.st_size,
              "mtime_ns": stat.st_mtime_ns, "key": getattr(stored, "key", None), "stats": stats}
    indptr = getattr(stored, "indptr", None)
    if indptr is not None:
        matrix["indptr_sha256"] = _sha256(indptr)
    if columns is not None:
        matrix["columns_sha256"] = _sha256(columns)
    return matrix


def _gene_indices(genes, n_genes: int) -> np.ndarray:
    """``genes`` checked as sorted, distinct gene indices in ``0 … n_genes - 1``."""
    genes = np.asarray(genes)
    if genes.ndim != 1 or genes.size == 0 or genes.dtype.kind not in "iu":
        raise ValueError(f"genes must be a non-empty 1-D array of gene indices; got shape {genes.shape}, dtype {genes.dtype}")
    genes = genes.astype(np.int64)
    if np.any(np.diff(genes) <= 0):
        raise ValueError("genes must be sorted and distinct")
    if genes[0] < 0 or genes[-1] >= n_genes:
        raise ValueError(f"genes must lie in 0…{n_genes - 1}")
    return genes


STATS_BLOCK_ROWS = 4096
"""Rows read at a time when a gene selection on disk is measured for the summary."""


def _stream_stats(source) -> dict:
    """Zero fraction, value range and constant genes of a source's reads (the model input), in
    one streamed pass."""
    n_rows, n_cols = source.shape
    nonzero = 0
    col_low, col_high = np.full(n_cols, np.inf), np.full(n_cols, -np.inf)
    for start in range(0, n_rows, STATS_BLOCK_ROWS):
        block = source.matrix(slice(start, min(start + STATS_BLOCK_ROWS, n_rows)))
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            block.eliminate_zeros()
            nonzero += block.nnz
            block_low, block_high = column_range(block)
        else:
            block = np.asarray(block)
            nonzero += int(np.count_nonzero(block))
            block_low, block_high = block.min(axis=0), block.max(axis=0)
        np.minimum(col_low, block_low, out=col_low)
        np.maximum(col_high, block_high, out=col_high)
    return {"zero_fraction": 1.0 - nonzero / (n_rows * n_cols),
            "value_min": float(col_low.min()), "value_max": float(col_high.max()),
            "constant_genes": int(np.count_nonzero(col_low == col_high))}


DENSE_BYTES_LIMIT = 1024**3
"""Sparse matrices whose dense float32 form is at most this large are densified for computing."""


def dense_if_small(X: Matrix, limit: int = DENSE_BYTES_LIMIT) -> Matrix:
    """``X`` as a dense array when its dense float32 form fits in ``limit`` bytes, else unchanged.

    Dense arithmetic (PCA, k-means, distances, minibatches) is several times faster than sparse
    at the sizes where memory is no concern.
    """
    if sp.issparse(X) and X.shape[0] * X.shape[1] * 4 <= limit:
        return X.toarray()
    return X


def make_dataset(
    X,
    labels,
    name: str = "in-memory data",
    obs_names=None,
    var_names=None,
    source: str = "matrix",
    normalize: str = "auto",
    raw=None,
    raw_origin: str | None = None,
) -> Dataset:
    """Validate a matrix and labels and wrap them in a :class:`Dataset`.

    Parameters
    ----------
    X
        Cells × genes array-like or SciPy sparse matrix with finite numeric values of magnitude
        at most :data:`MAX_ABS_VALUE` that are not the same in every cell.
    labels
        One label per cell (any type; stored as strings), at least 2 distinct ones. Numbers
        that look like a continuous measurement are refused (see :func:`continuous_labels`);
        give numeric labels as a ``pandas.Categorical`` to pass them anyway.
    name
        Description shown in the report.
    obs_names, var_names
        Optional cell and gene names.
    source
        How to name the matrix in error messages (e.g. the file path).
    normalize
        ``"auto"``: a matrix of non-negative integers is taken as raw counts, which models see
        as ``log1p(counts / library size × 10⁴)``; ``"log1p"``: always so; ``"none"``: never.
    raw
        Raw counts of the same cells and genes (array-like or SciPy sparse; non-negative whole
        numbers), kept as :attr:`Dataset.raw` when ``X`` itself is not taken as raw counts
        (then ``X`` is the model input of the MSE runs and ``raw`` feeds count models).
        Ignored when ``X`` holds the counts itself.
    raw_origin
        Where the raw counts come from, for the report (default ``"raw counts"``; ``"X"``
        when ``X`` holds them).
    """
    X = as_matrix(X, source)
    given = None
    if raw is not None:
        origin = raw_origin or "raw counts"
        shape = X.shape
        given = _GivenCounts(origin, lambda: _as_counts(raw, origin, shape))
    return _validated(X, labels, name, obs_names, var_names, source, normalize, _LabelOrigin.given(), "X", given)


@dataclass(frozen=True)
class _GivenCounts:
    """Raw counts given beside ``X``: where they come from (for the report) and how to read and
    check them (done only when ``X`` itself is not taken as raw counts)."""

    origin: str
    read: Callable[[], object]


def _count_data(counts: bool, x_origin: str, given: _GivenCounts | None) -> tuple[object, str | None]:
    """``(raw, raw_origin)`` of a dataset: nothing beside ``X`` when ``X`` holds the counts
    (given counts are then not read), the given counts read and checked otherwise."""
    if counts:
        return None, x_origin
    if given is None:
        return None, None
    return given.read(), given.origin


def _as_counts(raw, where: str, shape: tuple[int, int], against: str = "X", columns: np.ndarray | None = None):
    """Raw counts in memory, checked like any matrix (:func:`as_matrix`), of the given shape, and
    non-negative whole numbers; ``columns`` maps their columns to the stored ones (for messages).
    A row source (on disk, validated by its reader) is only checked for its shape."""
    on_disk = hasattr(raw, "read") and hasattr(raw, "n_rows")  # a row source (its values are not read here)
    raw = raw.raw() if on_disk else as_matrix(raw, where)
    if tuple(raw.shape) != tuple(shape):
        raise ScaeInputError(
            f"{where}: has shape {tuple(raw.shape)} but {against} has shape {tuple(shape)}; "
            "expected raw counts of the same cells and genes"
        )
    if not on_disk:
        _check_count_values(raw, where, columns=columns)
    return raw


def not_counts(values: np.ndarray) -> np.ndarray | None:
    """Mask of the values that are not counts (negative or not whole), or ``None`` when all are."""
    if values.size == 0 or values.dtype.kind == "b":
        return None
    if values.dtype.kind in "iu":
        bad = values < 0
    else:
        bad = (values < 0) | (values != np.floor(values))
    return bad if bad.any() else None


def _count_problem(where: str, row: int, col: int, value) -> ScaeInputError:
    return ScaeInputError(
        f"{where}: holds {float(value):g} at row {row}, column {col}, which is not a count; "
        "expected raw counts (non-negative whole numbers)"
    )


def _check_count_values(X: Matrix, where: str, row_offset: int = 0, columns: np.ndarray | None = None) -> None:
    """Refuse values that are not counts, naming the first one's row and column (``X`` is a whole
    matrix or a block of rows starting at ``row_offset``)."""
    values = X.data if sp.issparse(X) else X
    bad = not_counts(values)
    if bad is None:
        return
    if sp.issparse(X):
        pos = int(np.flatnonzero(bad)[0])
        row, col, value = int(np.searchsorted(X.indptr, pos, side="right") - 1), int(X.indices[pos]), values[pos]
    else:
        row, col = (int(i) for i in np.argwhere(bad)[0])
        value = values[row, col]
    raise _count_problem(where, row_offset + row, col if columns is None else int(columns[col]), value)


@dataclass(frozen=True)
class _LabelOrigin:
    """Where labels came from, for error messages: ``"{where}: {subject} …; {hint}"``."""

    where: str
    subject: str
    hint: str = ""
    """Added to every message about the labels."""
    numbers_hint: str = ""
    """Added to the message about continuous numbers."""

    @classmethod
    def given(cls) -> _LabelOrigin:
        return cls("labels", "the label array", numbers_hint="give them as a pandas.Categorical if these numbers are labels")

    def refuse(self, problem: str, expected: str, numbers: bool = False) -> ScaeInputError:
        hints = "".join(f"; {hint}" for hint in (self.numbers_hint if numbers else "", self.hint) if hint)
        return ScaeInputError(f"{self.where}: {self.subject} {problem}; {expected}{hints}")


def _validated(
    X: Matrix, labels, name, obs_names, var_names, source: str, normalize: str, origin: _LabelOrigin,
    x_origin: str = "X", given: _GivenCounts | None = None,
) -> Dataset:
    """A :class:`Dataset` of a matrix checked by :func:`as_matrix`: structure, raw counts, labels;
    ``x_origin`` names ``X`` as the source of counts, ``given`` the counts given beside it."""
    check_varies(X, source)
    counts = decide_counts(normalize, value_profile(X.data if sp.issparse(X) else X), source)
    raw, raw_origin = _count_data(counts, x_origin, given)
    return _labelled(X, labels, name, obs_names, var_names, source, counts, origin=origin, raw=raw, raw_origin=raw_origin,
                     normalize=normalize)


def _labelled(
    X, labels, name, obs_names, var_names, source: str, counts: bool, stats: dict | None = None,
    origin: _LabelOrigin | None = None, raw=None, raw_origin: str | None = None, normalize: str = "auto",
) -> Dataset:
    origin = origin or _LabelOrigin.given()
    labels = _as_labels(labels, origin)
    if labels.shape[0] != X.shape[0]:
        raise ScaeInputError(
            f"{source}: {labels.shape[0]} labels for {X.shape[0]} cells (rows); "
            "expected exactly one label per cell"
        )
    for names, what in ((obs_names, "cell"), (var_names, "gene")):
        if names is not None and any("\0" in str(value) for value in names):
            raise ScaeInputError(f"{source}: a {what} name holds a NUL character; expected printable names")
    return Dataset(
        X=X,
        labels=labels,
        name=name,
        obs_names=None if obs_names is None else np.asarray(obs_names).astype(str),
        var_names=None if var_names is None else np.asarray(var_names).astype(str),
        counts=counts,
        stats=stats,
        raw=raw,
        raw_origin=raw_origin,
        normalize=normalize,
    )


def column_range(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene minimum and maximum of a dense or sparse matrix in memory (implicit zeros count)."""
    if sp.issparse(X):
        return X.min(axis=0).toarray().ravel(), X.max(axis=0).toarray().ravel()
    return X.min(axis=0), X.max(axis=0)


def check_varies(X, source: str) -> None:
    """Refuse a matrix in memory in which every gene has one value in every cell (see :func:`_check_varies`)."""
    _check_varies(*column_range(X), X.shape[0], source)


def _check_varies(low: np.ndarray, high: np.ndarray, n_cells: int, source: str) -> None:
    """Refuse a matrix in which every gene has one value in every cell: nothing to learn."""
    if n_cells < 2 or not np.array_equal(low, high):
        return
    if not np.any(high):
        problem = "every value is 0, so there is no expression to learn from"
    elif np.all(high == high[0]):
        problem = f"every value is {float(high[0]):g}, so there is no structure to learn"
    else:
        problem = (f"all {n_cells} cells have the same values (every gene is constant across cells), "
                   "so there is no structure to learn")
    raise ScaeInputError(f"{source}: {problem}; expected expression values that differ between cells")


def value_profile(values: np.ndarray) -> tuple[bool, bool]:
    """``(non_negative, integer_counts)`` of some values: all ≥ 0, and all integers with one > 0."""
    values = np.asarray(values)
    if values.size == 0:
        return True, False
    non_negative = bool(values.min() >= 0)
    if values.dtype.kind in "biu":
        return non_negative, bool(non_negative and values.max() > 0)
    return non_negative, bool(non_negative and values.max() > 0 and np.all(values == np.floor(values)))


def decide_counts(normalize: str, profile: tuple[bool, bool], source: str) -> bool:
    """Whether a matrix is treated as raw counts, for a ``normalize`` choice (see :func:`make_dataset`)."""
    if normalize not in NORMALIZE_CHOICES:
        raise ScaeInputError(f"unknown normalize '{normalize}'; expected one of: {', '.join(NORMALIZE_CHOICES)}")
    non_negative, integer_counts = profile
    if normalize == "none":
        return False
    if normalize == "log1p":
        if not non_negative:
            raise ScaeInputError(
                f"{source}: --normalize log1p needs counts, but the matrix holds negative values; "
                "expected non-negative counts"
            )
        return True
    return integer_counts


def _nullable_numbers(table: pd.DataFrame) -> bool:
    """Whether ``table`` holds numbers only, some of them in pandas' nullable dtypes (``Float64``,
    ``Int64``, ``boolean``), which NumPy would read as objects; plain NumPy columns are read as
    they are (no copy), anything else (text, times) is refused by its dtype."""
    dtypes = list(table.dtypes)
    extension = [isinstance(dtype, pd.api.extensions.ExtensionDtype) for dtype in dtypes]
    numeric = [pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype) for dtype in dtypes]
    return bool(dtypes) and any(extension) and all(numeric)


def as_matrix(X, source: str = "matrix") -> Matrix:
    """Return ``X`` (array-like, SciPy sparse or AnnData) as float32 dense or CSR after checks.

    Raises :class:`~scae.errors.ScaeInputError` for a matrix that is not 2-D, not numeric,
    empty, a damaged sparse structure, or holds NaN, infinite or huge values (beyond
    ±:data:`MAX_ABS_VALUE`). Values are checked as given, before the conversion to float32.
    """
    if hasattr(X, "obs") and hasattr(X, "X"):  # AnnData
        if X.X is None:
            raise ScaeInputError(f"{source}: the AnnData holds no X; expected a cells × genes matrix in X")
        if getattr(X, "isbacked", False) and not (sp.issparse(X.X) or isinstance(X.X, np.ndarray)):
            raise ScaeInputError(f"{source}: the AnnData is backed by its file and its X not loaded; expected it in "
                                 "memory (adata.to_memory()), or give the file to scae study or scae fit, which can "
                                 "stream it (--stream)")
        X = X.X
    if isinstance(X, pd.DataFrame) and _nullable_numbers(X):  # Float64, Int64, boolean: NumPy sees objects
        X = X.to_numpy(dtype=np.float64, na_value=np.nan)
    if sp.issparse(X):
        if X.ndim != 2:
            raise ScaeInputError(f"{source}: matrix has shape {X.shape}; expected 2-D cells × genes")
        if X.dtype.kind not in "biuf":
            raise ScaeInputError(f"{source}: matrix has dtype {X.dtype}; expected numbers (float or int)")
        try:
            X = sp.csr_matrix(X)
            X.check_format(full_check=True)  # column indices out of range would corrupt memory later
        except (ValueError, TypeError) as err:
            raise ScaeInputError(f"{source}: damaged sparse matrix ({_one_line(err)}); expected a valid CSR/CSC matrix") from None
    else:
        if getattr(X, "requires_grad", False) and callable(getattr(X, "detach", None)):
            X = X.detach()  # a PyTorch tensor in an autograd graph: its values
        try:
            X = np.asarray(X)
        except (ValueError, TypeError, RuntimeError) as err:  # ragged nested lists, a tensor on a GPU, …
            raise ScaeInputError(f"{source}: not a matrix ({_one_line(err)}); expected a cells × genes array") from None
        if X.dtype.kind not in "biuf":
            raise ScaeInputError(
                f"{source}: matrix has dtype {X.dtype}; expected numbers (float or int)"
            )
        if X.ndim != 2:
            raise ScaeInputError(
                f"{source}: matrix has shape {X.shape} ({X.ndim}-D); expected 2-D cells × genes"
            )
    if X.shape[0] == 0 or X.shape[1] < 2:
        raise ScaeInputError(
            f"{source}: matrix has shape {X.shape}; expected cells × genes with at least 1 cell and 2 genes"
        )
    _check_values(X, source)
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    return X.astype(np.float32, copy=False)


def _check_values(X: Matrix, source: str, row_offset: int | None = None) -> None:
    """Refuse NaN, infinite and huge values, naming how many and where the first one is
    (``X`` is the whole matrix, or, with ``row_offset``, a block of rows starting there)."""
    values = X.data if sp.issparse(X) else X
    problem = _value_problem(values)
    if problem is None:
        return
    bad, what = problem
    if sp.issparse(X):
        pos = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(X.indptr, pos, side="right") - 1)
        col, value = int(X.indices[pos]), values[pos]
    else:
        row, col = (int(i) for i in np.argwhere(bad)[0])
        value = values[row, col]
    count = f"{int(bad.sum())} " if row_offset is None else ""
    raise ScaeInputError(f"{source}: {count}{what((row_offset or 0) + row, col, value)}")


def _value_problem(values: np.ndarray):
    """``None`` when every value is finite and within ±:data:`MAX_ABS_VALUE`; else the mask of
    the bad values and a function ``(row, col, value) -> message`` describing them."""
    if values.size == 0 or values.dtype.kind == "b":
        return None
    low, high = values.min(), values.max()  # NaN propagates: no full-size temporary when all is well
    if not (np.isfinite(low) and np.isfinite(high)):
        return ~np.isfinite(values), lambda row, col, value: (
            f"NaN or infinite value(s), first at row {row}, column {col}; expected finite numbers"
        )
    if max(-float(low), float(high)) > MAX_ABS_VALUE:
        return (values > MAX_ABS_VALUE) | (values < -MAX_ABS_VALUE), lambda row, col, value: (
            f"huge value(s) beyond ±{MAX_ABS_VALUE:.0e}, first at row {row}, column {col} ({float(value):g}); "
            f"expected values of magnitude at most {MAX_ABS_VALUE:.0e} (scae computes in 32-bit floats, "
            "where their squares overflow); rescale the matrix"
        )
    return None


def _label_series(labels) -> pd.Series:
    """Labels as a pandas Series, keeping a categorical or numeric dtype."""
    if isinstance(labels, (pd.Series, pd.Categorical, pd.Index)):
        return pd.Series(np.asarray(labels) if isinstance(labels, pd.Index) else labels).reset_index(drop=True)
    array = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    return pd.Series(array.ravel())


def _as_labels(labels, origin: _LabelOrigin) -> np.ndarray:
    if isinstance(labels, Iterator):  # a generator: its labels, once
        labels = list(labels)
    if not isinstance(labels, (pd.Series, pd.Categorical, pd.Index, str)):
        shape = labels.shape if isinstance(labels, np.ndarray) else np.asarray(labels, dtype=object).shape
        if len(shape) == 2 and shape[1] == 1:  # a column of labels
            labels = np.asarray(labels).ravel()
        elif len(shape) != 1:
            raise origin.refuse(f"has shape {tuple(shape)}", "expected one label per cell (a 1-D sequence)")
    series = _label_series(labels)
    missing = series.isna().to_numpy()
    if missing.any():
        raise origin.refuse(
            f"leaves {int(missing.sum())} cell(s) without a label, first at cell {int(np.flatnonzero(missing)[0])}",
            "expected a label for every cell",
        )
    reason = continuous_labels(series)
    if reason is not None:
        raise origin.refuse(f"holds {reason}, not cell labels", "expected one cell-type label per cell", numbers=True)
    strings = series.astype(str)
    blank = (strings.str.strip() == "").to_numpy()  # as a labels file's empty line: no label
    if blank.any():
        raise origin.refuse(
            f"leaves {int(blank.sum())} cell(s) with a blank label (empty or only spaces), first at cell "
            f"{int(np.flatnonzero(blank)[0])}",
            "expected a label for every cell",
        )
    distinct = strings.unique()  # Python strings: a NUL inside survives (NumPy strings drop trailing ones)
    long = next((label for label in distinct if len(label) > MAX_LABEL_CHARS), None)
    if long is not None:  # as in a labels file: a figure legend cannot show it (drawing one took minutes)
        cell = int(np.flatnonzero(strings.to_numpy() == long)[0])
        raise origin.refuse(f"holds a label of {len(long):,} characters (cell {cell})",
                            f"expected labels of at most {MAX_LABEL_CHARS:,} characters")
    for label in distinct:  # as in a labels file: control characters (NUL, escape codes, line breaks) refused
        control = _control_character(label)
        if control is not None:
            cell = int(np.flatnonzero(strings.to_numpy() == label)[0])
            raise origin.refuse(f"holds the control character {control!r} in the label of cell {cell}",
                                "expected printable labels")
    text = strings.to_numpy(dtype=str)
    if distinct.size < 2:
        only = f" ('{distinct[0]}')" if distinct.size else ""
        raise origin.refuse(
            f"has only 1 distinct label{only} for all {text.size} cells",
            "expected at least 2 labels (cell populations) to compare",
        )
    return text


def continuous_labels(labels) -> str | None:
    """Why ``labels`` look like a continuous measurement rather than cell labels, or ``None``.

    Numbers (numeric values, or strings that all parse as finite numbers; never a categorical
    or boolean column) are taken as continuous when there are more than
    :data:`CONTINUOUS_MIN_DISTINCT` distinct values and either some are not whole numbers, or
    they outnumber half of the cells, or there are more than
    :data:`CONTINUOUS_ALWAYS_DISTINCT`. Integer codes with few values (cluster ids 0…k) and
    few distinct decimals (sub-clusters 3.1, 3.2) stay labels.
    """
    series = _label_series(labels)
    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype.kind == "b" or series.empty:
        return None
    if series.dtype.kind in "iuf":
        numbers = series.to_numpy(dtype=np.float64)
    else:  # words, or numbers written as text (a labels file)
        numbers = pd.to_numeric(series.astype(str), errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(numbers).all():  # a word ("nan" and "inf" included): labels
        return None
    distinct = np.unique(numbers).size
    if distinct <= CONTINUOUS_MIN_DISTINCT:
        return None
    whole = bool(np.all(numbers == np.round(numbers)))
    if whole and distinct <= numbers.size / 2 and distinct <= CONTINUOUS_ALWAYS_DISTINCT:
        return None
    return f"continuous numbers ({distinct} distinct values)"


def read_counts_labels(
    counts_path: str | Path, labels_path: str | Path, normalize: str = "auto", stream: bool | None = None,
    *, raw_counts_path: str | Path | None = None,
) -> Dataset:
    """Read the classic pair ``counts.npy`` (cells × genes) and ``labels.txt`` (one per line).

    The ``.npy`` file is read without pickle, so it can never execute code. A matrix larger
    than :data:`STREAM_BYTES` as float32 (or any, with ``stream=True``) is memory-mapped and
    validated in one streamed pass instead of being loaded. ``normalize``: see
    :func:`make_dataset`.

    ``raw_counts_path`` names a ``.npy`` of the raw counts of the same cells and genes (same
    shape, non-negative whole numbers), kept as :attr:`Dataset.raw` for count models when the
    counts matrix is not raw counts itself (then it is not read). It is loaded or
    memory-mapped as the counts matrix is.
    """
    counts_path, labels_path = Path(counts_path), Path(labels_path)
    labels = read_labels_txt(labels_path)
    X = _load_npy(counts_path, stream)
    if len(labels) != X.shape[0]:
        raise ScaeInputError(
            f"{labels_path}: {len(labels)} labels, but {counts_path} has {X.shape[0]} cells "
            f"(rows, shape {X.shape}); expected one label per line per cell"
        )
    name = f"{path_text(counts_path.name)} + {path_text(labels_path.name)}"
    origin = _LabelOrigin(
        str(labels_path), "the labels file",
        numbers_hint="write labels that are numbers with a letter in front (e.g. c1.5) if they really are labels",
    )
    in_memory = isinstance(X, np.ndarray)
    given = None
    if raw_counts_path is not None:
        raw_path, shape = Path(raw_counts_path), tuple(X.shape)
        given = _GivenCounts(path_text(raw_path), lambda: _read_npy_counts(raw_path, not in_memory, shape, str(counts_path)))
    if in_memory:  # already checked by as_matrix
        return _validated(X, labels, name, None, None, str(counts_path), normalize, origin, path_text(counts_path), given)
    stats, profile = _scan_dense(X, str(counts_path))
    X.counts = decide_counts(normalize, profile, str(counts_path))
    raw, raw_origin = _count_data(X.counts, path_text(counts_path), given)
    return _labelled(X, labels, name, None, None, str(counts_path), X.counts, stats, origin, raw, raw_origin,
                     normalize=normalize)


def _read_npy_counts(path: Path, stream: bool, shape: tuple[int, int], against: str):
    """Raw counts from a ``.npy`` beside the counts matrix: loaded and checked, or (``stream``)
    memory-mapped and checked in one streamed pass."""
    matrix = _load_npy(path, stream, what="raw counts file")
    if isinstance(matrix, np.ndarray):
        return _as_counts(matrix, str(path), shape, against)
    if tuple(matrix.shape) != tuple(shape):
        raise ScaeInputError(
            f"{path}: has shape {tuple(matrix.shape)} but {against} has shape {tuple(shape)}; "
            "expected raw counts of the same cells and genes"
        )
    _scan_dense(matrix, str(path), counts_only=True)
    return matrix


def _scan_dense(source, where: str, counts_only: bool = False,
                counts_in: np.ndarray | None = None) -> tuple[dict, tuple[bool, bool]]:
    """One streamed pass over a dense matrix on disk (memory-mapped ``.npy``, or HDF5): numbers,
    shape, finite and bounded values, range, zeros, constant genes, counts (with
    ``counts_only``, a value that is not a count is refused; ``counts_in``, a mask of the
    columns that must hold counts, narrows that to them)."""
    stored = source.stored  # checked as stored: a float64 value beyond float32's range is not "infinite"
    if stored.dtype.kind not in "biuf":
        raise ScaeInputError(f"{where}: matrix has dtype {stored.dtype}; expected numbers (float or int)")
    if source.n_rows == 0 or source.n_cols < 2:
        raise ScaeInputError(f"{where}: matrix has shape {source.shape}; expected at least 1 cell and 2 genes")
    checked = None if counts_in is None else np.flatnonzero(counts_in)
    step = max(1, VALIDATE_CHUNK // max(source.n_cols, 1))
    scan = _ValueScan(source.n_cols)
    for start in range(0, source.n_rows, step):
        block = np.asarray(stored[start : min(start + step, source.n_rows)])
        _check_values(block, where, row_offset=start)
        if counts_only:
            if checked is None:
                _check_count_values(block, where, row_offset=start)
            else:
                _check_count_values(block[:, checked], where, row_offset=start, columns=checked)
        scan.add(block)
        as_trained = block.astype(np.float32, copy=False)  # the variation check sees what training sees:
        scan.add_columns(as_trained.min(axis=0), as_trained.max(axis=0))  # float64 denormals become 0
    return scan.result(source.n_rows, where)


def _column_extremes(low: np.ndarray, high: np.ndarray, columns: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column minimum of ``low`` and maximum of ``high`` (values given with their column
    index); ``inf`` / ``-inf`` for columns without any.

    Sorted by column (a linear-time radix sort for up to 65,536 columns) and reduced per column:
    five times faster than ``np.minimum.at`` / ``np.maximum.at`` on a few million values.
    """
    key = columns.astype(np.uint16) if n_cols <= 1 << 16 else columns
    order = np.argsort(key, kind="stable")
    per_column = np.bincount(columns, minlength=n_cols)
    present = per_column > 0
    starts = (np.cumsum(per_column) - per_column)[present]
    col_low, col_high = np.full(n_cols, np.inf), np.full(n_cols, -np.inf)
    if starts.size:
        col_low[present] = np.minimum.reduceat(low[order], starts)
        col_high[present] = np.maximum.reduceat(high[order], starts)
    return col_low, col_high


class _ValueScan:
    """Running range, zero count, per-gene range and count-likeness of a streamed matrix."""

    def __init__(self, n_cols: int) -> None:
        self.low, self.high, self.nonzero = np.inf, -np.inf, 0
        self.non_negative, self.integer = True, True
        self.col_low = np.full(n_cols, np.inf)
        self.col_high = np.full(n_cols, -np.inf)

    def add(self, values: np.ndarray) -> None:
        if values.size:
            low, high = float(values.min()), float(values.max())
            self.low, self.high = min(self.low, low), max(self.high, high)
            self.nonzero += int(np.count_nonzero(values))
            self.non_negative &= low >= 0
            if values.dtype.kind == "f":
                self.integer &= bool(np.all(values == np.floor(values)))

    def add_columns(self, low: np.ndarray, high: np.ndarray, columns: np.ndarray | None = None) -> None:
        """Fold in per-gene minima and maxima (of every gene, or of the given gene per value)."""
        if columns is None:
            np.minimum(self.col_low, low, out=self.col_low)
            np.maximum(self.col_high, high, out=self.col_high)
        else:
            chunk_low, chunk_high = _column_extremes(low, high, columns, self.col_low.size)
            np.minimum(self.col_low, chunk_low, out=self.col_low)
            np.maximum(self.col_high, chunk_high, out=self.col_high)

    def add_zeros(self, count: int, per_column: np.ndarray | None = None) -> None:
        """Entries not stored (a sparse matrix's implicit zeros); ``per_column`` says which
        genes have any."""
        if count:
            self.low, self.high = min(self.low, 0.0), max(self.high, 0.0)
            if per_column is not None:
                self.col_low[per_column] = np.minimum(self.col_low[per_column], 0.0)
                self.col_high[per_column] = np.maximum(self.col_high[per_column], 0.0)

    def result(self, n_rows: int, where: str) -> tuple[dict, tuple[bool, bool]]:
        """Statistics and the ``(non_negative, integer_counts)`` profile; refuses a matrix
        without any variation (see :func:`_check_varies`)."""
        _check_varies(self.col_low, self.col_high, n_rows, where)
        stats = {
            "zero_fraction": 1.0 - self.nonzero / (n_rows * self.col_low.size),
            "value_min": self.low,
            "value_max": self.high,
            "constant_genes": int(np.count_nonzero(self.col_low == self.col_high)),
        }
        return stats, (self.non_negative, self.non_negative and self.integer and self.high > 0)


NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path: Path, stream: bool | None = None, what: str = "counts file"):
    """The matrix of a ``.npy`` file: loaded, or an :class:`~scae.sources.NpySource` when streamed."""
    _check_readable(path, what)
    try:
        with path.open("rb") as handle:
            head = handle.read(len(NPY_MAGIC))
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be read ({err.strerror})") from None
    if head != NPY_MAGIC:
        kind = " (it is a .npz archive)" if head.startswith(b"PK") else ""
        raise ScaeInputError(f"{path}: not a NumPy .npy file{kind}; expected a cells × genes matrix saved with numpy.save")
    _check_npy_size(path)
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # not mappable (a damaged header raises many types): loading it below names the problem
        mapped = None
    if mapped is not None:
        if stream is None:
            stream = mapped.ndim == 2 and mapped.size * 4 > STREAM_BYTES
        if stream:
            return _npy_source(path, mapped)
        if mapped.dtype.kind in "biuf":  # loading makes the array and its float32 copy
            _check_fits_in_memory(path, mapped.nbytes + (0 if mapped.dtype == np.float32 else mapped.size * 4))
        del mapped
    try:
        X = np.load(path, allow_pickle=False)
    except MemoryError:
        raise ScaeInputError(f"{path}: too large to load into memory; stream it from disk instead (--stream)") from None
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ScaeInputError(
                f"{path}: holds Python objects (needs pickle, which scae never loads); "
                "expected a numeric .npy matrix"
            ) from None
        raise ScaeInputError(f"{path}: not a readable NumPy .npy file ({_one_line(err)})") from None
    except Exception as err:  # without pickle nothing runs; a damaged header raises many types
        raise ScaeInputError(f"{path}: cannot be read as a NumPy .npy file ({type(err).__name__}: {_one_line(err)})") from None
    return as_matrix(X, str(path))


def _available_memory() -> int | None:
    """Bytes of memory this process can still allocate (Linux: MemAvailable, within a cgroup
    limit), or ``None`` when unknown."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _check_fits_in_memory(path: Path, n_bytes: int) -> None:
    """Refuse to load ``n_bytes`` when less memory than that is available."""
    available = _available_memory()
    if available is not None and n_bytes > available:
        raise ScaeInputError(
            f"{path}: loading it takes {n_bytes / 1024**3:.1f} GiB but only {max(available, 0) / 1024**3:.1f} GiB "
            "of memory is available; stream it from disk instead (--stream)"
        )


def _check_npy_size(path: Path) -> None:
    """Refuse a ``.npy`` whose header promises more data than the file holds (truncated, or a
    header that would make loading allocate far more memory than the file's size)."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)  # the header only
            offset = handle.tell()
    except Exception:  # a damaged header: loading the file names the problem
        return
    if dtype.hasobject:
        return  # object arrays are refused when loaded (they would need pickle)
    expected = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
    held = path.stat().st_size - offset
    if expected > held:
        raise ScaeInputError(
            f"{path}: its header declares a {' × '.join(map(str, shape))} {dtype} matrix "
            f"({expected:,} bytes) but the file holds only {held:,} bytes of data; "
            "expected a complete file written by numpy.save"
        )


def _npy_source(path: Path, mapped: np.ndarray):
    from scae.sources import NpySource

    if mapped.dtype.kind not in "biuf":
        raise ScaeInputError(f"{path}: matrix has dtype {mapped.dtype}; expected numbers (float or int)")
    if mapped.ndim != 2 or mapped.shape[0] == 0 or mapped.shape[1] < 2:
        raise ScaeInputError(
            f"{path}: matrix has shape {mapped.shape}; expected 2-D cells × genes with at least 1 cell and 2 genes"
        )
    if not mapped.flags.c_contiguous:
        raise ScaeInputError(
            f"{path}: is stored column by column (Fortran order), so every cell would be read from all over "
            "the file; save it row by row for streaming: numpy.save(path, numpy.ascontiguousarray(X))"
        )
    return NpySource(path)


MAX_LABEL_CHARS = 1000
"""The longest label line read (a cell type name is far shorter; /dev/zero is one endless line)."""


def _read_label_text(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The file's text with line ends made ``\\n``, read in chunks: it stops at the first line
    longer than :data:`MAX_LABEL_CHARS` (returned cut there, for the caller to refuse) and at the
    first bytes that are not UTF-8, so an endless or binary file costs one chunk, not all memory."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # a byte-order mark is not part of a label
    parts: list[str] = []
    current, pending_cr = 0, False  # characters of the line being read; a \r ended the last chunk
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            text = decoder.decode(chunk, final=not chunk)
            if pending_cr and text.startswith("\n"):
                text = text[1:]  # the \n of a \r\n split between two chunks
            pending_cr = text.endswith("\r")
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            parts.append(text)
            lengths = [len(line) for line in text.split("\n")]
            lengths[0] += current
            if max(lengths) > MAX_LABEL_CHARS or not chunk:
                break
            current = lengths[-1]
    return "".join(parts)


def read_labels_txt(path: str | Path) -> list[str]:
    """Read one label per line; surrounding white space is stripped, trailing blank lines ignored.

    Lines end in ``\n``, ``\r\n`` or ``\r``. Empty lines inside the file and control
    characters (NUL, escape codes, …; tabs are white space) are refused.
    """
    path = Path(path)
    _check_readable(path, "labels file")
    try:
        text = _read_label_text(path)
    except UnicodeDecodeError:
        raise ScaeInputError(f"{path}: not UTF-8 text; expected one label per line") from None
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be read ({err.strerror})") from None
    lines = text.split("\n")
    long = next((i for i, line in enumerate(lines) if len(line) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise ScaeInputError(f"{path}: line {long + 1} is longer than {MAX_LABEL_CHARS:,} characters; "
                             "expected one label per line")
    lines = [line.strip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    for i, line in enumerate(lines):
        if not line:
            raise ScaeInputError(f"{path}: line {i + 1} is empty; expected one label per line")
        control = _control_character(line)
        if control is not None:
            raise ScaeInputError(
                f"{path}: line {i + 1} holds the control character {control!r}; expected one printable label per line"
            )
    return lines


def _control_character(label: str) -> str | None:
    """The first control character of ``label`` (Unicode category Cc; a tab is allowed), or ``None``."""
    return next((c for c in label if unicodedata.category(c) == "Cc" and c != "\t"), None)


def read_h5ad(
    path: str | Path,
    label_key: str,
    layer: str | None = None,
    normalize: str = "auto",
    stream: bool | None = None,
    *,
    counts_layer: str | None = None,
    counts_raw: bool = False,
) -> Dataset:
    """Read an AnnData ``.h5ad`` file; labels come from ``obs[label_key]``.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    label_key
        Column of ``obs`` holding the cell labels.
    layer
        Use ``layers[layer]`` instead of ``X``.
    normalize
        Raw-count handling, see :func:`make_dataset`.
    stream
        Leave the matrix on disk and stream it (:class:`~scae.sources.H5CSRSource`, or
        :class:`~scae.sources.H5DenseSource` for a dense one); it must be stored as CSR or dense.
        ``None``: stream such a matrix when it is larger than :data:`STREAM_BYTES` as dense
        float32, load anything else.
    counts_layer
        Take the raw counts of the cells from ``layers[counts_layer]`` (kept as
        :attr:`Dataset.raw` for count models; ``X`` stays the model input of the MSE runs).
    counts_raw
        Take them from ``adata.raw.X`` instead, its genes matched to ``X``'s by name (``raw``
        may hold more genes; every gene of ``X`` must be there).

    Given counts must be non-negative whole numbers; they are read, streamed or refused as
    ``X`` is. When ``X`` itself holds raw counts, it is their source and the given ones are not
    read.
    """
    path = Path(path)
    _check_readable(path, "AnnData file")
    if counts_layer is not None and counts_raw:
        raise ScaeInputError(f"{path}: raw counts from a layer ('{counts_layer}') and from adata.raw both asked for; expected one of them")
    _probe_h5ad(path)
    key = "X" if layer is None else f"layers/{layer}"
    where = f"{path} X" if layer is None else f"{path} layer '{layer}'"
    encoding, shape = _h5ad_matrix_kind(path, key)
    if encoding == "missing" and layer is not None:
        raise ScaeInputError(f"{path}: no layer '{layer}'; available layers: {_h5ad_layers(path) or 'none'}")
    counts = _h5ad_counts_place(path, counts_layer, counts_raw)
    # before reading or scanning them, loaded or streamed
    _check_h5ad_matrices_stored(path, {key: where, **({counts.key: counts.where} if counts is not None else {})})
    if stream is None:
        stream = encoding in STREAMABLE and len(shape) == 2 and shape[0] * shape[1] * 4 > STREAM_BYTES
    if stream and encoding != "missing":
        _check_streamable(encoding, shape, where)
        return _read_h5ad_streamed(path, key, encoding, label_key, layer, normalize, where, counts)
    return _read_h5ad_in_memory(path, label_key, layer, normalize, where, counts)


@dataclass(frozen=True)
class _H5Counts:
    """Where in an ``.h5ad`` the raw counts are: the HDF5 key of the matrix, its name in error
    messages and in the report, its encoding, and the key of its gene table (``adata.raw``)."""

    key: str
    where: str
    origin: str
    encoding: str
    shape: tuple[int, ...]
    var_key: str | None = None


def _h5ad_counts_place(path: Path, counts_layer: str | None, counts_raw: bool) -> _H5Counts | None:
    """The place of the raw counts asked for, refusing a layer or ``adata.raw`` the file lacks."""
    if counts_layer is not None:
        key = f"layers/{counts_layer}"
        encoding, shape = _h5ad_matrix_kind(path, key)
        if encoding == "missing":
            raise ScaeInputError(
                f"{path}: no layer '{counts_layer}' for the raw counts; available layers: {_h5ad_layers(path) or 'none'}"
            )
        return _H5Counts(key, f"{path} layer '{counts_layer}'", f"layer '{counts_layer}'", encoding, shape)
    if counts_raw:
        for key, var_key in (("raw/X", "raw/var"), ("raw.X", "raw.var")):  # anndata's layout, then its old one
            encoding, shape = _h5ad_matrix_kind(path, key)
            if encoding != "missing":
                if key == "raw.X":  # read by anndata in memory; its gene table is no data frame to stream beside
                    encoding = "unknown"
                return _H5Counts(key, f"{path} raw.X", "adata.raw", encoding, shape, var_key=var_key)
        raise ScaeInputError(
            f"{path}: has no adata.raw for the raw counts; expected a file whose adata.raw.X holds "
            "raw counts, or a layer of counts (--counts-layer)"
        )
    return None


STREAMABLE = ("csr_matrix", "array")
"""Encodings of an ``.h5ad`` matrix that can be streamed: CSR, and dense (read by row ranges)."""


def _check_streamable(encoding: str, shape: tuple[int, ...], where: str) -> None:
    """Refuse to stream a matrix that is stored neither as CSR nor dense by rows, with the remedy."""
    if encoding not in STREAMABLE or len(shape) != 2:
        stored = {"csc_matrix": "as CSC (column-compressed)", "unknown": "in an older AnnData layout"}.get(
            encoding, f"as a {len(shape)}-D array" if encoding == "array" else f"as '{encoding}'")
        raise ScaeInputError(
            f"{where}: is stored {stored}; streaming from disk needs a CSR (row-compressed) sparse "
            "matrix (write it with adata.X = scipy.sparse.csr_matrix(adata.X)) or a dense 2-D one, "
            "or load it without streaming"
        )


def _check_h5ad_matrices_stored(path: Path, places: dict[str, str] | None = None) -> None:
    """:func:`_check_dense_stored` for the dense matrices at ``places`` (HDF5 key → its name in
    messages; CSR groups hold what they hold), in one opening of the file. By default every
    matrix of cells × genes: ``X``, ``raw/X`` and each layer (for a reader that loads them all)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if places is None:
                layers = handle.get("layers")
                places = {"X": f"{path} X", "raw/X": f"{path} raw.X",
                          **{f"layers/{name}": f"{path} layer '{name}'"
                             for name in (layers if isinstance(layers, h5py.Group) else ())}}
            for key, where in places.items():
                element = handle.get(key)
                if isinstance(element, h5py.Dataset):
                    _check_dense_stored(element, where)
    except ScaeInputError:
        raise
    except Exception as err:  # h5py raises many types for a damaged file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file (damaged: {_one_line(err)})") from None


def _check_dense_stored(dataset, where: str) -> None:
    """Refuse a dense HDF5 matrix whose storage was never (wholly) written: HDF5 then reads the
    missing part as its fill value, so a small file can declare a matrix of any size, and
    checking it would scan terabytes of zeros. Virtual datasets and data in external files
    are not judged (their storage lives elsewhere)."""
    if dataset.is_virtual or dataset.external:
        return
    shape = tuple(int(v) for v in dataset.shape)
    if dataset.chunks is None:
        written = dataset.id.get_storage_size() >= dataset.nbytes or dataset.nbytes == 0
        missing = "its storage was never written"
    else:
        total = math.prod(math.ceil(n / c) for n, c in zip(shape, dataset.chunks))
        stored = dataset.id.get_num_chunks()
        written = stored >= total
        missing = f"only {stored:,} of its {total:,} storage chunks were ever written"
    if not written:
        fill = dataset.fillvalue
        raise ScaeInputError(
            f"{where}: declares a {' × '.join(f'{n:,}' for n in shape)} matrix, but {missing} (the rest would "
            f"read as its fill value, {fill!s}); expected a file that holds the whole matrix"
        )


def _h5_source(path: Path, key: str, encoding: str):
    """The row source of the matrix at ``key``: :class:`~scae.sources.H5CSRSource` for CSR,
    :class:`~scae.sources.H5DenseSource` for a dense array."""
    from scae.sources import H5CSRSource, H5DenseSource

    return H5CSRSource(path, key) if encoding == "csr_matrix" else H5DenseSource(path, key)


def _raw_columns(raw_names, x_names, where: str) -> np.ndarray | None:
    """Column of ``adata.raw`` for each gene of ``X``, matched by name (``None``: the same genes
    in the same order); refuses when some of ``X``'s genes are missing from ``raw``."""
    raw_index = pd.Index(np.asarray(raw_names).astype(str))
    x_index = pd.Index(np.asarray(x_names).astype(str))
    if raw_index.equals(x_index):
        return None
    if not raw_index.is_unique:
        raise ScaeInputError(
            f"{where}: its gene names (raw.var_names) repeat, so X's genes cannot be matched to them; "
            "expected unique gene names"
        )
    columns = raw_index.get_indexer(x_index)
    missing = np.flatnonzero(columns < 0)
    if missing.size:
        raise ScaeInputError(
            f"{where}: lacks {missing.size} of X's {x_index.size} genes (first: '{x_index[missing[0]]}'); "
            "expected raw counts for every gene of X"
        )
    return columns.astype(np.int64)


H5AD_PROBE_SECONDS = 60.0
"""Time allowed for walking the HDF5 structure of an ``.h5ad`` file in a child process."""
_H5AD_PROBE = """
import sys, h5py
def visit(name, obj):
    for key in obj.attrs:
        obj.attrs[key]
    if isinstance(obj, h5py.Dataset) and obj.size:
        obj[(0,) * obj.ndim] if obj.ndim else obj[()]
        obj[tuple(n - 1 for n in obj.shape)] if obj.ndim else None
with h5py.File(sys.argv[1], "r") as handle:
    for key in handle.attrs:
        handle.attrs[key]
    handle.visititems(visit)
"""


def _probe_h5ad(path: Path) -> None:
    """Walk the file's HDF5 structure (every group, attribute and dataset) in a child process.

    Some damaged files make the HDF5 library loop forever or crash while reading them, which
    no exception handler can catch; in a child process that becomes one clear error. Any other
    problem is left to the reader, which names it.
    """
    import subprocess
    import sys

    try:
        probe = subprocess.run(
            [sys.executable, "-c", _H5AD_PROBE, str(path)], capture_output=True, timeout=H5AD_PROBE_SECONDS, check=False,
        )
    except subprocess.TimeoutExpired:
        raise ScaeInputError(
            f"{path}: reading its HDF5 structure did not finish in {H5AD_PROBE_SECONDS:g} s, as happens with "
            "a damaged file; expected an intact AnnData .h5ad file"
        ) from None
    except OSError:
        return  # no child process possible here: read it directly
    if probe.returncode < 0:
        raise ScaeInputError(
            f"{path}: the HDF5 library crashed reading it (signal {-probe.returncode}), as happens with a damaged "
            "file; expected an intact AnnData .h5ad file"
        )


def _h5ad_matrix_kind(path: Path, key: str) -> tuple[str, tuple[int, ...]]:
    """Encoding (``csr_matrix``, ``csc_matrix``, ``array``, …) and shape of the matrix at ``key``.

    ``("missing", ())`` when there is none; the reader then names the problem.
    """
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ScaeInputError(
            f"{path}: cannot be read as an AnnData .h5ad file (not HDF5, or truncated: {_one_line(err)})"
        ) from None
    try:
        with handle:
            if key not in handle:
                return "missing", ()
            element = handle[key]
            if isinstance(element, h5py.Dataset):
                return str(element.attrs.get("encoding-type", "array")), tuple(int(v) for v in element.shape)
            shape = tuple(int(v) for v in element.attrs.get("shape", ()))
            return str(element.attrs.get("encoding-type", "unknown")), shape
    except Exception as err:  # h5py raises many types for a damaged file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file (damaged: {_one_line(err)})") from None


def _h5ad_layers(path: Path) -> str:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return ", ".join(handle["layers"].keys()) if "layers" in handle else ""
    except Exception as err:  # h5py raises many types for a damaged file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file (damaged: {_one_line(err)})") from None


def _obs_label_origin(path: Path, label_key: str, obs: pd.DataFrame) -> _LabelOrigin:
    """Where labels from an obs column came from, with the file's categorical columns as a hint."""
    categorical = [
        str(name) for name, column in obs.items()
        if isinstance(column.dtype, pd.CategoricalDtype) or column.dtype.kind in "bOSU"
        or pd.api.types.is_string_dtype(column)
    ]
    hint = f"categorical columns in this file: {', '.join(categorical) or 'none'}"
    return _LabelOrigin(str(path), f"obs column '{label_key}'", hint=hint)


def _read_h5ad_in_memory(
    path: Path, label_key: str, layer: str | None, normalize: str, where: str, counts: _H5Counts | None = None,
) -> Dataset:
    import anndata as ad

    try:
        with _old_formats_quietly():
            adata = ad.read_h5ad(path)
    except Exception as err:  # anndata raises many types for a corrupt or foreign file
        stream = "; --stream reads it (as float32)" if "does not support dtype" in str(err) else ""
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file ({_one_line(err)}){stream}") from None
    if label_key not in adata.obs.columns:
        available = ", ".join(map(str, adata.obs.columns)) or "none"
        raise ScaeInputError(
            f"{path}: no obs column '{label_key}' for --label-key; available columns: {available}"
        )
    if layer is not None:
        if layer not in adata.layers:
            available = ", ".join(adata.layers.keys()) or "none"
            raise ScaeInputError(f"{path}: no layer '{layer}'; available layers: {available}")
        X = adata.layers[layer]
    else:
        X = adata.X
    if X is None:
        raise ScaeInputError(f"{path}: X is empty; expected an expression matrix there "
                             "(scae study and fit can read a layer instead: --layer NAME)")
    _check_matrix_type(X, where)
    given = None
    if counts is not None:
        given = _GivenCounts(counts.origin, lambda: _h5ad_counts_in_memory(adata, counts, tuple(adata.shape)))
    return _validated(
        as_matrix(X, where), adata.obs[label_key], _h5ad_name(path, label_key, layer),
        adata.obs_names.to_numpy(), adata.var_names.to_numpy(), where, normalize,
        _obs_label_origin(path, label_key, adata.obs), "X" if layer is None else f"layer '{layer}'", given,
    )


def _check_matrix_type(X, where: str) -> None:
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        if type(X).__module__.startswith(("anndata", "h5py")):
            raise ScaeInputError(f"{where}: is still in its file (a backed AnnData); expected it in memory: load the "
                                 "AnnData with adata.to_memory()")
        raise ScaeInputError(f"{where}: holds a {type(X).__name__}; expected a dense or sparse matrix")


def _h5ad_counts_in_memory(adata, counts: _H5Counts, shape: tuple[int, int]) -> Matrix:
    """The raw counts of a loaded AnnData, checked (``adata.raw``'s genes matched to ``X``'s)."""
    if counts.var_key is None:
        matrix = adata.layers[counts.key.removeprefix("layers/")]
        _check_matrix_type(matrix, counts.where)
        return _as_counts(matrix, counts.where, shape)
    matrix = adata.raw.X
    _check_matrix_type(matrix, counts.where)
    columns = _raw_columns(adata.raw.var_names, adata.var_names, counts.where)
    if columns is not None:
        matrix = (sp.csr_matrix(matrix) if sp.issparse(matrix) else matrix)[:, columns]
    return _as_counts(matrix, counts.where, shape, columns=columns)


@contextmanager
def _old_formats_quietly():
    """Read files written by older anndata versions without its warnings: they read fine, but
    anndata warns per element (``OldFormatWarning``) and about graphs it moves from ``uns`` to
    ``obsp`` (scanpy's own example files have both)."""
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", getattr(ad, "OldFormatWarning", UserWarning))
        warnings.filterwarnings("ignore", message=r"Moving element from \.uns", category=FutureWarning)
        yield


def read_anndata(path: str | Path):
    """A whole ``.h5ad`` file as an :class:`anndata.AnnData`, or one line saying why it cannot be read
    (its HDF5 structure is walked in a child process first, as :func:`read_h5ad` does)."""
    import anndata as ad

    path = Path(path)
    _check_readable(path, "AnnData file")
    _probe_h5ad(path)
    _check_h5ad_matrices_stored(path)
    try:
        with _old_formats_quietly():
            return ad.read_h5ad(path)
    except Exception as err:  # anndata raises many types for a corrupt or foreign file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file ({_one_line(err)})") from None


def anndata_counts(adata, counts_layer: str | None = None, counts_raw: bool = False, where: str = "adata"):
    """The raw counts of an in-memory AnnData, checked, or ``None`` when it has none.

    From ``layers[counts_layer]``, from ``adata.raw.X`` (``counts_raw``; its genes matched to
    ``X``'s by name), or, when neither is asked for, from ``X`` itself when it holds
    non-negative whole numbers. Returns a float32 dense array or CSR matrix.
    """
    shape = tuple(adata.shape)
    if counts_layer is not None and counts_raw:
        raise ScaeInputError("give either counts_layer or counts_raw (where the raw counts are), not both")
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            available = ", ".join(adata.layers.keys()) or "none"
            raise ScaeInputError(f"{where}: no layer '{counts_layer}' for the raw counts; available layers: {available}")
        place = _H5Counts(f"layers/{counts_layer}", f"{where} layer '{counts_layer}'", f"layer '{counts_layer}'", "", ())
        return _h5ad_counts_in_memory(adata, place, shape)
    if counts_raw:
        if adata.raw is None:
            raise ScaeInputError(f"{where}: has no adata.raw for the raw counts; expected adata.raw.X to hold raw "
                                 "counts, or a layer of counts (counts_layer)")
        return _h5ad_counts_in_memory(adata, _H5Counts("raw/X", f"{where} raw.X", "adata.raw", "", (), "raw/var"), shape)
    if adata.X is None:
        return None
    _check_matrix_type(adata.X, f"{where} X")
    X = as_matrix(adata.X, f"{where} X")
    non_negative, integer = value_profile(X.data if sp.issparse(X) else X)
    return X if integer else None


def _h5ad_name(path: Path, label_key: str, layer: str | None) -> str:
    return f"{path_text(path.name)} (labels: obs['{label_key}']" + (f", layer '{layer}')" if layer else ")")


def _read_h5ad_streamed(
    path: Path, key: str, encoding: str, label_key: str, layer: str | None, normalize: str, where: str,
    counts: _H5Counts | None = None,
) -> Dataset:
    """obs and var are read; the matrix (CSR or dense) stays on disk and is validated in one
    streamed pass (the raw counts, when given and needed, likewise)."""
    import h5py

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    try:
        with h5py.File(path, "r") as handle:
            if any(isinstance(handle.get(name), h5py.Dataset) for name in ("obs", "var")):
                raise ScaeInputError(  # tables as compound arrays: anndata before 0.7 wrote them so
                    f"{path}: is in an older AnnData layout (obs and var as record arrays), which scae cannot "
                    "stream; load it without --stream, or write it again with a current anndata "
                    "(anndata.read_h5ad(path).write_h5ad(new_path))"
                )
            obs = read_elem(handle["obs"])
            var_names = read_elem(handle["var"]).index.to_numpy() if "var" in handle else None
        if label_key not in obs.columns:
            available = ", ".join(map(str, obs.columns)) or "none"
            raise ScaeInputError(f"{path}: no obs column '{label_key}' for --label-key; available columns: {available}")
        source = _h5_source(path, key, encoding)
        try:
            stats, profile = _scan_csr(source, where) if encoding == "csr_matrix" else _scan_dense(source, where)
        finally:
            source.close()
    except ScaeInputError:
        raise
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file ({_one_line(err)})") from None
    source.counts = decide_counts(normalize, profile, where)
    if obs.shape[0] != source.n_rows:
        raise ScaeInputError(f"{path}: obs has {obs.shape[0]} cells but {key} has {source.n_rows} rows")
    if var_names is not None and var_names.size != source.n_cols:
        raise ScaeInputError(f"{path}: var has {var_names.size} genes but {key} has {source.n_cols} columns")
    given = None
    if counts is not None:
        names = var_names if var_names is not None else np.array([f"gene{j}" for j in range(source.n_cols)])
        given = _GivenCounts(counts.origin, lambda: _h5ad_counts_streamed(path, counts, source.shape, names))
    raw, raw_origin = _count_data(source.counts, "X" if layer is None else f"layer '{layer}'", given)
    return _labelled(
        source, obs[label_key], _h5ad_name(path, label_key, layer), obs.index.to_numpy(), var_names,
        where, source.counts, stats, _obs_label_origin(path, label_key, obs), raw, raw_origin, normalize=normalize,
    )


def _h5ad_counts_streamed(path: Path, counts: _H5Counts, shape: tuple[int, int], var_names: np.ndarray):
    """The raw counts of an ``.h5ad`` left on disk (CSR), validated in one streamed pass; the
    genes of ``adata.raw`` are matched to ``X``'s by name (a column selection when they differ)."""
    import h5py

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    from scae.sources import ColumnSubsetSource

    _check_streamable(counts.encoding, counts.shape, counts.where)
    try:
        source = _h5_source(path, counts.key, counts.encoding)
        columns = None
        if counts.var_key is not None:
            with h5py.File(path, "r") as handle:
                raw_names = read_elem(handle[counts.var_key]).index.to_numpy() if counts.var_key in handle else None
            if raw_names is None or raw_names.size != source.n_cols:
                raise ScaeInputError(f"{counts.where}: its gene table (raw.var) does not describe its {source.n_cols} columns")
            columns = _raw_columns(raw_names, var_names, counts.where)
        if source.n_rows != shape[0] or (columns is None and source.n_cols != shape[1]):
            raise ScaeInputError(
                f"{counts.where}: has shape {source.shape} but X has shape {tuple(shape)}; "
                "expected raw counts of the same cells and genes"
            )
        checked = np.ones(source.n_cols, dtype=bool)
        if columns is not None:
            checked[:] = False
            checked[columns] = True
        try:
            if counts.encoding == "csr_matrix":
                _scan_csr(source, counts.where, counts_in=checked)
            else:
                _scan_dense(source, counts.where, counts_only=True, counts_in=checked)
        finally:
            source.close()
    except ScaeInputError:
        raise
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file ({_one_line(err)})") from None
    return source if columns is None else ColumnSubsetSource(source, columns)


def _scan_csr(source, where: str, counts_in: np.ndarray | None = None) -> tuple[dict, tuple[bool, bool]]:
    """One streamed pass over a CSR matrix on disk: structure, finite values, range, zeros, counts.

    ``counts_in``: a mask of the columns that must hold counts (a value there that is not a
    non-negative whole number is refused, naming its row and column)."""
    indptr, n_rows, n_cols = source.indptr, source.n_rows, source.n_cols
    if n_rows == 0 or n_cols < 2:
        raise ScaeInputError(f"{where}: matrix has shape ({n_rows}, {n_cols}); expected at least 1 cell and 2 genes")
    if indptr.size != n_rows + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ScaeInputError(f"{where}: damaged CSR matrix (its indptr does not describe {n_rows} rows)")
    group = source.group()
    if group["data"].shape[0] < source.nnz or group["indices"].shape[0] < source.nnz:
        raise ScaeInputError(f"{where}: damaged CSR matrix (fewer stored values than its indptr says)")
    scan = _ValueScan(n_cols)
    stored_per_column = np.zeros(n_cols, dtype=np.int64)
    for lo in range(0, source.nnz, VALIDATE_CHUNK):
        hi = min(lo + VALIDATE_CHUNK, source.nnz)
        data, indices = group["data"][lo:hi], group["indices"][lo:hi]
        if data.dtype.kind not in "biuf":
            raise ScaeInputError(f"{where}: matrix has dtype {data.dtype}; expected numbers (float or int)")
        if indices.dtype.kind not in "iu" or (indices.size and (indices.min() < 0 or indices.max() >= n_cols)):
            raise ScaeInputError(f"{where}: damaged CSR matrix (a column index outside 0…{n_cols - 1})")
        problem = _value_problem(data)
        if problem is not None:
            bad, what = problem
            pos = lo + int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(indptr, pos, side="right") - 1)
            raise ScaeInputError(f"{where}: {what(row, int(indices[pos - lo]), data[pos - lo])}")
        if counts_in is not None:
            bad = not_counts(data)
            if bad is not None and np.any(bad & counts_in[indices]):
                pos = lo + int(np.flatnonzero(bad & counts_in[indices])[0])
                row = int(np.searchsorted(indptr, pos, side="right") - 1)
                raise _count_problem(where, row, int(indices[pos - lo]), data[pos - lo])
        scan.add(data)
        as_trained = data.astype(np.float32, copy=False)  # as training sees them (float64 denormals are 0)
        scan.add_columns(as_trained, as_trained, indices)
        stored_per_column += np.bincount(indices, minlength=n_cols)
    scan.add_zeros(n_rows * n_cols - source.nnz, stored_per_column < n_rows)
    return scan.result(n_rows, where)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (for error messages)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_readable(path: Path, what: str) -> None:
    """Refuse a missing path, a directory, and anything else that is not a regular file: reading a
    named pipe without a writer (or a device) would block or never end."""
    if not path.exists():
        raise ScaeInputError(f"{path}: {what} not found")
    article = "an" if what[:1].lower() in "aeiou" else "a"
    if path.is_dir():
        raise ScaeInputError(f"{path}: is a directory; expected {article} {what}")
    kind = irregular_kind(path)
    if kind is not None:
        raise ScaeInputError(f"{path}: is {kind}; expected {article} {what} stored as a regular file (write it to one first)")


def min_cells_for_test(test_fraction: float) -> int:
    """Fewest cells a label needs for a stratified split to give it a test cell: the smallest
    ``n`` with ``n × test_fraction ≥ 1`` (5 at a 20% test share), and at least 2."""
    _check_test_fraction(test_fraction)
    return max(2, math.ceil(1.0 / test_fraction - 1e-9))


def train_only_labels(labels: np.ndarray, test_fraction: float = 0.2) -> dict[str, int]:
    """Labels too rare for a share of the test cells, with their cell counts.

    A label with fewer than :func:`min_cells_for_test` cells cannot get a test cell of its
    own; :func:`stratified_split` puts all of its cells among the training cells, so the
    models still learn them and the study runs (rare cell types are common in real atlases).
    """
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    least = min_cells_for_test(test_fraction)
    return {str(c): int(n) for c, n in zip(classes, counts) if n < least}


def _check_test_fraction(test_fraction: float) -> None:
    try:
        rules.FRACTION(test_fraction)
    except rules.InvalidValue:
        raise ScaeInputError(f"test_fraction={test_fraction!r}; expected a number between 0 and 1 (exclusive)") from None


def stratified_split(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split that keeps each label's proportion in both parts.

    Labels too rare for a test cell (:func:`train_only_labels`) go to the training cells
    only; the others are split with ``ceil(test_fraction × their cells)`` test cells, every
    one of them getting at least one.

    Returns
    -------
    train_idx, test_idx
        Sorted cell indices.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = labels.shape[0]
    rare = train_only_labels(labels, test_fraction)
    least = min_cells_for_test(test_fraction)
    split_rows = np.flatnonzero(~np.isin(labels, list(rare))) if rare else np.arange(n)
    classes = np.unique(labels[split_rows])
    n_test = math.ceil(test_fraction * split_rows.size)
    share = f"{1 - test_fraction:.0%}/{test_fraction:.0%} train/test split"
    if classes.size == 0:
        raise ScaeInputError(
            f"too few cells for a {share}: {n} cells, {len(rare)} labels, the largest with "
            f"{max(rare.values())} cell(s); expected at least one label with {least} or more cells "
            "(labels with fewer go to the training cells only)"
        )
    if split_rows.size - n_test < classes.size:
        raise ScaeInputError(
            f"too few cells for a {share}: {n_test} test cells leave {split_rows.size - n_test} training "
            f"cells for {classes.size} labels; expected a smaller test fraction or more cells"
        )
    train_idx, test_idx = train_test_split(
        split_rows, test_size=n_test, stratify=labels[split_rows], random_state=seed
    )
    train_idx = np.concatenate([train_idx, np.flatnonzero(np.isin(labels, list(rare)))]) if rare else train_idx
    return np.sort(train_idx), np.sort(test_idx)
