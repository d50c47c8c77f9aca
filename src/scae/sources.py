"""Row sources: where training, evaluation and prediction read cells from.

A :class:`RowSource` is a cells × genes matrix that hands out rows. Its implementations share
one small protocol, so the trainer never asks which one it has:

- :class:`ArraySource` — a dense array or SciPy CSR matrix in memory;
- :class:`H5CSRSource` — a CSR matrix inside an ``.h5ad`` file (``X`` or a layer), read by
  contiguous row ranges with h5py, never loaded whole; :class:`H5DenseSource` likewise for a
  dense one;
- :class:`NpySource` — a dense ``.npy`` file, memory-mapped;
- :class:`DeviceSource` — a copy of another source's rows in a GPU's memory, dense
  (:func:`on_device` makes the trainer's sources so when they fit).

``source.subset(rows)`` restricts any of them to some cells (the train/test split, the scored
sample). When ``counts=True`` the rows are raw counts and every read returns
``log1p(counts / library size × 10⁴)``, computed per batch, so a raw-count atlas never needs a
normalised copy; ``source.raw()`` is the same rows with that normalisation off (the counts
themselves, for count models). :class:`ColumnSubsetSource` keeps some genes of a source (highly
variable genes): it reads whole rows, so that normalised reads still divide by each cell's
library over all genes.

:class:`BatchLoader` turns a source into minibatches: seeded shuffles (by blocks of rows inside
a prefetched window for sources on disk, so reads stay contiguous), this process's shard of
every global batch under ``torch.distributed``, and a background thread that reads the next
windows of rows from disk while the current one trains (batches are then densified, pinned and
copied to a GPU without blocking, and normalised on the device). On a GPU with room for them,
the trainer's sources are first copied into its memory, and batches are gathered there.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from typing import NamedTuple
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from scae.errors import ScaeInputError

TARGET_SUM = 1e4
"""Library size that raw counts are scaled to before ``log1p`` (counts per 10,000)."""
EVAL_BATCH_SIZE = 4096
"""Most rows per batch of an evaluation or prediction pass (see :func:`eval_batch_rows`)."""
EVAL_BATCH_ENTRIES = 1 << 20
"""Matrix entries per batch of an evaluation or prediction pass (4 MiB per float32 array)."""


def eval_batch_rows(n_cols: int) -> int:
    """Rows per batch of a pass over a ``n_cols``-column source: :data:`EVAL_BATCH_ENTRIES`
    entries, between 256 and :data:`EVAL_BATCH_SIZE` rows (1,048 rows of 1,000 genes, 256 from
    4,096 genes up). The pass's temporaries (activations, projections, error scratch copies)
    then stay near 50 MiB instead of growing with the gene count (4,096 rows of 20,000 genes:
    330 MiB per array)."""
    return max(256, min(EVAL_BATCH_SIZE, EVAL_BATCH_ENTRIES // max(1, n_cols)))
DISK_BLOCK_ROWS = 512
"""Rows per block when shuffling a source on disk: blocks are read contiguously."""
DISK_WINDOW_BLOCKS = 64
"""Most blocks gathered (and shuffled row by row) in one prefetch window of a source on disk."""
WINDOW_BYTES = 64 * 1024**2
"""Fewer blocks go in a window when its rows, as stored, would take more memory than this."""
DEVICE_FRACTION = 0.5
"""Training data is copied to a GPU when, dense in float32, it takes at most this fraction of the
GPU's free memory (see :func:`on_device`)."""
DEVICE_COPY_ROWS = 8192
"""Most rows read, densified and copied at a time when a source is copied to a GPU (fewer when
they would take more than :data:`WINDOW_BYTES` dense)."""

Chunk = np.ndarray | sp.csr_matrix


