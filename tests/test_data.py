"""Input data: readers, validation, error messages and the stratified split."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scae
from scae import Autoencoder, Dataset, ScaeInputError, make_dataset, read_counts_labels, read_h5ad
from conftest import scae_env
from scae.data import (
    MAX_ABS_VALUE,
    as_matrix,
    continuous_labels,
    min_cells_for_test,
    read_labels_txt,
    stratified_split,
    train_only_labels,
)


# ---------------------------------------------------------------- helpers
def blob(n_cells=12, n_genes=7, seed=0, zero_fraction=0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.gamma(1.0, 1.5, size=(n_cells, n_genes)).astype(np.float32)
    X[rng.random(X.shape) < zero_fraction] = 0.0
    return X


def labels_for(n: int, k: int = 3) -> list[str]:
    return [f"type{i % k}" for i in range(n)]


def write_pair(tmp_path: Path, X, labels, counts_name="counts.npy", labels_text=None):
    counts = tmp_path / counts_name
    np.save(counts, X, allow_pickle=False)
    lab = tmp_path / "labels.txt"
    lab.write_text(labels_text if labels_text is not None else "\n".join(labels) + "\n", encoding="utf-8")
    return counts, lab


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


def input_error(func, *args, **kwargs) -> str:
    with pytest.raises(ScaeInputError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


@pytest.fixture
def h5ad_files(tmp_path):
    """A dense-X and a sparse-X .h5ad with string/int label columns and a 'counts' layer."""
    X = blob(15, 6, seed=4)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["B", "T", "NK"] * 5),
            "cluster": np.array([0, 1] * 7 + [1], dtype=np.int64),
            "batch": ["b1"] * 15,
        },
        index=[f"bc{i}" for i in range(15)],
    )
    var = pd.DataFrame(index=[f"G{j}" for j in range(6)])
    counts = sp.csr_matrix(np.round(X * 3))
    dense = tmp_path / "dense.h5ad"
    ad.AnnData(X=X, obs=obs, var=var, layers={"counts": counts}).write_h5ad(dense)
    sparse = tmp_path / "sparse.h5ad"
    ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var).write_h5ad(sparse)
    return {"X": X, "counts": counts.toarray(), "obs": obs, "dense": dense, "sparse": sparse}


# ---------------------------------------------------------------- read_counts_labels
def test_read_counts_labels_roundtrip(tmp_path):
    X = blob(12, 7)
    labels = labels_for(12)
    counts, lab = write_pair(tmp_path, X, labels)
    ds = read_counts_labels(counts, lab)
    assert isinstance(ds, Dataset)
    assert isinstance(ds.X, np.ndarray) and ds.X.dtype == np.float32
    np.testing.assert_array_equal(ds.X, X)
    assert ds.labels.tolist() == labels
    assert ds.n_cells == 12 and ds.n_genes == 7
    assert ds.classes.tolist() == ["type0", "type1", "type2"]
    assert "counts.npy" in ds.name and "labels.txt" in ds.name
    assert ds.obs_names.shape == (12,) and ds.var_names.shape == (7,)


def test_read_counts_labels_converts_integer_and_float64_matrices(tmp_path):
    X = np.arange(24, dtype=np.int64).reshape(6, 4)
    counts, lab = write_pair(tmp_path, X, ["a", "b"] * 3)
    ds = read_counts_labels(counts, lab)
    assert ds.X.dtype == np.float32
    np.testing.assert_array_equal(ds.X, X.astype(np.float32))


def test_labels_txt_whitespace_and_trailing_blank_lines(tmp_path):
    X = blob(4, 3)
    counts, lab = write_pair(tmp_path, X, None, labels_text="  a \r\nb\n\ta\nb\n\n\n  \n")
    ds = read_counts_labels(counts, lab)
    assert ds.labels.tolist() == ["a", "b", "a", "b"]


def test_read_counts_labels_never_modifies_inputs(tmp_path):
    X = blob(10, 5).astype(np.float64)
    counts, lab = write_pair(tmp_path, X, labels_for(10, 2))
    before = [fingerprint(counts), fingerprint(lab)]
    ds = read_counts_labels(counts, lab)
    ds.X[0, 0] = 1234.0  # even changing the returned matrix must not reach the file
    assert [fingerprint(counts), fingerprint(lab)] == before


@pytest.mark.parametrize("which", ["counts", "labels"])
def test_missing_file(tmp_path, which):
    counts, lab = write_pair(tmp_path, blob(4, 3), ["a", "b"] * 2)
    missing = tmp_path / "nope" / f"{which}.dat"
    args = (missing, lab) if which == "counts" else (counts, missing)
    msg = input_error(read_counts_labels, *args)
    assert str(missing) in msg
    assert "not found" in msg
    assert ("counts file" if which == "counts" else "labels file") in msg


@pytest.mark.parametrize("which", ["counts", "labels"])
def test_directory_instead_of_file(tmp_path, which):
    counts, lab = write_pair(tmp_path, blob(4, 3), ["a", "b"] * 2)
    d = tmp_path / "adir"
    d.mkdir()
    args = (d, lab) if which == "counts" else (counts, d)
    msg = input_error(read_counts_labels, *args)
    assert str(d) in msg
    assert "is a directory" in msg


@pytest.mark.parametrize("which", ["counts", "labels", "h5ad", "model"])
def test_named_pipe_or_device_is_refused_without_blocking(tmp_path, which):
    """A named pipe without a writer would block the read for ever: refused up front, as is a device."""
    counts, lab = write_pair(tmp_path, blob(4, 3), ["a", "b"] * 2)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    calls = {
        "counts": lambda p: read_counts_labels(p, lab),
        "labels": lambda p: read_counts_labels(counts, p),
        "h5ad": lambda p: read_h5ad(p, "cell_type"),
        "model": lambda p: Autoencoder.load(p),
    }
    msg = input_error(calls[which], pipe)
    assert str(pipe) in msg and "named pipe" in msg
    if which == "counts":
        assert input_error(calls[which], Path("/dev/zero")) == (
            "/dev/zero: is a device; expected a counts file stored as a regular file (write it to one first)")


def test_text_file_instead_of_npy(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("1,2,3\n4,5,6\n")
    lab = tmp_path / "labels.txt"
    lab.write_text("a\nb\n")
    msg = input_error(read_counts_labels, path, lab)
    assert str(path) in msg
    assert ".npy" in msg


def test_text_file_error_names_the_real_problem(tmp_path):
    path = tmp_path / "counts.npy"
    path.write_text("gene1,gene2\n1,2\n")
    lab = tmp_path / "labels.txt"
    lab.write_text("a\n")
    msg = input_error(read_counts_labels, path, lab)
    assert "Python objects" not in msg and "pickle" not in msg


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'"])
def test_empty_or_truncated_npy(tmp_path, content):
    path = tmp_path / "counts.npy"
    path.write_bytes(content)
    lab = tmp_path / "labels.txt"
    lab.write_text("a\nb\n")
    msg = input_error(read_counts_labels, path, lab)
    assert str(path) in msg and "NumPy" in msg


def test_npz_archive_refused(tmp_path):
    path = tmp_path / "counts.npz"
    np.savez(path, X=blob(4, 3))
    lab = tmp_path / "labels.txt"
    lab.write_text("a\nb\na\nb\n")
    msg = input_error(read_counts_labels, path, lab)
    assert str(path) in msg and ".npz" in msg


class _Canary:
    """Unpickling this object creates a directory: proof that pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_object_array_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pickle-was-executed"
    arr = np.empty((2, 2), dtype=object)
    arr[:] = 1.5
    arr[1, 0] = _Canary(str(marker))  # one canary: a second mkdir would fail
    path = tmp_path / "counts.npy"
    np.save(path, arr, allow_pickle=True)
    lab = tmp_path / "labels.txt"
    lab.write_text("a\nb\n")
    before = fingerprint(path)

    msg = input_error(read_counts_labels, path, lab)
    assert str(path) in msg
    assert "pickle" in msg
    assert not marker.exists()
    assert fingerprint(path) == before

    # the canary works: loading with pickle allowed does run it
    np.load(path, allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4)])
def test_wrong_dimensions(tmp_path, shape):
    X = np.ones(shape, dtype=np.float32)
    counts, lab = write_pair(tmp_path, X, ["a", "b"])
    msg = input_error(read_counts_labels, counts, lab)
    assert str(counts) in msg
    assert str(shape) in msg
    assert f"{len(shape)}-D" in msg and "2-D" in msg


