"""Input data: the :class:`Dataset` container, file readers, validation and the train/test split.

Every reader returns a validated :class:`Dataset` (float32 cells × genes matrix, dense or CSR,
plus one string label per cell) or raises :class:`~scae.errors.ScaeInputError` with a message
that names the file and the problem. Readers never modify their input files.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scae.errors import ScaeInputError

Matrix = np.ndarray | sp.csr_matrix

STREAM_BYTES = 1024**3
"""An input whose dense float32 form is larger than this is streamed from disk (a CSR ``.h5ad``)
or memory-mapped (a ``.npy``) instead of being loaded; see :mod:`scae.sources`."""
VALIDATE_CHUNK = 8 * 1024**2
"""Values checked at a time when an input on disk is validated in one streamed pass."""
NORMALIZE_CHOICES = ("auto", "log1p", "none")


@dataclass(frozen=True)
class Dataset:
    """A labelled expression matrix.

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
    """

    X: object
    labels: np.ndarray
    name: str
    obs_names: np.ndarray = field(default=None)  # type: ignore[assignment]
    var_names: np.ndarray = field(default=None)  # type: ignore[assignment]
    counts: bool = False
    stats: dict | None = None

    def __post_init__(self) -> None:
        if self.obs_names is None:
            object.__setattr__(self, "obs_names", np.array([f"cell{i}" for i in range(self.n_cells)]))
        if self.var_names is None:
            object.__setattr__(self, "var_names", np.array([f"gene{j}" for j in range(self.n_genes)]))

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
        return not (isinstance(self.X, np.ndarray) or sp.issparse(self.X))

    def source(self):
        """``X`` as a :class:`~scae.sources.RowSource` (raw counts normalised per batch)."""
        from scae.sources import ArraySource

        return self.X if self.on_disk else ArraySource(dense_if_small(self.X), counts=self.counts)

    def fingerprint(self) -> dict:
        """What identifies this input: shape, labels and names, and a hash of the matrix (in
        memory) or, on disk, the file's path, size and modification time, the matrix's row
        pointers and the value statistics of the validation pass (computed once)."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> dict:
        import hashlib

        digest = hashlib.sha256()
        for part in (self.labels, self.obs_names, self.var_names):
            digest.update("\n".join(map(str, part)).encode())
        if self.on_disk:
            stat = Path(self.X.path).stat()
            matrix = {"file": str(Path(self.X.path).resolve()), "bytes": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns, "key": getattr(self.X, "key", None),
                      "stats": self.stats}
            indptr = getattr(self.X, "indptr", None)
            if indptr is not None:
                matrix["indptr_sha256"] = hashlib.sha256(np.ascontiguousarray(indptr).tobytes()).hexdigest()
        else:
            parts = (self.X.data, self.X.indices, self.X.indptr) if sp.issparse(self.X) else (self.X,)
            matrix_digest = hashlib.sha256()
            for array in parts:
                matrix_digest.update(np.ascontiguousarray(array).tobytes())
            matrix = {"sha256": matrix_digest.hexdigest()}
        return {"shape": [self.n_cells, self.n_genes], "counts": self.counts,
                "labels_names_sha256": digest.hexdigest(), "matrix": matrix}

    def zero_fraction(self) -> float:
        """Fraction of entries that are exactly zero."""
        if self.stats is not None:
            return self.stats["zero_fraction"]
        nonzero = self.X.count_nonzero() if sp.issparse(self.X) else np.count_nonzero(self.X)
        return 1.0 - nonzero / (self.n_cells * self.n_genes)

    def summary(self) -> dict:
        """Plain-number description for the report and ``metrics.json``."""
        classes, counts = np.unique(self.labels, return_counts=True)
        if self.on_disk:
            kind = "sparse CSR" if hasattr(self.X, "indptr") else "dense, memory-mapped"
            storage = f"{kind}, streamed from {getattr(self.X, 'path', 'disk')}"
            low, high = self.stats["value_min"], self.stats["value_max"]
        else:
            storage = "sparse CSR" if sp.issparse(self.X) else "dense"
            low, high = float(self.X.min()), float(self.X.max())
        return {
            "name": self.name,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "storage": storage,
            "raw_counts": self.counts,
            "model_input": "log1p(counts / library size × 1e4), computed per batch" if self.counts else "as given",
            "zero_fraction": round(self.zero_fraction(), 6),
            "value_min": float(low),
            "value_max": float(high),
            "label_counts": {str(c): int(n) for c, n in zip(classes, counts)},
        }

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
) -> Dataset:
    """Validate a matrix and labels and wrap them in a :class:`Dataset`.

    Parameters
    ----------
    X
        Cells × genes array-like or SciPy sparse matrix with finite numeric values.
    labels
        One label per cell (any type; stored as strings).
    name
        Description shown in the report.
    obs_names, var_names
        Optional cell and gene names.
    source
        How to name the matrix in error messages (e.g. the file path).
    normalize
        ``"auto"``: a matrix of non-negative integers is taken as raw counts, which models see
        as ``log1p(counts / library size × 10⁴)``; ``"log1p"``: always so; ``"none"``: never.
    """
    X = as_matrix(X, source)
    counts = decide_counts(normalize, value_profile(X.data if sp.issparse(X) else X), source)
    return _labelled(X, labels, name, obs_names, var_names, source, counts)