def normalize_counts(X: Chunk, library: np.ndarray | None = None) -> Chunk:
    """``log1p(X / library × 10⁴)`` for a dense or CSR block of raw counts (cells with library 0 stay 0).

    Parameters
    ----------
    X
        Cells × genes raw counts.
    library
        Each cell's total count; by default the row sums of ``X``. Give it when ``X`` holds only
        some of the genes, so that cells are still scaled by their counts over all genes
        (scanpy's order: ``normalize_total``, ``log1p``, then the gene selection).
    """
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        sums = np.asarray(X.sum(axis=1) if library is None else library, dtype=np.float64).ravel()
        scale = np.where(sums > 0, TARGET_SUM / np.maximum(sums, 1e-30), 0.0)
        X.data = np.log1p(X.data * np.repeat(scale, np.diff(X.indptr))).astype(np.float32)
        return X
    X = np.asarray(X, dtype=np.float32)
    if library is None:
        sums = X.sum(axis=1, keepdims=True, dtype=np.float64)
    else:
        sums = np.asarray(library, dtype=np.float64).reshape(-1, 1)
    scale = np.where(sums > 0, TARGET_SUM / np.maximum(sums, 1e-30), 0.0)
    return np.log1p(X * scale).astype(np.float32)


def library_sizes(X: Chunk) -> np.ndarray:
    """Each row's total (float64) of a dense or CSR block: the cells' library sizes for raw counts."""
    if sp.issparse(X):
        return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    return np.asarray(X).sum(axis=1, dtype=np.float64)


def normalize_counts_tensor(x: torch.Tensor) -> torch.Tensor:
    """Torch version of :func:`normalize_counts` for a dense batch (runs on the batch's device)."""
    sums = x.sum(dim=1, keepdim=True)
    scale = torch.where(sums > 0, TARGET_SUM / sums.clamp(min=1e-30), torch.zeros_like(sums))
    return torch.log1p(x * scale)


def _dense_tensor(chunk: Chunk | torch.Tensor, copy_read_only: bool = True) -> torch.Tensor:
    """``chunk`` as a dense float32 tensor. Read-only memory (a memory-mapped ``.npy``) is
    copied, since the tensor may be written to; with ``copy_read_only=False`` (a caller that
    only reads it, such as a copy to a GPU) it is shared, and PyTorch's warning about it silenced."""
    if isinstance(chunk, torch.Tensor):
        return chunk
    if sp.issparse(chunk):
        chunk.sum_duplicates()  # a file may repeat an entry; scipy's meaning is their sum
        out = np.zeros(chunk.shape, dtype=np.float32)
        rows = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
        out[rows, chunk.indices] = chunk.data
        return torch.from_numpy(out)
    array = np.ascontiguousarray(chunk, dtype=np.float32)
    if array.flags.writeable:
        return torch.from_numpy(array)
    if copy_read_only:
        return torch.from_numpy(array.copy())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class Storage(NamedTuple):
    """Where a source's rows are stored (:meth:`RowSource.storage`)."""

    on_disk: bool
    """Read from a file: the training shuffle keeps reads to blocks of contiguous rows."""
    window_rows: int
    """Rows read at once when shuffling from disk (:meth:`RowSource.window_rows`)."""