def test_string_matrix_refused(tmp_path):
    counts, lab = write_pair(tmp_path, np.array([["a", "b"], ["c", "d"]]), ["a", "b"])
    msg = input_error(read_counts_labels, counts, lab)
    assert str(counts) in msg and "dtype" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_report_row_and_column(tmp_path, bad):
    X = blob(8, 6)
    X[3, 5] = bad
    X[6, 1] = np.nan
    counts, lab = write_pair(tmp_path, X, labels_for(8, 2))
    msg = input_error(read_counts_labels, counts, lab)
    assert str(counts) in msg
    assert "row 3, column 5" in msg
    assert "2 NaN or infinite" in msg


def test_nonfinite_values_in_sparse_matrix_report_row_and_column():
    X = blob(9, 5)
    X[4, 2] = np.nan
    X[7, 0] = np.inf
    msg = input_error(make_dataset, sp.csr_matrix(X), labels_for(9, 2), source="my.h5ad")
    assert "my.h5ad" in msg
    assert "row 4, column 2" in msg
    assert "2 NaN or infinite" in msg


def test_label_count_mismatch_names_both_counts(tmp_path):
    counts, lab = write_pair(tmp_path, blob(7, 4), labels_for(5, 2))
    msg = input_error(read_counts_labels, counts, lab)
    assert str(lab) in msg and str(counts) in msg
    assert "5 labels" in msg
    assert "7 cells" in msg


def test_single_label_refused_naming_the_labels_file(tmp_path):
    counts, lab = write_pair(tmp_path, blob(6, 4), ["same"] * 6)
    msg = input_error(read_counts_labels, counts, lab)
    assert msg == (f"{lab}: the labels file has only 1 distinct label ('same') for all 6 cells; "
                   "expected at least 2 labels (cell populations) to compare")


def test_empty_line_inside_labels(tmp_path):
    counts, lab = write_pair(tmp_path, blob(4, 3), None, labels_text="a\nb\n\na\nb\n")
    msg = input_error(read_counts_labels, counts, lab)
    assert str(lab) in msg
    assert "line 3 is empty" in msg


def test_labels_not_utf8(tmp_path):
    _, lab = write_pair(tmp_path, blob(2, 3), ["a", "b"])
    lab.write_bytes(b"a\n\xff\xfe\n")
    msg = input_error(read_labels_txt, lab)
    assert str(lab) in msg and "UTF-8" in msg


# ---------------------------------------------------------------- read_h5ad
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_read_h5ad_string_labels(h5ad_files, kind):
    ds = read_h5ad(h5ad_files[kind], "cell_type")
    if kind == "dense":
        assert isinstance(ds.X, np.ndarray)
        X = ds.X
    else:
        assert sp.isspmatrix_csr(ds.X) or (sp.issparse(ds.X) and ds.X.format == "csr")
        X = ds.X.toarray()
    assert ds.X.dtype == np.float32
    np.testing.assert_array_equal(X, h5ad_files["X"])
    assert ds.labels.tolist() == ["B", "T", "NK"] * 5
    assert ds.obs_names.tolist() == [f"bc{i}" for i in range(15)]
    assert ds.var_names.tolist() == [f"G{j}" for j in range(6)]
    assert "cell_type" in ds.name and h5ad_files[kind].name in ds.name


def test_read_h5ad_integer_labels_become_strings(h5ad_files):
    ds = read_h5ad(h5ad_files["dense"], "cluster")
    assert ds.labels.dtype.kind == "U"
    assert ds.labels.tolist() == [str(v) for v in h5ad_files["obs"]["cluster"]]
    assert ds.classes.tolist() == ["0", "1"]


def test_read_h5ad_layer(h5ad_files):
    ds = read_h5ad(h5ad_files["dense"], "cell_type", layer="counts")
    X = ds.X.toarray() if sp.issparse(ds.X) else ds.X
    np.testing.assert_array_equal(X, h5ad_files["counts"])
    assert not np.array_equal(X, h5ad_files["X"])
    assert "layer 'counts'" in ds.name


def test_read_h5ad_never_modifies_file(h5ad_files):
    before = fingerprint(h5ad_files["sparse"])
    read_h5ad(h5ad_files["sparse"], "cell_type")
    read_h5ad(h5ad_files["dense"], "cluster", layer="counts")
    assert fingerprint(h5ad_files["sparse"]) == before


def test_read_h5ad_unknown_label_key_lists_columns(h5ad_files):
    msg = input_error(read_h5ad, h5ad_files["dense"], "celltype")
    assert str(h5ad_files["dense"]) in msg
    assert "'celltype'" in msg
    for col in ("cell_type", "cluster", "batch"):
        assert col in msg


def test_read_h5ad_unknown_layer_lists_layers(h5ad_files):
    msg = input_error(read_h5ad, h5ad_files["dense"], "cell_type", layer="raw")
    assert str(h5ad_files["dense"]) in msg
    assert "no layer 'raw'" in msg and "counts" in msg
    msg = input_error(read_h5ad, h5ad_files["sparse"], "cell_type", layer="raw")
    assert "available layers: none" in msg


@pytest.mark.parametrize("kind,stream", [("dense", None), ("sparse", None), ("sparse", True)])
def test_read_h5ad_single_label_refused_naming_the_obs_column(h5ad_files, kind, stream):
    msg = input_error(read_h5ad, h5ad_files[kind], "batch", stream=stream)
    assert msg == (f"{h5ad_files[kind]}: obs column 'batch' has only 1 distinct label ('b1') for all 15 cells; "
                   "expected at least 2 labels (cell populations) to compare; "
                   "categorical columns in this file: cell_type, batch")


def test_read_h5ad_missing_labels_refused(tmp_path):
    obs = pd.DataFrame({"ct": pd.Categorical(["a", None, "b", "a"])}, index=list("wxyz"))
    path = tmp_path / "m.h5ad"
    ad.AnnData(X=blob(4, 3), obs=obs).write_h5ad(path)
    msg = input_error(read_h5ad, path, "ct")
    assert msg.startswith(f"{path}: obs column 'ct' leaves 1 cell(s) without a label, first at cell 1;")


@pytest.mark.parametrize("blank", ["", "   ", "\u00a0"])
def test_read_h5ad_blank_labels_refused_as_a_labels_file_refuses_empty_lines(tmp_path, blank):
    obs = pd.DataFrame({"ct": pd.Categorical(["a", "b", blank, "a"])}, index=list("wxyz"))
    path = tmp_path / "m.h5ad"
    ad.AnnData(X=blob(4, 3), obs=obs).write_h5ad(path)
    msg = input_error(read_h5ad, path, "ct")
    assert msg.startswith(f"{path}: obs column 'ct' leaves 1 cell(s) with a blank label (empty or only spaces), "
                          "first at cell 2; expected a label for every cell")


@pytest.mark.parametrize("content", ["not an h5ad file\n", ""])
def test_read_h5ad_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.h5ad"
    path.write_text(content)
    msg = input_error(read_h5ad, path, "x")
    assert str(path) in msg and "AnnData" in msg


def test_read_h5ad_missing_and_directory(tmp_path):
    msg = input_error(read_h5ad, tmp_path / "absent.h5ad", "x")
    assert str(tmp_path / "absent.h5ad") in msg and "not found" in msg
    msg = input_error(read_h5ad, tmp_path, "x")
    assert str(tmp_path) in msg and "is a directory" in msg


# ---------------------------------------------------------------- make_dataset / as_matrix / Dataset
def test_make_dataset_from_lists_and_names():
    ds = make_dataset([[1, 0], [0, 2], [3, 3]], [1, 2, 1], name="toy", obs_names=["c1", "c2", "c3"],
                      var_names=["g1", "g2"])
    assert ds.X.dtype == np.float32 and ds.X.shape == (3, 2)
    assert ds.labels.tolist() == ["1", "2", "1"]
    assert ds.obs_names.tolist() == ["c1", "c2", "c3"] and ds.var_names.tolist() == ["g1", "g2"]
    assert ds.name == "toy"


def test_make_dataset_default_names():
    ds = make_dataset(blob(3, 2), ["a", "b", "a"])
    assert ds.obs_names.tolist() == ["cell0", "cell1", "cell2"]
    assert ds.var_names.tolist() == ["gene0", "gene1"]


def test_make_dataset_errors():
    msg = input_error(make_dataset, blob(4, 3), ["a", "b", "a"], source="src.npy")
    assert "src.npy" in msg and "3 labels" in msg and "4 cells" in msg
    msg = input_error(make_dataset, blob(3, 3), ["a", None, "b"], source="src.npy")
    assert msg == "labels: the label array leaves 1 cell(s) without a label, first at cell 1; expected a label for every cell"
    msg = input_error(make_dataset, blob(3, 3), ["a", "a", "a"], source="src.npy")
    assert msg.startswith("labels: the label array has only 1 distinct label ('a') for all 3 cells;")


