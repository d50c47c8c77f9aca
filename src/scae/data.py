"""Input data: the :class:`Dataset` container, file readers, validation and the train/test split.

Every reader returns a validated :class:`Dataset` (float32 cells × genes matrix, dense or CSR,
plus one string label per cell) or raises :class:`~scae.errors.ScaeInputError` with a message
that names the file and the problem. Readers never modify their input files.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scae.errors import ScaeInputError

Matrix = np.ndarray | sp.csr_matrix


@dataclass(frozen=True)
class Dataset:
    """A labelled expression matrix.

    Attributes
    ----------
    X
        Cells × genes, float32, dense ``ndarray`` or ``scipy.sparse.csr_matrix``.
    labels
        One label per cell, as strings.
    name
        Short description of where the data came from (shown in the report).
    obs_names, var_names
        Cell and gene names.
    """

    X: Matrix
    labels: np.ndarray
    name: str
    obs_names: np.ndarray = field(default=None)  # type: ignore[assignment]
    var_names: np.ndarray = field(default=None)  # type: ignore[assignment]

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

    def zero_fraction(self) -> float:
        """Fraction of entries that are exactly zero."""
        nonzero = self.X.count_nonzero() if sp.issparse(self.X) else np.count_nonzero(self.X)
        return 1.0 - nonzero / (self.n_cells * self.n_genes)

    def summary(self) -> dict:
        """Plain-number description for the report and ``metrics.json``."""
        classes, counts = np.unique(self.labels, return_counts=True)
        return {
            "name": self.name,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "storage": "sparse CSR" if sp.issparse(self.X) else "dense",
            "zero_fraction": round(self.zero_fraction(), 6),
            "value_min": float(self.X.min()),
            "value_max": float(self.X.max()),
            "label_counts": {str(c): int(n) for c, n in zip(classes, counts)},
        }

    def to_anndata(self):
        """The data as an :class:`anndata.AnnData` with labels in ``obs["label"]``."""
        import anndata as ad

        obs = pd.DataFrame(
            {"label": pd.Categorical(self.labels)}, index=pd.Index(self.obs_names.astype(str))
        )
        var = pd.DataFrame(index=pd.Index(self.var_names.astype(str)))
        return ad.AnnData(X=self.X, obs=obs, var=var)


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
    """
    X = as_matrix(X, source)
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
    )


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


def read_counts_labels(counts_path: str | Path, labels_path: str | Path) -> Dataset:
    """Read the classic pair ``counts.npy`` (cells × genes) and ``labels.txt`` (one per line).

    The ``.npy`` file is read without pickle, so it can never execute code.
    """
    counts_path, labels_path = Path(counts_path), Path(labels_path)
    X = _load_npy(counts_path)
    labels = read_labels_txt(labels_path)
    if len(labels) != X.shape[0]:
        raise ScaeInputError(
            f"{labels_path}: {len(labels)} labels, but {counts_path} has {X.shape[0]} cells "
            f"(rows, shape {X.shape}); expected one label per line per cell"
        )
    return make_dataset(
        X, labels, name=f"{counts_path.name} + {labels_path.name}", source=str(counts_path)
    )


NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path: Path) -> np.ndarray:
    _check_readable(path, "counts file")
    try:
        with path.open("rb") as handle:
            head = handle.read(len(NPY_MAGIC))
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be read ({err.strerror})") from None
    if head != NPY_MAGIC:
        kind = " (it is a .npz archive)" if head.startswith(b"PK") else ""
        raise ScaeInputError(f"{path}: not a NumPy .npy file{kind}; expected a cells × genes matrix saved with numpy.save")
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


def read_h5ad(path: str | Path, label_key: str, layer: str | None = None) -> Dataset:
    """Read an AnnData ``.h5ad`` file; labels come from ``obs[label_key]``.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    label_key
        Column of ``obs`` holding the cell labels.
    layer
        Use ``layers[layer]`` instead of ``X``.
    """
    import anndata as ad

    path = Path(path)
    _check_readable(path, "AnnData file")
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
        where = f"{path} layer '{layer}'"
    else:
        X = adata.X
        where = f"{path} X"
    if X is None:
        raise ScaeInputError(f"{path}: X is empty; expected an expression matrix (or pass --layer)")
    return make_dataset(
        X,
        adata.obs[label_key],
        name=f"{path.name} (labels: obs['{label_key}']" + (f", layer '{layer}')" if layer else ")"),
        obs_names=adata.obs_names.to_numpy(),
        var_names=adata.var_names.to_numpy(),
        source=where,
    )


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