def _labelled(X, labels, name, obs_names, var_names, source: str, counts: bool, stats: dict | None = None) -> Dataset:
    labels = _as_labels(labels, source)
    if labels.shape[0] != X.shape[0]:
        raise ScaeInputError(
            f"{source}: {labels.shape[0]} labels for {X.shape[0]} cells (rows); "
            "expected exactly one label per cell"
        )
    n_classes = np.unique(labels).size
    if n_classes < 2:
        raise ScaeInputError(
            f"{source}: only {n_classes} distinct label; expected at least 2 cell populations"
        )
    return Dataset(
        X=X,
        labels=labels,
        name=name,
        obs_names=None if obs_names is None else np.asarray(obs_names).astype(str),
        var_names=None if var_names is None else np.asarray(var_names).astype(str),
        counts=counts,
        stats=stats,
    )


def value_profile(values: np.ndarray) -> tuple[bool, bool]:
    """``(non_negative, integer_counts)`` of some values: all ≥ 0, and all integers with one > 0."""
    values = np.asarray(values)
    if values.size == 0:
        return True, False
    non_negative = bool(values.min() >= 0)
    if values.dtype.kind in "iu":
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


def as_matrix(X, source: str = "matrix") -> Matrix:
    """Return ``X`` (array-like, SciPy sparse or AnnData) as float32 dense or CSR after checks.

    Raises :class:`~scae.errors.ScaeInputError` for a matrix that is not 2-D, not numeric,
    empty, or holds NaN or infinite values.
    """
    if hasattr(X, "obs") and hasattr(X, "X"):  # AnnData
        X = X.X
    if sp.issparse(X):
        if X.ndim != 2:
            raise ScaeInputError(f"{source}: matrix has shape {X.shape}; expected 2-D cells × genes")
        X = sp.csr_matrix(X, dtype=np.float32)
        values = X.data
    else:
        X = np.asarray(X)
        if X.dtype.kind not in "biuf":
            raise ScaeInputError(
                f"{source}: matrix has dtype {X.dtype}; expected numbers (float or int)"
            )
        if X.ndim != 2:
            raise ScaeInputError(
                f"{source}: matrix has shape {X.shape} ({X.ndim}-D); expected 2-D cells × genes"
            )
        X = X.astype(np.float32, copy=False)
        values = X
    if X.shape[0] == 0 or X.shape[1] < 2:
        raise ScaeInputError(
            f"{source}: matrix has shape {X.shape}; expected cells × genes with at least 1 cell and 2 genes"
        )
    bad = ~np.isfinite(values)
    if bad.any():
        n_bad = int(bad.sum())
        if sp.issparse(X):
            pos = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(X.indptr, pos, side="right") - 1)
            col = int(X.indices[pos])
        else:
            row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ScaeInputError(
            f"{source}: {n_bad} NaN or infinite value(s), first at row {row}, column {col}; "
            "expected finite numbers"
        )
    return X


def _as_labels(labels, source: str) -> np.ndarray:
    series = pd.Series(np.asarray(labels).ravel() if not isinstance(labels, pd.Series) else labels)
    missing = series.isna().to_numpy()
    if missing.any():
        raise ScaeInputError(
            f"{source}: {int(missing.sum())} cell(s) without a label, first at cell "
            f"{int(np.flatnonzero(missing)[0])}; expected a label for every cell"
        )
    return series.astype(str).to_numpy(dtype=str)