class RowSource:
    """Cells × genes rows, read by sorted row indices.

    Subclasses implement :meth:`_read` (raw rows for sorted indices, as a dense array, a dense
    tensor or a CSR matrix); everything else is shared.

    Attributes
    ----------
    n_rows, n_cols
        Shape.
    counts
        Whether rows are raw counts, normalised by :func:`normalize_counts` on every read.
    on_disk
        Whether reads go to a file; then shuffles keep reads contiguous and a background
        thread prefetches.
    device
        Where the rows are held: the host's memory or files, or a GPU (:class:`DeviceSource`).
    """

    n_rows: int
    n_cols: int
    counts: bool = False
    on_disk: bool = False
    device: torch.device = torch.device("cpu")

    def _read(self, rows: np.ndarray) -> Chunk | torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def read(self, rows: np.ndarray | slice) -> Chunk | torch.Tensor:
        """Raw rows (strictly increasing indices, or a slice), not normalised."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.n_rows))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size > 1 and np.any(rows[1:] <= rows[:-1]):  # the readers' shortcuts rely on it
            raise ValueError("rows must be sorted and distinct (strictly increasing row indices)")
        return self._read(rows)

    def tensor(self, rows: np.ndarray | slice) -> torch.Tensor:
        """Rows as a dense float32 tensor, normalised when the source holds counts."""
        x = _dense_tensor(self.read(rows))
        return normalize_counts_tensor(x) if self.counts else x

    def matrix(self, rows: np.ndarray | slice | None = None) -> Chunk:
        """Rows as a NumPy array or CSR matrix (as stored), normalised when the source holds counts."""
        chunk = self.read(slice(None) if rows is None else rows)
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.cpu().numpy()
        return normalize_counts(chunk) if self.counts else chunk

    def batches(self, batch_size: int | None = None, rows: np.ndarray | None = None) -> Iterator[torch.Tensor]:
        """All rows (or the sorted ``rows``) in order, ``batch_size`` (default
        :func:`eval_batch_rows`) at a time, as tensors."""
        batch_size = eval_batch_rows(self.n_cols) if batch_size is None else batch_size
        rows = np.arange(self.n_rows) if rows is None else rows
        for start in range(0, rows.size, batch_size):
            yield self.tensor(rows[start : start + batch_size])

    def subset(self, rows: np.ndarray) -> RowSource:
        """The source restricted to ``rows`` (sorted, distinct row indices)."""
        return SubsetSource(self, rows)

    def raw(self) -> RowSource:
        """The same rows with count normalisation off: reads return the stored values (float32).

        A source whose reads are not normalised returns itself. Cheap: the data is shared, not
        copied (a file source gets its own file handle, opened on first use).
        """
        if not self.counts:
            return self
        clone = copy.copy(self)  # through __getstate__/__setstate__ where a subclass has them
        clone.counts = False
        return clone

    def bytes_per_row(self) -> float:
        """Memory of one row as read (dense float32 unless a subclass stores it sparse)."""
        return 4.0 * self.n_cols

    def window_rows(self) -> int:
        """Rows read at once when shuffling from disk: whole blocks, at most
        :data:`DISK_WINDOW_BLOCKS` of them and about :data:`WINDOW_BYTES` of memory."""
        blocks = int(WINDOW_BYTES // max(self.bytes_per_row() * DISK_BLOCK_ROWS, 1.0))
        return DISK_BLOCK_ROWS * min(DISK_WINDOW_BLOCKS, max(1, blocks))

    def storage(self) -> Storage:
        """How the rows are stored, which the training shuffle follows (a copy in a GPU's
        memory answers for its source)."""
        return Storage(self.on_disk, self.window_rows())


class ArraySource(RowSource):
    """A dense array or CSR matrix held in memory.

    Parameters
    ----------
    X
        Cells × genes, dense ``ndarray`` or SciPy sparse matrix (used as given, not copied,
        when it is already float32 and C-ordered / CSR).
    counts
        Whether ``X`` holds raw counts to normalise per batch.
    """

    def __init__(self, X, counts: bool = False) -> None:
        if sp.issparse(X):
            self._X: object = sp.csr_matrix(X, dtype=np.float32)
        else:
            X = np.asarray(X, dtype=np.float32)
            if not X.flags.writeable or not X.flags.c_contiguous:
                X = np.array(X, dtype=np.float32, order="C")  # torch wants writeable memory
            self._X = torch.from_numpy(X)
        self.n_rows, self.n_cols = int(X.shape[0]), int(X.shape[1])
        self.counts = counts

    def _read(self, rows: np.ndarray):
        if isinstance(self._X, torch.Tensor):
            if rows.size and rows[-1] - rows[0] + 1 == rows.size:  # a contiguous range: a view
                return self._X[int(rows[0]) : int(rows[-1]) + 1]
            return self._X.index_select(0, torch.from_numpy(rows))  # 5x faster than X[rows]
        return self._X[rows]


class DeviceSource(RowSource):
    """Another source's rows held in a GPU's memory as one dense float32 tensor.

    The rows are read from ``source`` at most :data:`DEVICE_COPY_ROWS` and
    :data:`WINDOW_BYTES` (dense) at a time, so host memory stays at one such chunk, as stored:
    raw counts stay raw, and are normalised per batch on the device as before (``counts`` is
    the source's). Reads gather rows on the device and return device tensors, so a minibatch
    costs no host-to-device copy but that of its row indices.

    Parameters
    ----------
    source
        The rows to copy (in memory or on disk).
    device
        A CUDA device with room for ``4 × n_rows × n_cols`` bytes.
    """

    def __init__(self, source: RowSource, device: torch.device | str) -> None:
        self.n_rows, self.n_cols, self.counts = source.n_rows, source.n_cols, source.counts
        self.device = torch.device(device)
        self._storage = source.storage()
        self._X = torch.empty((self.n_rows, self.n_cols), dtype=torch.float32, device=self.device)
        step = max(1, min(DEVICE_COPY_ROWS, WINDOW_BYTES // (4 * max(self.n_cols, 1))))
        for start in range(0, self.n_rows, step):
            stop = min(start + step, self.n_rows)
            self._X[start:stop].copy_(_dense_tensor(source.read(slice(start, stop)), copy_read_only=False))

    def storage(self) -> Storage:
        return self._storage

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        if rows.size and rows[-1] - rows[0] + 1 == rows.size:  # a contiguous range: a view
            return self._X[int(rows[0]) : int(rows[-1]) + 1]
        return self.take(rows)

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """Rows in the given order (not necessarily sorted), raw, gathered on the device."""
        return self._X.index_select(0, torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device, non_blocking=True))


def on_device(sources: list[RowSource | None], device: torch.device) -> list[RowSource | None]:
    """``sources`` copied into a CUDA device's memory (:class:`DeviceSource`) when, dense in
    float32, they take at most :data:`DEVICE_FRACTION` of its free memory together; else (and
    on any other device) as given. ``None`` entries, and sources already held on ``device``
    (copied by an earlier call), stay as they are.

    Training on a GPU from its own memory takes the host out of every step (no densifying,
    pinning or copying of batches): several times faster for networks this small, whose steps
    take well under a millisecond there.
    """
    device = torch.device(device)
    present = [s for s in sources if s is not None and not _copied_to(s, device)]
    if device.type != "cuda" or not present:
        return list(sources)
    needed = sum(4 * s.n_rows * s.n_cols for s in present)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # PyTorch's cache is free to us
    if needed > DEVICE_FRACTION * free:
        return list(sources)
    return [s if s is None or _copied_to(s, device) else DeviceSource(s, device) for s in sources]


def _copied_to(source: RowSource, device: torch.device) -> bool:
    """Whether ``source`` is already held in ``device``'s memory (then :func:`on_device` keeps it);
    ``cuda`` names the current GPU."""
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if torch.cuda.is_available() else 0

    held = source.device
    return held.type == device.type and (held.type != "cuda" or index(held) == index(device))


class SubsetSource(RowSource):
    """Some rows of another source (see :meth:`RowSource.subset`)."""

    def __init__(self, parent: RowSource, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size > 1 and np.any(np.diff(rows) <= 0):
            raise ValueError("subset rows must be sorted and distinct")
        if rows.size and (rows[0] < 0 or rows[-1] >= parent.n_rows):
            raise ValueError(f"subset rows must lie in 0…{parent.n_rows - 1}")
        self._parent, self._rows = parent, rows
        self.n_rows, self.n_cols = int(rows.size), parent.n_cols
        self.counts, self.on_disk, self.device = parent.counts, parent.on_disk, parent.device

    def _read(self, rows: np.ndarray):
        return self._parent._read(self._rows[rows])

    @property
    def parent(self) -> RowSource:
        """The source these rows are taken from."""
        return self._parent

    def subset(self, rows: np.ndarray) -> RowSource:
        return SubsetSource(self._parent, self._rows[np.asarray(rows, dtype=np.int64)])

    def raw(self) -> RowSource:
        parent = self._parent.raw()
        return self if parent is self._parent else SubsetSource(parent, self._rows)

    def bytes_per_row(self) -> float:
        return self._parent.bytes_per_row()


class ColumnSubsetSource(RowSource):
    """Some genes (columns) of another source, cut from whole rows as they are read.

    When the parent holds raw counts (``parent.counts``), every read returns
    ``log1p(counts / library × 10⁴)`` of the selected genes with each cell's library over *all*
    the parent's genes (scanpy's order: ``normalize_total``, ``log1p``, then the highly variable
    genes). Those reads are already the model input, so this source has ``counts=False``, and
    :meth:`raw` gives the selected genes' raw counts. Reads stay sparse for a sparse parent;
    at most one batch of whole rows is held at a time.

    Parameters
    ----------
    parent
        The source with every gene.
    columns
        Distinct column indices of ``parent``, in the order they are to appear.
    """

    def __init__(self, parent: RowSource, columns: np.ndarray) -> None:
        columns = np.asarray(columns)
        if columns.ndim != 1 or columns.size == 0 or columns.dtype.kind not in "iu":
            raise ValueError("columns must be a non-empty 1-D array of column indices")
        columns = columns.astype(np.int64)
        if columns.min() < 0 or columns.max() >= parent.n_cols:
            raise ValueError(f"columns must lie in 0…{parent.n_cols - 1}")
        if np.unique(columns).size != columns.size:
            raise ValueError("columns must be distinct")
        self._parent, self.columns = parent, columns
        self.n_rows, self.n_cols = parent.n_rows, int(columns.size)
        self.on_disk, self.device = parent.on_disk, parent.device
        self.library_normalized = bool(parent.counts)
        """Whether reads are normalised by each cell's library over all the parent's genes."""
        self.counts = False

    @property
    def parent(self) -> RowSource:
        """The source with every gene."""
        return self._parent

    def _read(self, rows: np.ndarray) -> Chunk:
        chunk = self._parent._read(rows)  # whole rows, as stored
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.cpu().numpy()
        if sp.issparse(chunk):
            chunk = sp.csr_matrix(chunk, dtype=np.float32)
            chunk.sum_duplicates()  # a file may repeat an entry; scipy's meaning is their sum
        selected = chunk[:, self.columns]
        if self.library_normalized:
            return normalize_counts(selected, library_sizes(chunk))
        return selected if sp.issparse(selected) else np.asarray(selected, dtype=np.float32)

    def raw(self) -> RowSource:
        parent = self._parent.raw()
        return self if parent is self._parent else ColumnSubsetSource(parent, self.columns)

    def bytes_per_row(self) -> float:
        return self._parent.bytes_per_row()


def stored_source(source: RowSource) -> RowSource:
    """The source that holds the data (a file or an array) under any row or column subsets."""
    while isinstance(source, (SubsetSource, ColumnSubsetSource)):
        source = source.parent
    return source


def _runs(rows: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Split sorted ``rows`` into (start, stop) index ranges whose row gaps are at most ``max_gap``."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
    edges = np.concatenate([[0], breaks, [rows.size]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class FileShrankError(ScaeInputError):
    """A file being read became shorter: another program cut it short or rewrote it in place."""


class _SizeWatch:
    """The size a file had when a source opened it, compared before every read.

    A file cut short while it is read reads as zeros past its new end through HDF5 (a study then
    finished on zeros) and kills the process through a memory map (SIGBUS, no message); checked
    before each read, it is :class:`FileShrankError` instead (replacing the file by another, as
    ``mv`` does, is harmless: the open one is still read). Handed to another process, it keeps
    the size first seen.
    """

    def __init__(self, path: Path) -> None:
        self.path, self._fd = path, None
        self.size = os.fstat(self._descriptor()).st_size

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def check(self) -> None:
        """Raise :class:`FileShrankError` if the file is now shorter than when first opened."""
        now = os.fstat(self._descriptor()).st_size
        if now < self.size:
            raise FileShrankError(f"{self.path}: the file became shorter while scae was reading it ({now:,} bytes, "
                                  f"{self.size:,} when opened): another program changed it; run again on a complete file")

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class _H5Matrix(RowSource):
    """A matrix at ``key`` of an HDF5 (``.h5ad``) file, read by contiguous row ranges
    (:meth:`read_range`; rows close together are read as one range).

    The file is opened lazily in each process (so a source can be handed to another process)
    and read only, never modified.
    """

    on_disk = True
    MAX_GAP = 256
    """Rows this close together are read as one range (reading a few unused rows is cheaper
    than another HDF5 call)."""

    def __init__(self, path: str | Path, key: str, counts: bool) -> None:
        self.path, self.key, self.counts = Path(path), key, counts
        self._handle = None
        self._lock = threading.Lock()
        self._size = _SizeWatch(self.path)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    CHUNK_CACHE_BYTES = 32 * 1024**2
    """HDF5's cache of decompressed chunks for this file (its default, 1 MiB, holds less than the
    chunks one block of rows touches in a compressed dense matrix: 1.4× faster reads measured)."""

    def group(self):
        """The open HDF5 group (CSR) or dataset (dense) of the matrix (opened on first use, in this
        process); the file checked not to have become shorter (:class:`_SizeWatch`)."""
        self._size.check()
        if self._handle is None:
            import h5py

            self._handle = h5py.File(self.path, "r", rdcc_nbytes=self.CHUNK_CACHE_BYTES, rdcc_nslots=100_003)
        return self._handle[self.key]

    def close(self) -> None:
        """Close the file handle (it reopens on the next read)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read_range(self, start: int, stop: int) -> Chunk:
        raise NotImplementedError

    def _read(self, rows: np.ndarray) -> Chunk:
        if rows.size == 0:
            return self.read_range(0, 0)
        parts = []
        for a, b in _runs(rows, self.MAX_GAP):
            first, last = int(rows[a]), int(rows[b - 1])
            block = self.read_range(first, last + 1)
            wanted = rows[a:b] - first
            parts.append(block if wanted.size == last - first + 1 else block[wanted])
        if len(parts) == 1:
            return parts[0]
        return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)