def test_as_matrix_accepts_anndata_sparse_and_ints():
    X = blob(5, 4)
    adata = ad.AnnData(X=X)
    out = as_matrix(adata)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, X)
    coo = sp.coo_matrix(X.astype(np.float64))
    out = as_matrix(coo)
    assert sp.issparse(out) and out.format == "csr" and out.dtype == np.float32
    np.testing.assert_array_equal(out.toarray(), X)
    out = as_matrix(np.array([[1, 2], [3, 4]], dtype=np.int32))
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    "X,needle",
    [
        (np.zeros((0, 4)), "at least 1 cell and 2 genes"),
        (np.zeros((3, 0)), "at least 1 cell and 2 genes"),
        (np.ones((3, 1)), "at least 1 cell and 2 genes"),
        (np.array([["x"]]), "dtype"),
        (np.array([[1 + 1j]]), "dtype"),
        (np.ones(5), "2-D"),
    ],
)
def test_as_matrix_rejects(X, needle):
    msg = input_error(as_matrix, X, "thing.npy")
    assert msg.startswith("thing.npy:")
    assert needle in msg


def test_dataset_summary_and_anndata():
    X = np.array([[0, 1, 2], [0, 0, 5], [1, 0, 0], [2, 2, 2]], dtype=np.float32)
    ds = make_dataset(sp.csr_matrix(X), ["x", "y", "x", "x"], name="tiny")
    s = ds.summary()
    assert s["n_cells"] == 4 and s["n_genes"] == 3
    assert s["storage"] == "sparse CSR"
    assert s["zero_fraction"] == pytest.approx(5 / 12, abs=1e-6)
    assert s["value_min"] == 0.0 and s["value_max"] == 5.0
    assert s["label_counts"] == {"x": 3, "y": 1}
    adata = ds.to_anndata()
    assert adata.shape == (4, 3)
    assert adata.obs["label"].astype(str).tolist() == ["x", "y", "x", "x"]
    assert make_dataset(X, ["x", "y", "x", "x"]).summary()["storage"] == "dense"


