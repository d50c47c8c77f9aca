"""Property-based fuzzing of the readers: random and corrupted input gives a valid dataset or
one ``ScaeInputError``, never another exception, a warning or a crash."""

from __future__ import annotations

import io
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scae import Dataset, ScaeInputError, make_dataset, read_counts_labels, read_h5ad
from scae.data import MAX_ABS_VALUE, read_labels_txt

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
N_CELLS, N_GENES = 12, 5
DTYPES = ["float16", "float32", "float64", "int32", "int64", "uint8", "bool"]


def varied_matrix(n_cells: int = N_CELLS, n_genes: int = N_GENES) -> np.ndarray:
    return np.arange(n_cells * n_genes, dtype=np.float32).reshape(n_cells, n_genes) % 7


def cell_labels(n: int = N_CELLS) -> list[str]:
    return [f"type{i % 3}" for i in range(n)]


def assert_valid(ds: Dataset, n_cells: int | None = None) -> None:
    """What every reader promises about the dataset it returns."""
    assert isinstance(ds, Dataset)
    X = ds.X.read(slice(None)) if ds.on_disk else ds.X  # streamed: every row as stored, as float32
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    assert X.dtype == np.float32 and X.ndim == 2
    assert X.shape[0] >= 1 and X.shape[1] >= 2
    assert n_cells is None or X.shape[0] == n_cells
    assert np.isfinite(X).all() and np.abs(X).max() <= MAX_ABS_VALUE
    assert not (X == X[0]).all()  # some gene varies between cells
    assert ds.labels.shape == (X.shape[0],) and ds.labels.dtype.kind == "U"
    assert np.unique(ds.labels).size >= 2
    assert ds.obs_names.shape == (X.shape[0],) and ds.var_names.shape == (X.shape[1],)


@contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning becomes an exception other than ScaeInputError
        yield


def valid_or_refused(read, n_cells: int | None = None) -> str | None:
    """Call ``read``: a valid dataset (``None`` returned), or the one-line refusal message."""
    with no_warnings():
        try:
            ds = read()
        except ScaeInputError as err:
            message = str(err)
            assert message and "\n" not in message
            return message
    assert_valid(ds, n_cells)
    return None


def npy_bytes(X: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, X, allow_pickle=False)
    return buffer.getvalue()


def corrupted(data: bytes, draw) -> bytes:
    """``data`` truncated, with bytes overwritten, or with bytes inserted."""
    how = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        if how == "flip":
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@pytest.fixture(scope="module")
def files():
    """A folder with a valid labels file and valid dense and sparse ``.h5ad`` files.

    A damaged ``.h5ad`` that makes the HDF5 library loop is given 5 s, not a minute."""
    import scae.data

    probe_seconds, scae.data.H5AD_PROBE_SECONDS = scae.data.H5AD_PROBE_SECONDS, 5.0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "labels.txt").write_text("\n".join(cell_labels()) + "\n")
        obs = pd.DataFrame({"ct": pd.Categorical(cell_labels())}, index=[f"c{i}" for i in range(N_CELLS)])
        X = varied_matrix()
        ad.AnnData(X=X, obs=obs).write_h5ad(d / "dense.h5ad")
        ad.AnnData(X=sp.csr_matrix(X), obs=obs).write_h5ad(d / "sparse.h5ad")
        yield d
    scae.data.H5AD_PROBE_SECONDS = probe_seconds