class H5CSRSource(_H5Matrix):
    """A CSR matrix in an HDF5 (``.h5ad``) group, read by contiguous row ranges.

    Only ``indptr`` (one integer per cell) is held in memory; ``data`` and ``indices`` are read
    for the ranges asked for.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    key
        Path of the CSR group inside the file, ``"X"`` or ``"layers/<name>"``.
    counts
        Whether the matrix holds raw counts to normalise per batch.
    """

    def __init__(self, path: str | Path, key: str = "X", counts: bool = False) -> None:
        import h5py

        super().__init__(path, key, counts)
        with h5py.File(self.path, "r") as handle:
            group = handle[key]
            self.n_rows, self.n_cols = (int(v) for v in group.attrs["shape"])
            self.indptr = group["indptr"][:].astype(np.int64)
            self.nnz = int(self.indptr[-1])
            self.stored_dtype = group["data"].dtype

    def bytes_per_row(self) -> float:
        """Stored bytes of an average row (a value and a column index per nonzero)."""
        return 8.0 * max(self.nnz / max(self.n_rows, 1), 1.0)

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start … stop - 1`` as a float32 CSR matrix."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        with self._lock:
            group = self.group()
            data = group["data"][lo:hi]
            indices = group["indices"][lo:hi]
        return sp.csr_matrix(
            (data.astype(np.float32, copy=False), indices, self.indptr[start : stop + 1] - lo),
            shape=(stop - start, self.n_cols),
        )