# ---------------------------------------------------------------- stratified_split
def split_labels(n: int, weights=(0.5, 0.3, 0.2), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice([f"L{i}" for i in range(len(weights))], size=n, p=weights)


@pytest.mark.parametrize("n", [20, 53, 101, 300, 997])
def test_split_sizes_disjoint_covering(n):
    labels = split_labels(n)
    train, test = stratified_split(labels, 0.2, seed=0)
    assert test.size == -(-n // 5)  # ceil(n / 5), computed exactly in integers
    assert train.size == n - test.size
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # sorted, unique
    assert train.dtype.kind == "i" and test.dtype.kind == "i"


@pytest.mark.parametrize("n,fraction", [(300, 0.2), (157, 0.2), (90, 0.35)])
def test_split_preserves_label_proportions(n, fraction):
    labels = split_labels(n, seed=n)
    train, test = stratified_split(labels, fraction, seed=1)
    assert test.size == math.ceil(fraction * n)
    for c in np.unique(labels):
        n_c = int(np.sum(labels == c))
        expected = n_c * test.size / n
        assert abs(int(np.sum(labels[test] == c)) - expected) <= 1, c
        assert int(np.sum(labels[train] == c)) + int(np.sum(labels[test] == c)) == n_c


def test_split_is_deterministic_per_seed():
    labels = split_labels(200)
    a = stratified_split(labels, 0.2, seed=7)
    b = stratified_split(labels, 0.2, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = stratified_split(labels, 0.2, seed=8)
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize(
    "labels,largest",
    [
        (["a", "a", "a", "b"], 3),  # no label has the 5 cells a 20% test share needs
        (["a", "a", "b", "b"], 2),
        (["a"] * 3 + ["b"] * 3 + ["c"] * 4, 4),
    ],
)
def test_split_too_few_cells(labels, largest):
    msg = input_error(stratified_split, np.array(labels), 0.2, 0)
    assert msg == (
        f"too few cells for a 80%/20% train/test split: {len(labels)} cells, {len(set(labels))} labels, "
        f"the largest with {largest} cell(s); expected at least one label with 5 or more cells "
        "(labels with fewer go to the training cells only)"
    )


def test_split_test_fraction_leaving_too_few_training_cells():
    msg = input_error(stratified_split, np.array(["a"] * 3 + ["b"] * 3), 0.9, 0)
    assert msg == ("too few cells for a 10%/90% train/test split: 6 test cells leave 0 training cells for "
                   "2 labels; expected a smaller test fraction or more cells")


@pytest.mark.parametrize("fraction", [0, 1, -0.2, 1.5, float("nan"), "0.2"])
def test_split_test_fraction_must_lie_between_0_and_1(fraction):
    msg = input_error(stratified_split, np.array(["a", "b"] * 10), fraction, 0)
    assert msg == f"test_fraction={fraction!r}; expected a number between 0 and 1 (exclusive)"


# ---------------------------------------------------------------- rare labels: training cells only
@pytest.mark.parametrize("fraction,least", [(0.2, 5), (0.25, 4), (0.3, 4), (0.1, 10), (0.5, 2), (0.9, 2)])
def test_min_cells_for_test(fraction, least):
    assert min_cells_for_test(fraction) == least
    assert math.floor(least * fraction + 1e-9) >= 1  # enough for one test cell
    assert least == 2 or (least - 1) * fraction < 1  # and no fewer would do


def test_train_only_labels_counts_labels_below_a_test_share():
    labels = np.array(["big"] * 20 + ["four"] * 4 + ["five"] * 5 + ["one"])
    assert train_only_labels(labels, 0.2) == {"four": 4, "one": 1}
    assert train_only_labels(labels, 0.5) == {"one": 1}
    assert train_only_labels(np.array(["a"] * 5 + ["b"] * 5), 0.2) == {}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_puts_rare_labels_in_training_cells_and_stratifies_the_rest(seed):
    labels = np.array(["A"] * 50 + ["B"] * 30 + ["single"] + ["few"] * 3 + ["C"] * 5)
    rng = np.random.default_rng(seed)
    labels = labels[rng.permutation(labels.size)]
    train, test = stratified_split(labels, 0.2, seed)
    assert set(labels[test]) == {"A", "B", "C"}  # every splittable label has test cells
    assert sorted(labels[train].tolist()).count("single") == 1 and (labels[train] == "few").sum() == 3
    assert test.size == math.ceil(0.2 * 85)  # the share of the 85 splittable cells
    assert [(labels[test] == c).sum() for c in "ABC"] == [10, 6, 1]
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(labels.size))


def test_split_without_rare_labels_is_unchanged():
    """No rare label: exactly scikit-learn's stratified split of every cell (the split before)."""
    from sklearn.model_selection import train_test_split

    labels = split_labels(300, seed=4)
    train, test = stratified_split(labels, 0.2, 3)
    expected = train_test_split(np.arange(300), test_size=60, stratify=labels, random_state=3)
    np.testing.assert_array_equal(train, np.sort(expected[0]))
    np.testing.assert_array_equal(test, np.sort(expected[1]))


def test_read_h5ad_without_X_needs_layer(tmp_path):
    obs = pd.DataFrame({"ct": ["a", "b", "a", "b"]}, index=list("wxyz"))
    layer = sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(4, 3))
    path = tmp_path / "nox.h5ad"
    ad.AnnData(obs=obs, var=pd.DataFrame(index=["g1", "g2", "g3"]), layers={"counts": layer}).write_h5ad(path)
    msg = input_error(read_h5ad, path, "ct")
    assert str(path) in msg and "X is empty" in msg and "--layer" in msg
    ds = read_h5ad(path, "ct", layer="counts")
    np.testing.assert_array_equal(ds.X.toarray(), layer.toarray())


def test_labels_file_with_byte_order_mark(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffA\nB\nA\n".encode("utf-8"))
    assert read_labels_txt(path) == ["A", "B", "A"]


@pytest.mark.parametrize("shape", [(3_000_000, 25_000), (40, 30)])
def test_npy_header_promising_more_than_the_file_holds_is_refused(tmp_path, shape):
    """A truncated file, or a header that would make loading allocate ~300 GB: one clear line."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    path = tmp_path / "bomb.npy"
    path.write_bytes(buffer.getvalue() + b"\0" * 400)
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ScaeInputError, match=r"header declares a .* matrix \(.* bytes\) but the file holds only 400 bytes"):
        read_counts_labels(path, tmp_path / "labels.txt")


# ---------------------------------------------------------------- degenerate matrices
def no_variation_matrices():
    varied = blob(10, 4)
    return {
        "zeros": (np.zeros((10, 4), dtype=np.float32), "every value is 0, so there is no expression to learn from"),
        "constant": (np.full((10, 4), 2.5), "every value is 2.5, so there is no structure to learn"),
        "constant ints": (np.full((10, 4), 3, dtype=np.int64), "every value is 3, so there is no structure to learn"),
        "constant bool": (np.ones((10, 4), dtype=bool), "every value is 1, so there is no structure to learn"),
        "identical cells": (
            np.tile(varied[:1], (10, 1)),
            ("all 10 cells have the same values (every gene is constant across cells), "
             "so there is no structure to learn"),
        ),
    }


@pytest.mark.parametrize("case", list(no_variation_matrices()))
@pytest.mark.parametrize("how", ["memory", "memory sparse", "npy", "npy streamed", "h5ad", "h5ad streamed",
                                 "h5ad dense streamed"])
def test_matrix_without_variation_is_refused_up_front(tmp_path, case, how):
    X, problem = no_variation_matrices()[case]
    labels = labels_for(10, 2)
    if how.startswith("memory"):
        source = "m"
        read = lambda: make_dataset(sp.csr_matrix(X) if "sparse" in how else X, labels, source="m")
    elif how.startswith("npy"):
        counts, lab = write_pair(tmp_path, X, labels)
        source = str(counts)
        read = lambda: read_counts_labels(counts, lab, stream="streamed" in how)
    else:
        path = tmp_path / "d.h5ad"
        obs = pd.DataFrame({"ct": pd.Categorical(labels)}, index=[f"c{i}" for i in range(10)])
        ad.AnnData(X=X if "dense" in how else sp.csr_matrix(X), obs=obs).write_h5ad(path)
        source = f"{path} X"
        read = lambda: read_h5ad(path, "ct", stream=True if "streamed" in how else None)
    assert input_error(read) == f"{source}: {problem}; expected expression values that differ between cells"


def test_zero_variance_genes_are_counted_not_refused(tmp_path):
    X = blob(10, 5)
    X[:, 1:] = 7.0  # one varying gene, four constant ones
    ds = make_dataset(X, labels_for(10, 2))
    assert ds.summary()["constant_genes"] == 4
    assert make_dataset(sp.csr_matrix(X), labels_for(10, 2)).summary()["constant_genes"] == 4
    counts, lab = write_pair(tmp_path, X, labels_for(10, 2))
    assert read_counts_labels(counts, lab, stream=True).summary()["constant_genes"] == 4


@pytest.mark.parametrize("how", ["memory", "sparse", "npy", "npy streamed", "h5ad streamed", "h5ad dense streamed"])
def test_huge_values_are_refused_with_position_and_value(tmp_path, how):
    X = blob(6, 4).astype(np.float64)
    X[2, 3], X[4, 1] = 1e300, -3e13  # 1e300 overflows float32 to infinity; both overflow squared errors
    if how in ("memory", "sparse"):
        matrix = sp.csr_matrix(X) if how == "sparse" else X
        source, read = "m", lambda: make_dataset(matrix, labels_for(6, 2), source="m")
    elif how.startswith("npy"):
        counts, lab = write_pair(tmp_path, X, labels_for(6, 2))
        source, read = str(counts), lambda: read_counts_labels(counts, lab, stream=how.endswith("streamed"))
    else:
        path = tmp_path / "d.h5ad"
        obs = pd.DataFrame({"ct": pd.Categorical(labels_for(6, 2))}, index=[f"c{i}" for i in range(6)])
        ad.AnnData(X=X if "dense" in how else sp.csr_matrix(X), obs=obs).write_h5ad(path)
        source, read = f"{path} X", lambda: read_h5ad(path, "ct", stream=True)
    count = "" if "streamed" in how else "2 "  # a streamed check stops at the first block with one
    assert input_error(read) == (
        f"{source}: {count}huge value(s) beyond ±1e+12, first at row 2, column 3 (1e+300); expected values of "
        "magnitude at most 1e+12 (scae computes in 32-bit floats, where their squares overflow); rescale the matrix"
    )


def test_large_values_within_the_limit_are_kept():
    X = blob(6, 4).astype(np.float64) * 1e11 + 0.5
    ds = make_dataset(X, labels_for(6, 2), normalize="none")
    np.testing.assert_array_equal(ds.X, X.astype(np.float32))
    assert np.abs(ds.X).max() <= MAX_ABS_VALUE


@pytest.mark.parametrize("dtype", ["float16", "float64", "int32", "int64", "uint8", "bool", "longdouble"])
@pytest.mark.parametrize("stream", [False, True])
def test_npy_of_any_numeric_dtype_reads_as_float32(tmp_path, dtype, stream):
    X = (blob(9, 4) * 3).astype(dtype)
    counts, lab = write_pair(tmp_path, X, labels_for(9, 3))
    ds = read_counts_labels(counts, lab, stream=stream)
    got = ds.X.read(slice(None)) if stream else ds.X
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, X.astype(np.float32))
    assert ds.counts == (dtype not in ("float16", "float64", "longdouble"))  # whole non-negative numbers


@pytest.mark.parametrize(
    "dtype,sparse",
    [(dtype, sparse) for dtype in ["float16", "int32", "uint8", "bool"] for sparse in (False, True)
     if not (sparse and dtype == "float16")],  # scipy.sparse has no float16
)
def test_h5ad_of_any_numeric_dtype_reads_as_float32(tmp_path, dtype, sparse):
    X = (blob(9, 4) * 3).astype(dtype)
    path = tmp_path / "d.h5ad"
    obs = pd.DataFrame({"ct": pd.Categorical(labels_for(9, 3))}, index=[f"c{i}" for i in range(9)])
    ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs).write_h5ad(path)
    ds = read_h5ad(path, "ct")
    got = ds.X.toarray() if sp.issparse(ds.X) else ds.X
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, X.astype(np.float32))


@pytest.mark.parametrize("damage", ["column outside", "short data"])
def test_damaged_sparse_structure_is_refused(damage):
    X = sp.csr_matrix(blob(4, 3))
    if damage == "column outside":
        X.indices[0] = 7  # scipy would write out of bounds when densifying
    else:
        X.data = X.data[:2]
    msg = input_error(make_dataset, X, labels_for(4, 2), source="m")
    assert msg.startswith("m: damaged sparse matrix (") and msg.endswith("expected a valid CSR/CSC matrix")


def test_npy_header_that_numpy_cannot_tokenize_is_one_line(tmp_path):
    counts, lab = write_pair(tmp_path, blob(4, 3), labels_for(4, 2))
    raw = bytearray(counts.read_bytes())
    raw[10] = ord("(")  # an unbalanced bracket in the header dictionary
    counts.write_bytes(bytes(raw))
    msg = input_error(read_counts_labels, counts, lab)
    assert msg.startswith(f"{counts}: ") and "NumPy .npy file" in msg


def test_npy_larger_than_available_memory_is_refused(tmp_path, monkeypatch):
    import scae.data

    counts, lab = write_pair(tmp_path, blob(40, 30).astype(np.float64), labels_for(40, 2))
    monkeypatch.setattr(scae.data, "_available_memory", lambda: 1000)
    msg = input_error(read_counts_labels, counts, lab)
    assert msg == (f"{counts}: loading it takes 0.0 GiB but only 0.0 GiB of memory is available; "
                   "stream it from disk instead (--stream)")
    read_counts_labels(counts, lab, stream=True)  # streaming needs no such memory


# ---------------------------------------------------------------- label files and label columns
def test_labels_txt_line_endings_and_unicode_separators(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("a\rb\r\nc\nΩ\u2028x\n".encode())  # old-Mac, Windows and Unix endings
    assert read_labels_txt(path) == ["a", "b", "c", "Ω\u2028x"]  # U+2028 is no line break here


@pytest.mark.parametrize("char,shown", [("\x00", "'\\x00'"), ("\x1b", "'\\x1b'"), ("\x85", "'\\x85'")])
def test_labels_txt_control_characters_refused(tmp_path, char, shown):
    path = tmp_path / "labels.txt"
    path.write_text(f"a\nb{char}c\n", encoding="utf-8")
    assert input_error(read_labels_txt, path) == (
        f"{path}: line 2 holds the control character {shown}; expected one printable label per line"
    )


@pytest.mark.parametrize("char,shown", [("\x00", "'\\x00'"), ("\x1b", "'\\x1b'"), ("\r", "'\\r'"), ("\n", "'\\n'")])
def test_control_characters_in_a_label_array_refused(char, shown):
    msg = input_error(make_dataset, blob(3, 3), ["a", f"b{char}c", "a"])
    assert msg == f"labels: the label array holds the control character {shown} in the label of cell 1; expected printable labels"


@pytest.mark.parametrize("stream", [False, True])
def test_control_characters_in_an_obs_column_refused(tmp_path, stream):
    path = h5ad_with_obs(tmp_path, {"ct": ["a", "b", "\x1b[31mRED\x1b[0m"] * 4})
    msg = input_error(read_h5ad, path, "ct", stream=stream)
    assert "holds the control character '\\x1b' in the label of cell 2; expected printable labels" in msg


@pytest.mark.parametrize("stream", [False, True])
def test_a_label_too_long_for_a_legend_is_refused_in_an_obs_column_as_in_a_labels_file(tmp_path, stream):
    """A 1,001-character label (a labels file refuses the line): figure legends took minutes to draw."""
    path = h5ad_with_obs(tmp_path, {"ct": ["a", "b", "x" * 1001] * 4})
    msg = input_error(read_h5ad, path, "ct", stream=stream)
    assert "holds a label of 1,001 characters (cell 2); expected labels of at most 1,000 characters" in msg
    (tmp_path / "ok").mkdir()
    assert read_h5ad(h5ad_with_obs(tmp_path / "ok", {"ct": ["a", "b", "x" * 1000] * 4}), "ct").labels[2] == "x" * 1000


def test_a_tensor_that_requires_grad_is_read_as_its_values():
    import torch

    X = torch.rand(6, 3).requires_grad_()
    assert np.array_equal(as_matrix(X), X.detach().numpy())


def h5ad_with_obs(tmp_path, columns: dict) -> Path:
    n = len(next(iter(columns.values())))
    rng = np.random.default_rng(0)
    X = rng.gamma(1.0, 1.0, size=(n, 4)).astype(np.float32)
    obs = pd.DataFrame(columns, index=[f"c{i}" for i in range(n)])
    path = tmp_path / "obs.h5ad"
    ad.AnnData(X=sp.csr_matrix(X), obs=obs).write_h5ad(path)
    return path


@pytest.mark.parametrize("stream", [None, True])
def test_continuous_obs_column_refused_with_categorical_columns_named(tmp_path, stream):
    rng = np.random.default_rng(1)
    path = h5ad_with_obs(tmp_path, {
        "cell_type": pd.Categorical(rng.choice(["B", "T"], 300)),
        "total_counts": rng.gamma(2.0, 1000.0, 300).astype(np.float32),
        "batch": rng.choice(["b1", "b2"], 300),
        "leiden": rng.integers(0, 12, 300),
    })
    msg = input_error(read_h5ad, path, "total_counts", stream=stream)
    assert msg == (f"{path}: obs column 'total_counts' holds continuous numbers (300 distinct values), not cell "
                   "labels; expected one cell-type label per cell; categorical columns in this file: cell_type, batch")
    assert read_h5ad(path, "leiden").classes.size == 12  # integer cluster ids are labels


@pytest.mark.parametrize(
    "values,continuous",
    [
        (np.arange(300) % 12, None),  # cluster ids
        (np.arange(300) % 60, None),  # 60 whole-number ids, 5 cells each
        ((np.arange(300) % 5) + 0.5, None),  # few decimals: sub-clusters or doses
        (np.arange(300) * 1.0, "continuous numbers (300 distinct values)"),  # whole, but one per cell
        (np.arange(300) / 7, "continuous numbers (300 distinct values)"),
        (np.arange(3000) % 1500, "continuous numbers (1500 distinct values)"),  # half the cells, but > 1000
        (np.arange(300) % 100 / 3, "continuous numbers (100 distinct values)"),  # non-whole, > 50 distinct
        (np.arange(40) / 7, None),  # 40 values are too few to tell
        (pd.Categorical(np.arange(300) / 7), None),  # a categorical column is labels by declaration
        (np.array([str(v) for v in np.arange(300) / 7]), "continuous numbers (300 distinct values)"),  # as text
        (np.array(["nan", "inf"] * 150), None),
        (np.array([True, False] * 150), None),
    ],
)
def test_continuous_labels_rule(values, continuous):
    assert continuous_labels(values) == continuous


def test_labels_txt_of_distinct_numbers_refused(tmp_path):
    values = np.random.default_rng(2).normal(size=80)
    counts, lab = write_pair(tmp_path, blob(80, 4), [repr(float(v)) for v in values])
    assert input_error(read_counts_labels, counts, lab) == (
        f"{lab}: the labels file holds continuous numbers (80 distinct values), not cell labels; expected one "
        "cell-type label per cell; write labels that are numbers with a letter in front (e.g. c1.5) if they "
        "really are labels"
    )


def test_numeric_label_array_passes_as_categorical():
    values = np.arange(60) / 7
    with pytest.raises(ScaeInputError, match="give them as a pandas.Categorical if these numbers are labels"):
        make_dataset(blob(60, 4), values)
    assert make_dataset(blob(60, 4), pd.Categorical(values)).classes.size == 60


# ---------------------------------------------------------------- h5ad files the HDF5 library cannot survive
@pytest.mark.parametrize(
    "probe,problem",
    [
        ("import time; time.sleep(30)",
         "reading its HDF5 structure did not finish in 0.5 s, as happens with a damaged file"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
         "the HDF5 library crashed reading it (signal 11), as happens with a damaged file"),
    ],
)
def test_h5ad_that_hangs_or_crashes_the_hdf5_library_is_refused(h5ad_files, monkeypatch, probe, problem):
    """Some damaged files make HDF5 loop forever or crash; the structure is walked in a child process."""
    import scae.data

    monkeypatch.setattr(scae.data, "_H5AD_PROBE", probe)
    monkeypatch.setattr(scae.data, "H5AD_PROBE_SECONDS", 0.5)
    assert input_error(read_h5ad, h5ad_files["dense"], "cell_type") == (
        f"{h5ad_files['dense']}: {problem}; expected an intact AnnData .h5ad file"
    )


@pytest.mark.parametrize("how", ["npy", "npy streamed", "h5ad streamed"])
def test_float64_values_that_vanish_in_float32_count_as_no_variation(tmp_path, how):
    """Denormal float64 values (e.g. a damaged file) all become 0 in float32, which training sees."""
    X = np.zeros((6, 4))
    X[::2, 1] = 1e-320
    labels = labels_for(6, 2)
    if how.startswith("npy"):
        counts, lab = write_pair(tmp_path, X, labels)
        msg = input_error(read_counts_labels, counts, lab, stream=how.endswith("streamed"))
    else:
        path = tmp_path / "d.h5ad"
        obs = pd.DataFrame({"ct": pd.Categorical(labels)}, index=[f"c{i}" for i in range(6)])
        ad.AnnData(X=sp.csr_matrix(X), obs=obs).write_h5ad(path)
        msg = input_error(read_h5ad, path, "ct", stream=True)
    assert "every value is 0, so there is no expression to learn from" in msg


# ---------------------------------------------------------------- raw counts beside the model input
def counts_and_lognorm(n_cells=30, n_genes=8, seed=0):
    """Integer counts (every cell has some) and their log1p(counts / library × 1e4)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1
    library = counts.sum(axis=1, keepdims=True, dtype=np.float64)
    return counts, np.log1p(counts / library * 1e4).astype(np.float32)


def test_make_dataset_with_raw_counts():
    counts, lognorm = counts_and_lognorm()
    labels = labels_for(30)
    ds = make_dataset(lognorm, labels, raw=sp.csr_matrix(counts), raw_origin="my counts")
    assert not ds.counts and ds.has_counts and ds.raw_origin == "my counts"
    np.testing.assert_array_equal(ds.raw.toarray(), counts)
    source = ds.count_source()
    assert not source.counts
    np.testing.assert_array_equal(source.tensor(np.array([0, 5])).numpy(), counts[[0, 5]])
    np.testing.assert_array_equal(ds.source().tensor(np.array([0, 5])).numpy(), lognorm[[0, 5]])  # the model input
    s = ds.summary()
    assert s["count_data"] == "my counts" and s["raw_counts"] is False and s["model_input"] == "as given"
    # X holding the counts: it is their source, nothing beside it
    own = make_dataset(counts, labels, raw=counts)
    assert own.counts and own.raw is None and own.has_counts and own.raw_origin == "X"
    np.testing.assert_array_equal(own.count_source().tensor(np.array([2])).numpy(), counts[[2]])
    assert own.summary()["count_data"] == "X"
    plain = make_dataset(lognorm, labels)
    assert not plain.has_counts and plain.count_source() is None and plain.summary()["count_data"] is None


@pytest.mark.parametrize("change, message", [
    (lambda c: c[:, :-1], "raw counts: has shape (30, 7) but X has shape (30, 8); expected raw counts of the same cells and genes"),
    (lambda c: c - np.eye(30, 8, k=3, dtype=np.float32) * (c + 1), "raw counts: holds -1 at row 0, column 3, which is not a count; "
     "expected raw counts (non-negative whole numbers)"),
    (lambda c: c + (np.arange(8) == 6) * (np.arange(30)[:, None] == 4) * 0.5, "raw counts: holds 2.5 at row 4, column 6, which is not a count"),
])
def test_make_dataset_refuses_raw_that_are_not_counts(change, message):
    counts, lognorm = counts_and_lognorm()
    counts[4, 6] = 2
    msg = input_error(make_dataset, lognorm, labels_for(30), raw=change(counts))
    assert msg.startswith(message)


def test_fingerprint_changes_with_the_raw_counts_only_when_there_are_some():
    counts, lognorm = counts_and_lognorm()
    labels = labels_for(30)
    plain = make_dataset(lognorm, labels).fingerprint()
    assert "raw" not in plain  # fingerprints of inputs without counts are as before
    with_raw = make_dataset(lognorm, labels, raw=counts).fingerprint()
    other = counts.copy()
    other[0, 0] += 1
    assert with_raw != plain and with_raw != make_dataset(lognorm, labels, raw=other).fingerprint()
    assert with_raw == make_dataset(lognorm, labels, raw=counts.copy()).fingerprint()


@pytest.fixture
def counts_h5ad(tmp_path):
    """An .h5ad with log-normalised X, integer counts in layers['counts'] and adata.raw holding
    the counts of two more genes, its genes in another order."""
    counts, lognorm = counts_and_lognorm(40, 9, seed=3)
    genes = [f"G{j}" for j in range(9)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels_for(40))}, index=[f"c{i}" for i in range(40)])
    raw_genes = ["extra1", *genes[::-1], "extra2"]
    raw_matrix = np.concatenate([np.full((40, 1), 0.5), counts[:, ::-1], np.ones((40, 1))], axis=1)  # extra1 not counts
    raw = ad.AnnData(X=sp.csr_matrix(raw_matrix), var=pd.DataFrame(index=raw_genes))
    adata = ad.AnnData(X=sp.csr_matrix(lognorm), obs=obs, var=pd.DataFrame(index=genes),
                       layers={"counts": sp.csr_matrix(counts), "dense_counts": counts})
    adata.raw = raw
    path = tmp_path / "with_counts.h5ad"
    adata.write_h5ad(path)
    return path, counts, lognorm


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("how, origin", [({"counts_layer": "counts"}, "layer 'counts'"), ({"counts_raw": True}, "adata.raw")])
def test_read_h5ad_raw_counts_from_a_layer_or_adata_raw(counts_h5ad, stream, how, origin):
    path, counts, lognorm = counts_h5ad
    ds = read_h5ad(path, "cell_type", stream=stream, **how)
    assert ds.on_disk == stream and not ds.counts and ds.has_counts and ds.raw_origin == origin
    assert ds.summary()["count_data"] == origin
    rows = np.array([0, 7, 39])
    np.testing.assert_array_equal(ds.count_source().tensor(rows).numpy(), counts[rows])
    np.testing.assert_allclose(ds.source().tensor(rows).numpy(), lognorm[rows], rtol=1e-6)
    if stream:
        assert not ds.raw.counts and ds.raw.on_disk
    without = read_h5ad(path, "cell_type", stream=stream)
    assert without.raw is None and not without.has_counts
    assert ds.fingerprint() != without.fingerprint()