# ---------------------------------------------------------------- .npy matrices
@FUZZ
@given(data=st.data())
def test_corrupted_npy_gives_a_dataset_or_one_line(files, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    raw = corrupted(npy_bytes(varied_matrix().astype(dtype)), data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "counts.npy"
        path.write_bytes(raw)
        for stream in (False, True):
            message = valid_or_refused(
                lambda stream=stream: read_counts_labels(path, files / "labels.txt", stream=stream), N_CELLS
            )
            assert message is None or message.startswith((str(path), str(files)))
        assert path.read_bytes() == raw  # never modified


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_npy_are_refused(files, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "counts.npy"
        path.write_bytes(raw)
        assert valid_or_refused(lambda: read_counts_labels(path, files / "labels.txt")) is not None


@FUZZ
@given(
    shape=st.tuples(st.integers(0, 2_000_000), st.integers(0, 2_000_000)),
    dtype=st.sampled_from([*DTYPES, "<f8", ">i4", "|O"]),
)
def test_npy_header_memory_bombs_are_refused(files, shape, dtype):
    """A header that promises a matrix far larger than the file (up to terabytes) is one line."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bomb.npy"
        path.write_bytes(buffer.getvalue() + b"\x01" * 64)
        assert valid_or_refused(lambda: read_counts_labels(path, files / "labels.txt")) is not None


# ---------------------------------------------------------------- labels files
LABEL_TEXT = st.lists(
    st.sampled_from(
        ["a", "b", "Ω", "細胞", "1", ".", "5", " ", "\t", "\n", "\r", "\r\n", "\x00", "\x1b", "\u2028", "\ufeff"]
    ),
    max_size=80,
).map("".join)


@FUZZ
@given(
    text=st.one_of(
        LABEL_TEXT,
        st.lists(st.sampled_from(["B", "T", "NK", "x" * 5000]), min_size=N_CELLS, max_size=N_CELLS).map("\n".join),
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=N_CELLS, max_size=N_CELLS).map(
            lambda values: "\n".join(map(repr, values))
        ),
    ),
    encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]),
    ending=st.sampled_from(["", "\n", "\r\n", "\n\n  \n"]),
)
def test_random_labels_files_give_a_dataset_or_one_line(files, text, encoding, ending):
    with tempfile.TemporaryDirectory() as tmp:
        counts, labels = Path(tmp) / "counts.npy", Path(tmp) / "labels.txt"
        np.save(counts, varied_matrix())
        try:
            labels.write_bytes((text + ending).encode(encoding))
        except UnicodeEncodeError:
            return
        message = valid_or_refused(lambda: read_counts_labels(counts, labels), N_CELLS)
        if message is None:
            read = read_labels_txt(labels)
            assert len(read) == N_CELLS
            assert all(label and label == label.strip() and "\x00" not in label for label in read)
        else:
            assert message.startswith(str(labels))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes_as_labels_file(files, raw):
    with tempfile.TemporaryDirectory() as tmp:
        counts, labels = Path(tmp) / "counts.npy", Path(tmp) / "labels.txt"
        np.save(counts, varied_matrix())
        labels.write_bytes(raw)
        message = valid_or_refused(lambda: read_counts_labels(counts, labels), N_CELLS)
        assert message is None or message.startswith(str(labels))


# ---------------------------------------------------------------- .h5ad files
@FUZZ
@given(data=st.data())
def test_corrupted_h5ad_gives_a_dataset_or_one_line(files, data):
    kind = data.draw(st.sampled_from(["dense", "sparse"]))
    raw = corrupted((files / f"{kind}.h5ad").read_bytes(), data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.h5ad"
        path.write_bytes(raw)
        for stream in (None, True):
            message = valid_or_refused(lambda stream=stream: read_h5ad(path, "ct", stream=stream))
            assert message is None or message.startswith(str(path))
        assert path.read_bytes() == raw


@FUZZ
@given(
    X=hnp.arrays(
        dtype=st.sampled_from(["float16", "float32", "float64", "int32", "int64", "uint8"]),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    ),
    sparse=st.booleans(),
    label_key=st.sampled_from(["ct", "score"]),
)
def test_h5ad_with_random_matrix_and_obs(X, sparse, label_key):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"ct": pd.Categorical(rng.choice(["a", "b"], X.shape[0])), "score": rng.random(X.shape[0])},
        index=[f"c{i}" for i in range(X.shape[0])],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.h5ad"
        matrix = sp.csr_matrix(X) if sparse and X.dtype != np.float16 else X
        ad.AnnData(X=matrix, obs=obs).write_h5ad(path)
        message = valid_or_refused(lambda: read_h5ad(path, label_key), X.shape[0])
        finite = np.isfinite(X.astype(np.float64)).all() and np.abs(X.astype(np.float64)).max() <= MAX_ABS_VALUE
        with np.errstate(over="ignore"):  # values that differ only beyond float32's precision are equal
            as_read = X.astype(np.float32)
        varies = not (as_read == as_read[0]).all()
        if X.shape[1] >= 2 and finite and varies and np.unique(obs[label_key]).size >= 2:
            assert message is None
        else:
            assert message is not None and message.startswith(str(path))


# ---------------------------------------------------------------- matrices in memory
@FUZZ
@given(
    X=hnp.arrays(
        dtype=st.sampled_from(DTYPES),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    ),
    sparse=st.booleans(),
    labels=st.lists(st.sampled_from(["a", "b", "c", "", "1", "2.5", None]), max_size=8),
)
def test_make_dataset_with_random_matrices(X, sparse, labels):
    if sparse and X.ndim == 2 and X.dtype != np.float16:
        X = sp.csr_matrix(X)
    message = valid_or_refused(lambda: make_dataset(X, labels, source="m"))
    if message is None:
        assert X.shape[0] == len(labels)
    if X.ndim == 2 and X.shape[0] >= 1 and X.shape[1] >= 2:
        dense = X.toarray() if sp.issparse(X) else X
        as_float = dense.astype(np.float64)
        if not (np.isfinite(as_float).all() and np.abs(as_float).max() <= MAX_ABS_VALUE):
            assert message is not None and message.startswith("m: ")