def read_counts_labels(
    counts_path: str | Path, labels_path: str | Path, normalize: str = "auto", stream: bool | None = None
) -> Dataset:
    """Read the classic pair ``counts.npy`` (cells × genes) and ``labels.txt`` (one per line).

    The ``.npy`` file is read without pickle, so it can never execute code. A matrix larger
    than :data:`STREAM_BYTES` as float32 (or any, with ``stream=True``) is memory-mapped and
    validated in one streamed pass instead of being loaded. ``normalize``: see
    :func:`make_dataset`.
    """
    counts_path, labels_path = Path(counts_path), Path(labels_path)
    labels = read_labels_txt(labels_path)
    X = _load_npy(counts_path, stream)
    if len(labels) != X.shape[0]:
        raise ScaeInputError(
            f"{labels_path}: {len(labels)} labels, but {counts_path} has {X.shape[0]} cells "
            f"(rows, shape {X.shape}); expected one label per line per cell"
        )
    name = f"{counts_path.name} + {labels_path.name}"
    if isinstance(X, np.ndarray):
        return make_dataset(X, labels, name=name, source=str(counts_path), normalize=normalize)
    stats, profile = _scan_dense(X, str(counts_path))
    X.counts = decide_counts(normalize, profile, str(counts_path))
    return _labelled(X, labels, name, None, None, str(counts_path), X.counts, stats)


def _scan_dense(source, where: str) -> tuple[dict, tuple[bool, bool]]:
    """One streamed pass over a memory-mapped matrix: finite values, range, zeros, counts."""
    step = max(1, VALIDATE_CHUNK // max(source.n_cols, 1))
    scan = _ValueScan()
    stored = source.stored  # checked as stored: a float64 value beyond float32's range is not "infinite"
    for start in range(0, source.n_rows, step):
        block = np.asarray(stored[start : min(start + step, source.n_rows)])
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ScaeInputError(
                f"{where}: NaN or infinite value(s), first at row {start + row}, column {col}; expected finite numbers"
            )
        scan.add(block)
    return scan.result(source.n_rows * source.n_cols)


class _ValueScan:
    """Running range, zero count and count-likeness of the values of a streamed matrix."""

    def __init__(self) -> None:
        self.low, self.high, self.nonzero = np.inf, -np.inf, 0
        self.non_negative, self.integer = True, True

    def add(self, values: np.ndarray) -> None:
        if values.size:
            low, high = float(values.min()), float(values.max())
            self.low, self.high = min(self.low, low), max(self.high, high)
            self.nonzero += int(np.count_nonzero(values))
            self.non_negative &= low >= 0
            if values.dtype.kind == "f":
                self.integer &= bool(np.all(values == np.floor(values)))

    def add_zeros(self, count: int) -> None:
        """Entries not stored (a sparse matrix's implicit zeros)."""
        if count:
            self.low, self.high = min(self.low, 0.0), max(self.high, 0.0)

    def result(self, n_entries: int) -> tuple[dict, tuple[bool, bool]]:
        stats = {
            "zero_fraction": 1.0 - self.nonzero / n_entries,
            "value_min": self.low,
            "value_max": self.high,
        }
        return stats, (self.non_negative, self.non_negative and self.integer and self.high > 0)


NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path: Path, stream: bool | None = None):
    """The matrix of a ``.npy`` file: loaded, or an :class:`~scae.sources.NpySource` when streamed."""
    _check_readable(path, "counts file")
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
    except (ValueError, OSError, EOFError):
        mapped = None  # not mappable: loading it below names the problem
    if mapped is not None:
        if stream is None:
            stream = mapped.ndim == 2 and mapped.size * 4 > STREAM_BYTES
        if stream:
            return _npy_source(path, mapped)
    try:
        X = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ScaeInputError(
                f"{path}: holds Python objects (needs pickle, which scae never loads); "
                "expected a numeric .npy matrix"
            ) from None
        raise ScaeInputError(f"{path}: not a readable NumPy .npy file ({err})") from None
    except (OSError, EOFError) as err:
        raise ScaeInputError(f"{path}: cannot be read as a NumPy .npy file ({err})") from None
    return as_matrix(X, str(path))


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