def test_read_h5ad_x_of_counts_is_their_source(counts_h5ad):
    path, counts, _ = counts_h5ad
    for stream in (False, True):
        ds = read_h5ad(path, "cell_type", layer="counts", stream=stream, counts_raw=True)
        assert ds.counts and ds.raw is None and ds.raw_origin == "layer 'counts'"
        np.testing.assert_array_equal(ds.count_source().tensor(np.array([3])).numpy(), counts[[3]])


def test_read_h5ad_refuses_counts_it_cannot_use(counts_h5ad, tmp_path):
    path, counts, lognorm = counts_h5ad
    assert input_error(read_h5ad, path, "cell_type", counts_layer="nope") == (
        f"{path}: no layer 'nope' for the raw counts; available layers: counts, dense_counts"
    )
    assert input_error(read_h5ad, path, "cell_type", counts_layer="counts", counts_raw=True).startswith(
        f"{path}: raw counts from a layer ('counts') and from adata.raw both asked for"
    )
    for stream in (False, True):  # a dense layer of counts, loaded or streamed by row ranges
        raw = read_h5ad(path, "cell_type", stream=stream, counts_layer="dense_counts").raw
        assert raw.shape == (40, 9)
        np.testing.assert_array_equal(raw.matrix() if stream else np.asarray(raw.todense() if sp.issparse(raw) else raw), counts)
    bad = counts.copy()
    bad[5, 2] = 1.5
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels_for(40))}, index=[f"c{i}" for i in range(40)])
    noraw = tmp_path / "noraw.h5ad"
    ad.AnnData(X=lognorm, obs=obs, layers={"counts": sp.csr_matrix(bad)}).write_h5ad(noraw)
    for stream in (False, True):
        if stream:
            ad.AnnData(X=sp.csr_matrix(lognorm), obs=obs, layers={"counts": sp.csr_matrix(bad), "dense": bad}).write_h5ad(noraw)
        for layer in ("counts", "dense") if stream else ("counts",):
            assert input_error(read_h5ad, noraw, "cell_type", stream=stream, counts_layer=layer) == (
                f"{noraw} layer '{layer}': holds 1.5 at row 5, column 2, which is not a count; "
                "expected raw counts (non-negative whole numbers)"
            )
        assert input_error(read_h5ad, noraw, "cell_type", stream=stream, counts_raw=True) == (
            f"{noraw}: has no adata.raw for the raw counts; expected a file whose adata.raw.X holds raw counts, "
            "or a layer of counts (--counts-layer)"
        )