class H5DenseSource(_H5Matrix):
    """A dense 2-D matrix in an HDF5 (``.h5ad``) dataset, read by contiguous row ranges.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    key
        Path of the dataset inside the file, ``"X"`` or ``"layers/<name>"``.
    counts
        Whether the matrix holds raw counts to normalise per batch.
    """

    MAX_GAP = 16

    def __init__(self, path: str | Path, key: str = "X", counts: bool = False) -> None:
        import h5py

        super().__init__(path, key, counts)
        with h5py.File(self.path, "r") as handle:
            self.n_rows, self.n_cols = (int(v) for v in handle[key].shape)
            self.stored_dtype = handle[key].dtype

    @property
    def stored(self):
        """The HDF5 dataset, in its stored dtype (row slices read as NumPy arrays)."""
        return self.group()

    def bytes_per_row(self) -> float:
        return float(self.stored_dtype.itemsize * self.n_cols)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start … stop - 1`` as a float32 array."""
        with self._lock:
            block = self.group()[start:stop]
        return np.asarray(block, dtype=np.float32)


class NpySource(RowSource):
    """A dense ``.npy`` matrix, memory-mapped (read only; pages come from disk as rows are read)."""

    on_disk = True

    def __init__(self, path: str | Path, counts: bool = False) -> None:
        self.path, self.counts = Path(path), counts
        self._size = _SizeWatch(self.path)
        self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        self.n_rows, self.n_cols = (int(v) for v in self._array.shape)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)

    @property
    def stored(self) -> np.ndarray:
        """The memory-mapped array, in its stored dtype."""
        return self._array

    def _read(self, rows: np.ndarray) -> np.ndarray:
        self._size.check()  # pages past a new end would kill the process (SIGBUS)
        if rows.size and rows[-1] - rows[0] + 1 == rows.size:
            return np.asarray(self._array[int(rows[0]) : int(rows[-1]) + 1], dtype=np.float32)
        return np.asarray(self._array[rows], dtype=np.float32)


def epoch_order(n: int, rng: np.random.Generator, block_rows: int | None = None, window_blocks: int = 1) -> np.ndarray:
    """A seeded shuffle of ``range(n)`` for one epoch.

    With ``block_rows=None`` a uniform permutation. Otherwise the rows are cut into contiguous
    blocks of ``block_rows``; the block order is shuffled, and the rows of each run of
    ``window_blocks`` consecutive (shuffled) blocks are shuffled together. A window is read
    from disk as a few contiguous ranges, and minibatches still mix rows from all over the file.
    """
    if block_rows is None or n <= block_rows * window_blocks:
        return rng.permutation(n)
    n_blocks = math.ceil(n / block_rows)
    blocks = rng.permutation(n_blocks)
    parts = []
    for w in range(0, n_blocks, window_blocks):
        members = np.concatenate(
            [np.arange(b * block_rows, min((b + 1) * block_rows, n)) for b in blocks[w : w + window_blocks]]
        )
        parts.append(rng.permutation(members))
    return np.concatenate(parts)


def shard_bounds(n: int, world_size: int) -> np.ndarray:
    """Start offsets (plus the end) of ``world_size`` near-equal contiguous shards of ``n`` items."""
    return np.array([n * r // world_size for r in range(world_size + 1)])


class BatchLoader:
    """This process's share of an epoch's shuffled minibatches of a source, prefetched.

    Parameters
    ----------
    source
        Rows to train on.
    order
        Row order of the epoch (see :func:`epoch_order`); consecutive ``batch_size`` rows form
        a global minibatch.
    batch_size
        Global minibatch size (over all processes).
    rank, world_size
        This process's place in a ``torch.distributed`` group: it gets rows
        ``shard_bounds(len(batch), world_size)[rank:rank + 2]`` of every global batch.
    device
        Where batches are used; with CUDA they are pinned and copied without blocking.
    prefetch
        Windows read ahead by a background thread (0: read them in the caller); by default 2
        for a source on disk and 0 for one in memory.
    window_rows
        Rows of ``order`` read from the source at once (rounded up to whole batches); by
        default ``source.window_rows()`` on disk, one batch in memory.

    Iterating yields ``(x, n_global)``: this process's rows of a batch as a tensor on
    ``device`` and the size of the global batch.
    """

    def __init__(
        self,
        source: RowSource,
        order: np.ndarray,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch: int | None = None,
        window_rows: int | None = None,
    ) -> None:
        self.source, self.order, self.batch_size = source, np.asarray(order), int(batch_size)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch = (2 if source.on_disk else 0) if prefetch is None else prefetch
        if window_rows is None:
            window_rows = source.window_rows() if source.on_disk else self.batch_size
        self.window = max(1, math.ceil(window_rows / self.batch_size)) * self.batch_size

    def __len__(self) -> int:
        return math.ceil(self.order.size / self.batch_size)

    def _window_shards(self) -> Iterator[list[tuple[np.ndarray, int]]]:
        """Per window of the order: this process's rows of each global batch in it, and that
        batch's global size."""
        for w0 in range(0, self.order.size, self.window):
            window = self.order[w0 : w0 + self.window]
            shards = []
            for b0 in range(0, window.size, self.batch_size):
                batch = window[b0 : b0 + self.batch_size]
                bounds = shard_bounds(batch.size, self.world_size)
                shards.append((batch[bounds[self.rank] : bounds[self.rank + 1]], batch.size))
            yield shards

    def _windows(self) -> Iterator[tuple[object, np.ndarray, list[tuple[np.ndarray, int]]]]:
        """Per window of the order: the rows read (``chunk``, for the sorted ``wanted`` rows)
        and this process's rows of each global batch in it."""
        for shards in self._window_shards():
            wanted = np.unique(np.concatenate([s for s, _ in shards]))
            yield self.source.read(wanted), wanted, shards

    def _gathered_batches(self) -> Iterator[tuple[torch.Tensor, int]]:
        """The batches of a source in a GPU's memory, each gathered there directly: the rows, in
        the order, that reading windows would give (a window of one batch comes sorted, as
        read), without holding a window's copy."""
        for shards in self._window_shards():
            for rows, n_global in shards:
                x = self.source.take(np.sort(rows) if len(shards) == 1 else rows)
                yield (normalize_counts_tensor(x) if self.source.counts else x), n_global

    def _batches(self, windows) -> Iterator[tuple[torch.Tensor, int]]:
        pin = self.device.type == "cuda"
        for chunk, wanted, shards in windows:
            for rows, n_global in shards:
                if len(shards) == 1:  # a window of one batch: its rows as read, in file order
                    x = _dense_tensor(chunk)
                elif isinstance(chunk, torch.Tensor):
                    where = torch.from_numpy(np.searchsorted(wanted, rows))
                    x = chunk.index_select(0, where.to(chunk.device, non_blocking=True))
                else:
                    x = _dense_tensor(chunk[np.searchsorted(wanted, rows)])
                if pin and x.device.type == "cpu":  # rows already on the GPU (a DeviceSource) are not copied
                    x = x.pin_memory()
                x = x.to(self.device, non_blocking=True)
                yield (normalize_counts_tensor(x) if self.source.counts else x), n_global

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        if isinstance(self.source, DeviceSource):
            yield from self._gathered_batches()
            return
        windows = self._windows() if self.prefetch <= 0 else self._prefetched_windows()
        yield from self._batches(windows)

    def _prefetched_windows(self) -> Iterator:
        """The windows, read ahead by a background thread (reading is the part that waits on
        the disk; batches are cut from a window in the caller, where the Python interpreter lock
        is not contended)."""
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                for item in self._windows():
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(done)
            except BaseException as err:  # handed to the consumer, raised there
                ready.put(err)

        thread = threading.Thread(target=work, name="scae-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