def read_labels_txt(path: str | Path) -> list[str]:
    """Read one label per line; surrounding white space is stripped, trailing blank lines ignored."""
    path = Path(path)
    _check_readable(path, "labels file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of a label
    except UnicodeDecodeError:
        raise ScaeInputError(f"{path}: not UTF-8 text; expected one label per line") from None
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be read ({err.strerror})") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for i, line in enumerate(lines):
        if not line:
            raise ScaeInputError(f"{path}: line {i + 1} is empty; expected one label per line")
    return lines


def read_h5ad(
    path: str | Path,
    label_key: str,
    layer: str | None = None,
    normalize: str = "auto",
    stream: bool | None = None,
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
        Leave the matrix on disk and stream it (:class:`~scae.sources.H5CSRSource`); it must be
        stored as CSR. ``None``: stream a CSR matrix larger than :data:`STREAM_BYTES` as dense
        float32, load anything else.
    """
    path = Path(path)
    _check_readable(path, "AnnData file")
    key = "X" if layer is None else f"layers/{layer}"
    where = f"{path} X" if layer is None else f"{path} layer '{layer}'"
    encoding, shape = _h5ad_matrix_kind(path, key)
    if encoding == "missing" and layer is not None:
        raise ScaeInputError(f"{path}: no layer '{layer}'; available layers: {_h5ad_layers(path) or 'none'}")
    if stream is None:
        stream = encoding == "csr_matrix" and len(shape) == 2 and shape[0] * shape[1] * 4 > STREAM_BYTES
    if stream and encoding != "missing":
        if encoding != "csr_matrix":
            stored = {"csc_matrix": "as CSC (column-compressed)", "array": "dense"}.get(encoding, f"as '{encoding}'")
            raise ScaeInputError(
                f"{where}: is stored {stored}; streaming from disk needs a CSR (row-compressed) sparse "
                "matrix (write it with adata.X = scipy.sparse.csr_matrix(adata.X)), or load it without streaming"
            )
        return _read_h5ad_streamed(path, key, label_key, layer, normalize, where)
    return _read_h5ad_in_memory(path, label_key, layer, normalize, where)


def _h5ad_matrix_kind(path: Path, key: str) -> tuple[str, tuple[int, ...]]:
    """Encoding (``csr_matrix``, ``csc_matrix``, ``array``, …) and shape of the matrix at ``key``.

    ``("missing", ())`` when there is none; the reader then names the problem.
    """
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file (not HDF5, or truncated: {err})") from None
    with handle:
        if key not in handle:
            return "missing", ()
        element = handle[key]
        if isinstance(element, h5py.Dataset):
            return str(element.attrs.get("encoding-type", "array")), tuple(int(v) for v in element.shape)
        return str(element.attrs.get("encoding-type", "unknown")), tuple(int(v) for v in element.attrs.get("shape", ()))


def _h5ad_layers(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as handle:
        return ", ".join(handle["layers"].keys()) if "layers" in handle else ""


def _read_h5ad_in_memory(path: Path, label_key: str, layer: str | None, normalize: str, where: str) -> Dataset:
    import anndata as ad

    try:
        with warnings.catch_warnings():  # files from old anndata versions read fine but warn per element
            warnings.simplefilter("ignore", getattr(ad, "OldFormatWarning", UserWarning))
            adata = ad.read_h5ad(path)
    except Exception as err:  # anndata raises many types for a corrupt or foreign file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file ({err})") from None
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
        raise ScaeInputError(f"{path}: X is empty; expected an expression matrix (or pass --layer)")
    return make_dataset(
        X,
        adata.obs[label_key],
        name=_h5ad_name(path, label_key, layer),
        obs_names=adata.obs_names.to_numpy(),
        var_names=adata.var_names.to_numpy(),
        source=where,
        normalize=normalize,
    )


def _h5ad_name(path: Path, label_key: str, layer: str | None) -> str:
    return f"{path.name} (labels: obs['{label_key}']" + (f", layer '{layer}')" if layer else ")")


def _read_h5ad_streamed(path: Path, key: str, label_key: str, layer: str | None, normalize: str, where: str) -> Dataset:
    """obs and var are read; the CSR matrix stays on disk and is validated in one streamed pass."""
    import h5py

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    from scae.sources import H5CSRSource

    try:
        with h5py.File(path, "r") as handle:
            obs = read_elem(handle["obs"])
            var_names = read_elem(handle["var"]).index.to_numpy() if "var" in handle else None
        if label_key not in obs.columns:
            available = ", ".join(map(str, obs.columns)) or "none"
            raise ScaeInputError(f"{path}: no obs column '{label_key}' for --label-key; available columns: {available}")
        source = H5CSRSource(path, key)
        try:
            stats, profile = _scan_csr(source, where)
        finally:
            source.close()
    except ScaeInputError:
        raise
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise ScaeInputError(f"{path}: cannot be read as an AnnData .h5ad file ({err})") from None
    source.counts = decide_counts(normalize, profile, where)
    if obs.shape[0] != source.n_rows:
        raise ScaeInputError(f"{path}: obs has {obs.shape[0]} cells but {key} has {source.n_rows} rows")
    if var_names is not None and var_names.size != source.n_cols:
        raise ScaeInputError(f"{path}: var has {var_names.size} genes but {key} has {source.n_cols} columns")
    return _labelled(
        source, obs[label_key], _h5ad_name(path, label_key, layer), obs.index.to_numpy(), var_names,
        where, source.counts, stats,
    )


def _scan_csr(source, where: str) -> tuple[dict, tuple[bool, bool]]:
    """One streamed pass over a CSR matrix on disk: structure, finite values, range, zeros, counts."""
    indptr, n_rows, n_cols = source.indptr, source.n_rows, source.n_cols
    if n_rows == 0 or n_cols < 2:
        raise ScaeInputError(f"{where}: matrix has shape ({n_rows}, {n_cols}); expected at least 1 cell and 2 genes")
    if indptr.size != n_rows + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ScaeInputError(f"{where}: damaged CSR matrix (its indptr does not describe {n_rows} rows)")
    group = source.group()
    if group["data"].shape[0] < source.nnz or group["indices"].shape[0] < source.nnz:
        raise ScaeInputError(f"{where}: damaged CSR matrix (fewer stored values than its indptr says)")
    scan = _ValueScan()
    for lo in range(0, source.nnz, VALIDATE_CHUNK):
        hi = min(lo + VALIDATE_CHUNK, source.nnz)
        data, indices = group["data"][lo:hi], group["indices"][lo:hi]
        if data.dtype.kind not in "biuf":
            raise ScaeInputError(f"{where}: matrix has dtype {data.dtype}; expected numbers (float or int)")
        bad = ~np.isfinite(data)
        if bad.any():
            pos = lo + int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(indptr, pos, side="right") - 1)
            raise ScaeInputError(
                f"{where}: NaN or infinite value(s), first at row {row}, column {int(indices[pos - lo])}; "
                "expected finite numbers"
            )
        if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
            raise ScaeInputError(f"{where}: damaged CSR matrix (a column index outside 0…{n_cols - 1})")
        scan.add(data)
    scan.add_zeros(n_rows * n_cols - source.nnz)
    return scan.result(n_rows * n_cols)


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise ScaeInputError(f"{path}: {what} not found")
    if path.is_dir():
        raise ScaeInputError(f"{path}: is a directory; expected a {what}")


def stratified_split(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split that keeps each label's proportion in both parts.

    Returns
    -------
    train_idx, test_idx
        Sorted cell indices.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = labels.shape[0]
    classes, counts = np.unique(labels, return_counts=True)
    n_test = math.ceil(test_fraction * n)
    if counts.min() < 2 or n_test < classes.size or n - n_test < classes.size:
        smallest = classes[np.argmin(counts)]
        raise ScaeInputError(
            f"too few cells for a stratified {1 - test_fraction:.0%}/{test_fraction:.0%} "
            f"train/test split: {n} cells, {classes.size} labels, label '{smallest}' has "
            f"{counts.min()} cell(s); expected at least 2 cells per label and "
            f"{math.ceil(classes.size / test_fraction)} cells in all"
        )
    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=n_test, stratify=labels, random_state=seed
    )
    return np.sort(train_idx), np.sort(test_idx)