@pytest.mark.parametrize("stream", [False, True])
def test_read_h5ad_raw_must_hold_every_gene_of_x_as_counts(tmp_path, stream):
    counts, lognorm = counts_and_lognorm(20, 5)
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels_for(20))}, index=[f"c{i}" for i in range(20)])
    adata = ad.AnnData(X=sp.csr_matrix(lognorm), obs=obs, var=pd.DataFrame(index=["A", "B", "C", "D", "E"]))
    adata.raw = ad.AnnData(X=sp.csr_matrix(counts[:, :4]), var=pd.DataFrame(index=["D", "C", "B", "A"]))
    path = tmp_path / "lacking.h5ad"
    adata.write_h5ad(path)
    assert input_error(read_h5ad, path, "cell_type", stream=stream, counts_raw=True) == (
        f"{path} raw.X: lacks 1 of X's 5 genes (first: 'E'); expected raw counts for every gene of X"
    )
    bad = counts.copy()
    bad[3, 1] = -2
    adata.raw = ad.AnnData(X=sp.csr_matrix(bad[:, ::-1]), var=pd.DataFrame(index=["E", "D", "C", "B", "A"]))
    adata.write_h5ad(path)
    assert input_error(read_h5ad, path, "cell_type", stream=stream, counts_raw=True) == (  # column as stored in raw.X
        f"{path} raw.X: holds -2 at row 3, column 3, which is not a count; expected raw counts (non-negative whole numbers)"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_dense_adata_raw_with_more_genes_is_checked_on_x_genes_only(tmp_path, stream):
    counts, lognorm = counts_and_lognorm(20, 5)
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels_for(20))}, index=[f"c{i}" for i in range(20)])
    adata = ad.AnnData(X=sp.csr_matrix(lognorm), obs=obs, var=pd.DataFrame(index=["A", "B", "C", "D", "E"]))
    extra = np.full((20, 1), 0.5)  # a gene X does not have, and not counts: not checked, not used
    adata.raw = ad.AnnData(X=np.hstack([extra, counts[:, ::-1]]), var=pd.DataFrame(index=["x", "E", "D", "C", "B", "A"]))
    path = tmp_path / "dense_raw.h5ad"
    adata.write_h5ad(path)
    ds = read_h5ad(path, "cell_type", stream=stream, counts_raw=True)
    np.testing.assert_array_equal(np.asarray(ds.count_source().tensor(slice(None))), counts)
    bad = np.hstack([extra, counts[:, ::-1]])
    bad[3, 2] = 1.25
    adata.raw = ad.AnnData(X=bad, var=pd.DataFrame(index=["x", "E", "D", "C", "B", "A"]))
    path = tmp_path / "bad_raw.h5ad"
    adata.write_h5ad(path)
    assert input_error(read_h5ad, path, "cell_type", stream=stream, counts_raw=True) == (  # column as stored in raw.X
        f"{path} raw.X: holds 1.25 at row 3, column 2, which is not a count; expected raw counts (non-negative whole numbers)"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_read_counts_labels_with_raw_counts(tmp_path, stream):
    counts, lognorm = counts_and_lognorm()
    counts_path, labels_path = write_pair(tmp_path, lognorm, labels_for(30))
    np.save(tmp_path / "raw.npy", counts.astype(np.int64))
    ds = read_counts_labels(counts_path, labels_path, stream=stream, raw_counts_path=tmp_path / "raw.npy")
    assert not ds.counts and ds.on_disk == stream and ds.raw_origin == str(tmp_path / "raw.npy")
    np.testing.assert_array_equal(ds.count_source().tensor(slice(None)).numpy(), counts)
    before = fingerprint(tmp_path / "raw.npy")
    np.save(tmp_path / "short.npy", counts[:20])
    assert input_error(read_counts_labels, counts_path, labels_path, stream=stream, raw_counts_path=tmp_path / "short.npy") == (
        f"{tmp_path / 'short.npy'}: has shape (20, 8) but {counts_path} has shape (30, 8); "
        "expected raw counts of the same cells and genes"
    )
    bad = counts.copy()
    bad[12, 7] = 0.25
    np.save(tmp_path / "bad.npy", bad)
    assert input_error(read_counts_labels, counts_path, labels_path, stream=stream, raw_counts_path=tmp_path / "bad.npy") == (
        f"{tmp_path / 'bad.npy'}: holds 0.25 at row 12, column 7, which is not a count; "
        "expected raw counts (non-negative whole numbers)"
    )
    assert input_error(read_counts_labels, counts_path, labels_path, raw_counts_path=tmp_path / "absent.npy") == (
        f"{tmp_path / 'absent.npy'}: raw counts file not found"
    )
    assert fingerprint(tmp_path / "raw.npy") == before  # never modified
    # a counts matrix of integers is its own source of counts: the raw counts file is not read
    own = read_counts_labels(tmp_path / "raw.npy", labels_path, raw_counts_path=tmp_path / "absent.npy")
    assert own.counts and own.raw is None and own.raw_origin == str(tmp_path / "raw.npy")


# ---------------------------------------------------------------- gene selection
def test_select_genes_of_counts_normalises_with_every_gene(tmp_path):
    counts, _ = counts_and_lognorm(30, 8, seed=1)
    counts[3] = 0
    counts[3, 7] = 5  # a cell whose only count lies outside the selected genes
    genes = np.array([0, 2, 5])
    labels = labels_for(30)
    by_hand = np.zeros((30, 3))
    for i in range(30):  # log1p(count / library over ALL 8 genes × 1e4)
        library = float(sum(counts[i]))
        for k, j in enumerate(genes):
            by_hand[i, k] = math.log1p(counts[i, j] / library * 1e4)
    path = tmp_path / "c.h5ad"
    ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame({"t": labels}, index=[f"c{i}" for i in range(30)])).write_h5ad(path)
    datasets = {
        "dense": make_dataset(counts, labels), "sparse": make_dataset(sp.csr_matrix(counts), labels),
        "streamed": read_h5ad(path, "t", stream=True),
    }
    selected = {}
    for kind, ds in datasets.items():
        assert ds.counts
        sub = ds.select_genes(genes)
        selected[kind] = sub
        assert sub.n_genes == 3 and not sub.counts and sub.has_counts and sub.raw_origin == "X"
        assert sub.var_names.tolist() == [ds.var_names[j] for j in genes]
        model_input = sub.source().tensor(slice(None)).numpy()
        np.testing.assert_allclose(model_input, by_hand, rtol=1e-6, err_msg=kind)
        assert not np.any(model_input[3])  # 5 counts, all in a gene left out: zeros, not NaN
        np.testing.assert_array_equal(sub.count_source().tensor(slice(None)).numpy(), counts[:, genes], err_msg=kind)
        assert sub.on_disk == (kind == "streamed")
        s = sub.summary()
        assert s["gene_selection"] == {"n_genes": 3, "n_genes_before": 8} and s["count_data"] == "X"
        assert s["model_input"] == ("log1p(counts / library size × 1e4), each cell's library over all 8 genes; "
                                    "3 of 8 genes selected")
    streamed, in_memory = selected["streamed"], selected["sparse"]
    np.testing.assert_array_equal(streamed.source().tensor(slice(None)).numpy(), in_memory.source().tensor(slice(None)).numpy())
    s, m = streamed.summary(), in_memory.summary()
    for key in ("zero_fraction", "value_min", "value_max", "constant_genes", "n_genes", "count_data", "model_input"):
        assert s[key] == pytest.approx(m[key]), key
    rows = np.array([1, 4])
    np.testing.assert_array_equal(  # row subsets of the selection stay right, raw or not
        streamed.source().subset(rows).raw().tensor(slice(None)).numpy(), counts[rows][:, genes]
    )


