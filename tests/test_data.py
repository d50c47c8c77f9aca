"""Input data: readers, validation, error messages and the stratified split."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scae import Dataset, ScaeInputError, make_dataset, read_counts_labels, read_h5ad
from scae.data import as_matrix, read_labels_txt, stratified_split


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


def test_single_label_refused(tmp_path):
    counts, lab = write_pair(tmp_path, blob(6, 4), ["same"] * 6)
    msg = input_error(read_counts_labels, counts, lab)
    assert str(counts) in msg
    assert "only 1 distinct label" in msg


def test_empty_line_inside_labels(tmp_path):
    counts, lab = write_pair(tmp_path, blob(4, 3), None, labels_text="a\nb\n\na\nb\n")
    msg = input_error(read_counts_labels, counts, lab)
    assert str(lab) in msg
    assert "line 3 is empty" in msg


def test_labels_not_utf8(tmp_path):
    counts, lab = write_pair(tmp_path, blob(2, 3), ["a", "b"])
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


def test_read_h5ad_single_label_refused(h5ad_files):
    msg = input_error(read_h5ad, h5ad_files["dense"], "batch")
    assert str(h5ad_files["dense"]) in msg and "only 1 distinct label" in msg


def test_read_h5ad_missing_labels_refused(tmp_path):
    obs = pd.DataFrame({"ct": pd.Categorical(["a", None, "b", "a"])}, index=list("wxyz"))
    path = tmp_path / "m.h5ad"
    ad.AnnData(X=blob(4, 3), obs=obs).write_h5ad(path)
    msg = input_error(read_h5ad, path, "ct")
    assert str(path) in msg and "without a label" in msg and "cell 1" in msg


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
    assert "without a label" in msg and "cell 1" in msg
    msg = input_error(make_dataset, blob(3, 3), ["a", "a", "a"], source="src.npy")
    assert "only 1 distinct label" in msg


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
    "labels",
    [
        ["a", "a", "a", "b"],  # label 'b' has a single cell
        ["a", "a", "b", "b"],  # 1 test cell for 2 labels
        ["a"] * 3 + ["b"] * 3 + ["c"] * 3,  # 2 test cells for 3 labels
    ],
)
def test_split_too_few_cells(labels):
    msg = input_error(stratified_split, np.array(labels), 0.2, 0)
    assert "too few cells" in msg
    assert f"{len(labels)} cells" in msg
    assert f"{len(set(labels))} labels" in msg


def test_split_smallest_label_named():
    msg = input_error(stratified_split, np.array(["a"] * 10 + ["rare"]), 0.2, 0)
    assert "label 'rare' has 1 cell(s)" in msg


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