def test_select_genes_of_lognormalised_data_with_raw_counts(tmp_path):
    counts, lognorm = counts_and_lognorm(30, 8, seed=2)
    ds = make_dataset(sp.csr_matrix(lognorm), labels_for(30), raw=counts, raw_origin="given")
    genes = np.array([1, 6, 7])
    sub = ds.select_genes(genes)
    np.testing.assert_array_equal(sub.X.toarray(), lognorm[:, genes])
    np.testing.assert_array_equal(sub.count_source().tensor(slice(None)).numpy(), counts[:, genes])
    assert sub.summary()["model_input"] == "as given; 3 of 8 genes selected" and sub.raw_origin == "given"
    np.save(tmp_path / "x.npy", lognorm)
    np.save(tmp_path / "r.npy", counts)
    (tmp_path / "l.txt").write_text("\n".join(labels_for(30)) + "\n")
    streamed = read_counts_labels(tmp_path / "x.npy", tmp_path / "l.txt", stream=True, raw_counts_path=tmp_path / "r.npy")
    on_disk = streamed.select_genes(genes)
    assert on_disk.on_disk and on_disk.raw.on_disk
    np.testing.assert_array_equal(on_disk.source().tensor(slice(None)).numpy(), lognorm[:, genes])
    np.testing.assert_array_equal(on_disk.count_source().tensor(slice(None)).numpy(), counts[:, genes])
    assert "dense, memory-mapped, streamed from" in on_disk.summary()["storage"]


def test_select_genes_fingerprint_and_refusals():
    counts, lognorm = counts_and_lognorm()
    ds = make_dataset(lognorm, labels_for(30), raw=counts)
    a, b = ds.select_genes(np.array([0, 1, 2])), ds.select_genes(np.array([0, 1, 3]))
    assert a.fingerprint() != b.fingerprint() != ds.fingerprint()
    assert a.fingerprint() == ds.select_genes(np.array([0, 1, 2])).fingerprint()
    assert a.fingerprint()["selected_from"] == ds.fingerprint()
    other_raw = make_dataset(lognorm, labels_for(30), raw=counts + 1).select_genes(np.array([0, 1, 2]))
    assert other_raw.fingerprint() != a.fingerprint()
    for genes, message in [
        (np.array([2, 1]), "sorted and distinct"), (np.array([1, 1]), "sorted and distinct"),
        (np.array([0, 8]), "0…7"), (np.array([], dtype=int), "non-empty"), (np.array([0.0, 1.0]), "gene indices"),
    ]:
        with pytest.raises(ValueError, match=message):
            ds.select_genes(genes)
    with pytest.raises(ValueError, match="X holds counts here"):
        Dataset(X=counts, labels=np.array(labels_for(30)), name="x", counts=True, raw=counts)


def test_labels_read_in_chunks_give_the_same_lines_whatever_the_chunk_size(tmp_path):
    from scae.data import _read_label_text

    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffT cell\r\nB cell\rNK\r\nmonocyte\n\nγδ T\r\n".encode())
    expected = "T cell\nB cell\nNK\nmonocyte\n\nγδ T\n"
    for chunk in (1, 2, 3, 5, 7, 1 << 20):  # \r\n and multi-byte characters split between chunks
        assert _read_label_text(path, chunk) == expected


@pytest.mark.parametrize("content", [b"\0" * (3 << 20), b"a" * 5_000_000 + b"\nb\n", b"x\n" * 3 + b"y" * 1001 + b"\n"])
def test_a_label_line_longer_than_the_limit_is_refused_without_reading_everything(tmp_path, content):
    path = tmp_path / "labels.txt"
    path.write_bytes(content)
    line = 4 if content.startswith(b"x") else 1
    with pytest.raises(ScaeInputError, match=f"line {line} is longer than 1,000 characters; expected one label per line"):
        read_labels_txt(path)


def test_an_endless_labels_device_is_refused(tmp_path):
    for device in ("/dev/zero", "/dev/urandom"):  # refused before a byte is read
        with pytest.raises(ScaeInputError, match="is a device; expected a labels file stored as a regular file"):
            read_labels_txt(device)
    binary = tmp_path / "labels.bin"
    binary.write_bytes(np.random.default_rng(0).integers(128, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ScaeInputError, match="not UTF-8 text"):
        read_labels_txt(binary)


@pytest.mark.parametrize("n_cols", [7, 70_000])  # a radix sort by column up to 65,536 columns, a plain one above
def test_column_extremes_of_scattered_values_match_ufunc_at(n_cols):
    from scae.data import _column_extremes

    rng = np.random.default_rng(n_cols)
    columns = rng.integers(0, n_cols, 5000).astype(np.int32)
    columns[:3] = n_cols - 1  # the last column, which a narrow key would wrap
    low, high = rng.normal(0, 5, 5000).astype(np.float32), rng.normal(0, 5, 5000).astype(np.float32)
    expected_low, expected_high = np.full(n_cols, np.inf), np.full(n_cols, -np.inf)
    np.minimum.at(expected_low, columns, low)
    np.maximum.at(expected_high, columns, high)
    got_low, got_high = _column_extremes(low, high, columns, n_cols)
    np.testing.assert_array_equal(got_low, expected_low)
    np.testing.assert_array_equal(got_high, expected_high)
    assert np.isinf(got_low).any() == (np.unique(columns).size < n_cols)  # columns without values stay ±inf
    empty = _column_extremes(low[:0], high[:0], columns[:0], n_cols)
    assert np.all(empty[0] == np.inf) and np.all(empty[1] == -np.inf)


@pytest.mark.parametrize("stream", [False, True])
def test_a_file_with_graphs_in_the_old_uns_place_reads_without_warnings(tmp_path, stream, recwarn):
    """scanpy's example files keep the neighbour graphs in uns["neighbors"], where anndata warns
    that it moves them to obsp; the file reads fine, so the user sees no warning."""
    import warnings

    X = sp.csr_matrix(blob(30, 8, seed=3))
    adata = ad.AnnData(X=X, obs=pd.DataFrame({"cell_type": labels_for(30)}, index=[f"c{i}" for i in range(30)]))
    graph = sp.csr_matrix(np.eye(30, dtype=np.float32))
    adata.uns["neighbors"] = {"distances": graph, "connectivities": graph, "params": {"n_neighbors": 1}}
    adata.write_h5ad(tmp_path / "old.h5ad")
    with warnings.catch_warnings(record=True) as direct:  # the warning this test is about does happen
        warnings.simplefilter("always")
        ad.read_h5ad(tmp_path / "old.h5ad")
    assert any("Moving element from .uns" in str(w.message) for w in direct)
    recwarn.clear()
    dataset = read_h5ad(tmp_path / "old.h5ad", "cell_type", stream=stream)
    assert (dataset.n_cells, dataset.n_genes) == (30, 8)
    assert [str(w.message) for w in recwarn] == []


def test_a_column_or_a_generator_of_labels_is_taken():
    X = blob(6, 5)
    assert list(make_dataset(X, np.array([["a"], ["b"]] * 3)).labels) == ["a", "b"] * 3
    assert list(make_dataset(X, (c for c in "ababab")).labels) == ["a", "b"] * 3


def test_labels_of_two_dimensions_are_refused():
    msg = input_error(make_dataset, blob(50, 5), np.array([["a", "b"]] * 25))
    assert msg == "labels: the label array has shape (25, 2); expected one label per cell (a 1-D sequence)"
    assert input_error(make_dataset, blob(4, 5), [["a", "b"], ["a", "b"]]).endswith("has shape (2, 2); expected one "
                                                                                   "label per cell (a 1-D sequence)")


def test_an_anndata_without_x_a_backed_one_and_a_nullable_table_get_their_own_message(tmp_path):
    """Each was reported as 'dtype object'."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's, about the empty or backed object
        empty = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(4)]))
        assert input_error(as_matrix, empty) == "matrix: the AnnData holds no X; expected a cells × genes matrix in X"
        ad.AnnData(sp.csr_matrix(np.eye(6, 4, dtype=np.float32))).write_h5ad(tmp_path / "b.h5ad")
        backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
        assert "the AnnData is backed by its file and its X not loaded; expected it in memory " \
               "(adata.to_memory())" in input_error(as_matrix, backed)
        from scae import embed

        assert "is still in its file (a backed AnnData); expected it in memory" in input_error(embed, backed)
        backed.file.close()
    table = pd.DataFrame(np.arange(12, dtype=float).reshape(4, 3)).astype("Float64")
    assert np.array_equal(as_matrix(table), np.arange(12, dtype=np.float32).reshape(4, 3))
    table.iloc[1, 2] = pd.NA
    assert input_error(as_matrix, table).startswith("matrix: 1 NaN or infinite value(s), first at row 1, column 2")
    # only nullable numbers are converted: text and times are refused by their dtype, as before
    for other in (pd.DataFrame({"a": ["1", "2"], "b": ["3", "4"]}), pd.DataFrame({"a": pd.to_timedelta([1, 2], unit="s")}),
                  pd.DataFrame({"a": pd.to_datetime(["2020-01-01", "2021-01-01"]), "b": [1.0, 2.0]})):
        assert "matrix has dtype" in input_error(as_matrix, other)


def test_values_beyond_a_log_scale_used_as_given_get_a_note():
    rng = np.random.default_rng(0)
    corrected = rng.poisson(50.0, size=(60, 12)) * 0.85  # counts that are not whole numbers
    labels = np.repeat(["a", "b", "c"], 20)
    note = scae.make_dataset(corrected, labels).scale_note()
    assert note is not None and f"they reach {corrected.max():.4g}" in note and "--normalize log1p" in note
    assert scae.make_dataset(corrected, labels).summary()["scale_note"] == note
    assert scae.make_dataset(corrected, labels, normalize="log1p").scale_note() is None  # taken as counts
    assert scae.make_dataset(corrected, labels, normalize="none").scale_note() is None  # as given, as asked
    assert scae.make_dataset(np.log1p(corrected), labels).scale_note() is None  # a log scale
    assert scae.make_dataset(corrected - 50.0, labels).scale_note() is None  # negative: not counts


def test_counts_raw_reads_the_old_anndata_layout_of_raw(tmp_path):
    """Files of older anndata versions (scanpy's pbmc68k_reduced) keep adata.raw as raw.X and raw.var
    at the top level; anndata reads them, and so does --counts-raw."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, size=(90, 10)).astype(np.float32)
    lognorm = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    adata = ad.AnnData(lognorm, obs=pd.DataFrame({"cell_type": np.repeat(["a", "b", "c"], 30)},
                                                 index=[f"c{i}" for i in range(90)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(10)]))
    adata.raw = ad.AnnData(counts, var=adata.var)
    path = tmp_path / "old.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as handle:
        for key in ("X", "var", "varm"):
            if f"raw/{key}" in handle:
                handle.move(f"raw/{key}", f"raw.{key}")
        del handle["raw"]
    assert np.array_equal(ad.read_h5ad(path).raw.X, counts)  # anndata's own reading
    data = scae.read_h5ad(path, "cell_type", counts_raw=True)
    assert data.raw_origin == "adata.raw"
    assert np.array_equal(np.asarray(data.raw.toarray() if hasattr(data.raw, "toarray") else data.raw), counts)


def test_submodules_are_reached_from_the_package_without_importing_them_first():
    code = "import scae, sys; f = scae.genes.highly_variable_genes; print(callable(f), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=scae_env(), timeout=120)
    assert out.stdout.split() == ["True", "False"], out.stderr
    with pytest.raises(AttributeError, match="module 'scae' has no attribute 'no_such_module'"):
        scae.no_such_module  # noqa: B018
    with pytest.raises(AttributeError, match="module 'scae' has no attribute 'templates'"):  # a folder, not a module
        scae.templates  # noqa: B018


def test_the_fingerprint_of_raw_counts_does_not_depend_on_how_their_path_is_spelt(tmp_path, monkeypatch):
    """--resume compares fingerprints: raw_counts.npy given as an absolute path, then as a relative
    one (or from another folder), refused every model as trained on another input."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(40, 6)).astype(np.float32)
    lognorm = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4).astype(np.float32)
    np.save(tmp_path / "x.npy", lognorm)
    np.save(tmp_path / "raw.npy", counts)
    (tmp_path / "l.txt").write_text("\n".join("ab"[i % 2] for i in range(40)) + "\n")
    absolute = read_counts_labels(tmp_path / "x.npy", tmp_path / "l.txt", raw_counts_path=tmp_path / "raw.npy")
    monkeypatch.chdir(tmp_path)
    relative = read_counts_labels("x.npy", "l.txt", raw_counts_path="raw.npy")
    assert absolute.fingerprint() == relative.fingerprint()
    np.save(tmp_path / "raw.npy", counts + 1)  # other counts: another fingerprint
    assert read_counts_labels("x.npy", "l.txt", raw_counts_path="raw.npy").fingerprint() != absolute.fingerprint()
