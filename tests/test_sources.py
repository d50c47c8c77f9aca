"""Row sources (in memory, streamed .h5ad, memory-mapped .npy), shuffles, sharded prefetching
loaders, and streamed inputs through the readers, the estimator and the study."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scae
from conftest import write_h5ad
from scae.data import read_counts_labels, read_h5ad
from scae.errors import ScaeInputError
from scae.simulate import simulate_counts
import scae.data
import scae.models
import scae.training
from scae.sources import (
    ArraySource,
    BatchLoader,
    DeviceSource,
    H5CSRSource,
    NpySource,
    epoch_order,
    normalize_counts,
    normalize_counts_tensor,
    on_device,
)

CELLS, GENES = 240, 40


@pytest.fixture(scope="module")
def raw_counts() -> tuple[sp.csr_matrix, np.ndarray]:
    counts, labels = simulate_counts(CELLS, GENES, 3, seed=5)
    return counts, np.char.add("type", labels.astype(str))


@pytest.fixture(scope="module")
def counts_h5ad(tmp_path_factory, raw_counts):
    path = tmp_path_factory.mktemp("h5") / "raw.h5ad"
    write_h5ad(path, raw_counts[0], raw_counts[1])
    return path


def reference_log1p_cp10k(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    sums = X.sum(axis=1, keepdims=True)
    out = np.zeros_like(X)
    np.divide(X * 1e4, sums, out=out, where=sums > 0)
    return np.log1p(out)


# ---------------------------------------------------------------- normalisation
def test_normalize_counts_matches_reference_dense_sparse_and_torch():
    rng = np.random.default_rng(0)
    X = rng.poisson(0.7, size=(30, 12)).astype(np.float32)
    X[3] = 0  # a cell without counts stays all zero
    expected = reference_log1p_cp10k(X)
    np.testing.assert_allclose(normalize_counts(X), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normalize_counts(sp.csr_matrix(X)).toarray(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normalize_counts_tensor(torch.from_numpy(X)).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.any(normalize_counts(X)[3])


def test_normalized_simulated_counts_are_the_builtin_dataset(raw_counts):
    counts, _ = simulate_counts(CELLS, GENES, 3, seed=5)
    builtin = scae.simulate_dataset(CELLS, GENES, 3, seed=5).X.toarray()
    np.testing.assert_allclose(normalize_counts(counts).toarray(), builtin, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sources
@pytest.mark.parametrize("rows", [
    np.arange(CELLS), np.array([0]), np.array([5, 6, 7, 200, 201, 239]), np.arange(0, CELLS, 7),
])
def test_h5_source_reads_the_same_rows_as_memory(counts_h5ad, raw_counts, rows):
    X = raw_counts[0]
    disk, memory = H5CSRSource(counts_h5ad), ArraySource(X)
    assert disk.shape == memory.shape == X.shape and disk.on_disk and not memory.on_disk
    np.testing.assert_array_equal(disk.read(rows).toarray(), X[rows].toarray())
    np.testing.assert_array_equal(disk.tensor(rows).numpy(), memory.tensor(rows).numpy())


def test_h5_source_reads_with_few_big_range_reads(counts_h5ad, raw_counts, monkeypatch):
    source = H5CSRSource(counts_h5ad)
    calls = []
    original = source.read_range
    monkeypatch.setattr(source, "read_range", lambda a, b: calls.append((a, b)) or original(a, b))
    source.read(np.array([1, 3, 10, 100, 101, 239]))  # gaps under MAX_GAP: one contiguous range
    assert calls == [(1, 240)]


def test_subsets_compose_and_counts_normalise(counts_h5ad, raw_counts):
    X = raw_counts[0].toarray()
    source = H5CSRSource(counts_h5ad, counts=True)
    outer = np.arange(10, 200, 3)
    sub = source.subset(outer).subset(np.array([0, 2, 5]))
    expected = reference_log1p_cp10k(X[outer[[0, 2, 5]]])
    np.testing.assert_allclose(sub.tensor(slice(None)).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sub.matrix().toarray(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sorted"):
        source.subset(np.array([3, 1]))


def test_npy_source_is_memory_mapped(tmp_path, raw_counts):
    X = raw_counts[0].toarray()
    np.save(tmp_path / "m.npy", X)
    source = NpySource(tmp_path / "m.npy")
    assert isinstance(source._array, np.memmap)
    np.testing.assert_array_equal(source.tensor(np.array([2, 3, 9])).numpy(), X[[2, 3, 9]])


def test_h5_source_pickles_without_its_file_handle(counts_h5ad):
    import pickle

    source = H5CSRSource(counts_h5ad)
    source.read(np.array([0, 1]))
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy.read(np.array([4])).toarray(), source.read(np.array([4])).toarray())


# ---------------------------------------------------------------- shuffles and loaders
def test_epoch_order_is_a_seeded_permutation():
    for block in (None, 10):
        a = epoch_order(1000, np.random.default_rng(3), block, 4)
        b = epoch_order(1000, np.random.default_rng(3), block, 4)
        c = epoch_order(1000, np.random.default_rng(4), block, 4)
        np.testing.assert_array_equal(np.sort(a), np.arange(1000))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_block_order_windows_hold_whole_blocks():
    order = epoch_order(1000, np.random.default_rng(0), 10, 4)
    for w in range(0, 1000, 40):
        blocks = np.unique(order[w : w + 40] // 10)
        assert blocks.size == 4  # each window is four whole blocks, shuffled row by row
    assert not np.array_equal(order[:40], np.sort(order[:40]))


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_make_up_the_global_batch(counts_h5ad, raw_counts, on_disk, world):
    source = H5CSRSource(counts_h5ad) if on_disk else ArraySource(raw_counts[0])
    order = np.random.default_rng(1).permutation(CELLS)
    single = list(BatchLoader(source, order, 50, window_rows=64))
    shards = [list(BatchLoader(source, order, 50, rank=r, world_size=world, window_rows=64)) for r in range(world)]
    assert len(single) == 5 and all(len(s) == 5 for s in shards)
    def row_set(M: np.ndarray) -> np.ndarray:  # a batch's rows, whatever their order inside it
        return M[np.lexsort(M.T[::-1])]

    for i, (x, n) in enumerate(single):
        assert n == x.shape[0] == min(50, CELLS - 50 * i)
        joined = torch.cat([shards[r][i][0] for r in range(world)])
        np.testing.assert_array_equal(row_set(joined.numpy()), row_set(x.numpy()))
        np.testing.assert_array_equal(row_set(x.numpy()), row_set(raw_counts[0][order[50 * i : 50 * i + 50]].toarray()))


def test_prefetch_passes_errors_on_and_stops_early(counts_h5ad):
    class Broken(H5CSRSource):
        def _read(self, rows):
            if rows.min() > 100:
                raise OSError("disk went away")
            return super()._read(rows)

    source = Broken(counts_h5ad)
    loader = BatchLoader(source, np.arange(CELLS), 32, prefetch=2, window_rows=32)
    with pytest.raises(OSError, match="disk went away"):
        list(loader)
    for i, _ in enumerate(BatchLoader(H5CSRSource(counts_h5ad), np.arange(CELLS), 8, prefetch=2, window_rows=8)):
        if i == 2:
            break  # the producer thread must not block the interpreter after this
    import threading

    assert not any(t.name == "scae-prefetch" and t.is_alive() for t in threading.enumerate())


# ---------------------------------------------------------------- readers
def test_streamed_h5ad_detects_counts_and_matches_in_memory(counts_h5ad, raw_counts):
    streamed = read_h5ad(counts_h5ad, "cell_type", stream=True)
    loaded = read_h5ad(counts_h5ad, "cell_type", stream=False)
    assert streamed.on_disk and not loaded.on_disk
    assert streamed.counts and loaded.counts
    s, m = streamed.summary(), loaded.summary()
    for key in ("n_cells", "n_genes", "zero_fraction", "value_min", "value_max", "label_counts", "raw_counts"):
        assert s[key] == pytest.approx(m[key]), key
    np.testing.assert_array_equal(streamed.labels, loaded.labels)
    np.testing.assert_array_equal(streamed.var_names, loaded.var_names)
    rows = np.array([0, 7, 100])
    np.testing.assert_allclose(streamed.source().tensor(rows).numpy(), loaded.source().tensor(rows).numpy(), rtol=1e-6)
    assert not read_h5ad(counts_h5ad, "cell_type", stream=True, normalize="none").counts
    assert streamed.to_anndata().X is None  # data streamed from disk is not copied


def test_streamed_layer(tmp_path, raw_counts):
    path = tmp_path / "layer.h5ad"
    write_h5ad(path, raw_counts[0], raw_counts[1], layer="counts")
    ds = read_h5ad(path, "cell_type", layer="counts", stream=True)
    assert ds.on_disk and ds.counts and ds.X.key == "layers/counts"
    with pytest.raises(ScaeInputError, match="no layer 'nope'; available layers: counts"):
        read_h5ad(path, "cell_type", layer="nope", stream=True)


def test_lognormalized_input_is_not_taken_for_counts(tmp_path):
    ds = scae.simulate_dataset(60, 20, 3, seed=0)
    write_h5ad(tmp_path / "log.h5ad", ds.X, ds.labels)
    assert not read_h5ad(tmp_path / "log.h5ad", "cell_type", stream=True).counts
    with pytest.raises(ScaeInputError, match="--normalize log1p needs counts, but the matrix holds negative values"):
        scae.make_dataset(-ds.X.toarray(), ds.labels, normalize="log1p")


def test_stream_refuses_csc(tmp_path, raw_counts):
    path = tmp_path / "x.h5ad"
    write_h5ad(path, sp.csc_matrix(raw_counts[0]), raw_counts[1])
    with pytest.raises(ScaeInputError, match="is stored as CSC .column-compressed.; streaming from disk needs a CSR"):
        read_h5ad(path, "cell_type", stream=True)
    assert read_h5ad(path, "cell_type").n_cells == CELLS  # without streaming it loads


def test_a_dense_h5ad_streams_like_a_csr_one(tmp_path, raw_counts, monkeypatch):
    """Read by row ranges from the HDF5 dataset: the same rows, the same checks, the same
    training as the CSR file of the same matrix."""
    for module in (scae.sources, scae.training):  # several blocks and windows of 2 blocks
        monkeypatch.setattr(module, "DISK_BLOCK_ROWS", 16)
    monkeypatch.setattr(scae.sources, "DISK_WINDOW_BLOCKS", 2)
    write_h5ad(tmp_path / "dense.h5ad", raw_counts[0].toarray(), raw_counts[1])
    write_h5ad(tmp_path / "csr.h5ad", raw_counts[0], raw_counts[1])
    dense = read_h5ad(tmp_path / "dense.h5ad", "cell_type", stream=True)
    csr = read_h5ad(tmp_path / "csr.h5ad", "cell_type", stream=True)
    assert type(dense.X).__name__ == "H5DenseSource" and dense.on_disk and dense.counts
    assert dense.summary()["storage"] == f"dense, streamed from {tmp_path / 'dense.h5ad'}"
    assert dense.summary()["zero_fraction"] == csr.summary()["zero_fraction"]
    assert dense.summary()["constant_genes"] == csr.summary()["constant_genes"]
    rows = np.array([0, 1, 2, 40, 41, 200, CELLS - 1])  # runs and gaps
    np.testing.assert_array_equal(dense.X.read(rows), raw_counts[0][rows].toarray())
    assert dense.X.read(np.array([], dtype=np.int64)).shape == (0, GENES)
    again = pickle.loads(pickle.dumps(dense.X))  # a worker process opens the file again
    np.testing.assert_array_equal(again.read(slice(5, 9)), raw_counts[0][5:9].toarray())
    params = dict(latent_dim=3, hidden=(8,), loss="nb", epochs=2, batch_size=16, device="cpu")
    split = np.arange(0, CELLS, 2)
    a = scae.Autoencoder(**params).fit(dense.count_source().subset(split))
    b = scae.Autoencoder(**params).fit(csr.count_source().subset(split))
    assert a.history_ == b.history_


def test_a_dense_h5ad_above_the_stream_size_is_streamed(tmp_path, raw_counts, monkeypatch):
    monkeypatch.setattr(scae.data, "STREAM_BYTES", 4 * CELLS * GENES - 1)
    write_h5ad(tmp_path / "dense.h5ad", raw_counts[0].toarray(), raw_counts[1])
    assert read_h5ad(tmp_path / "dense.h5ad", "cell_type").on_disk
    monkeypatch.setattr(scae.data, "STREAM_BYTES", 4 * CELLS * GENES)
    assert not read_h5ad(tmp_path / "dense.h5ad", "cell_type").on_disk


def test_stream_refuses_damaged_files(tmp_path, counts_h5ad, raw_counts):
    truncated = tmp_path / "cut.h5ad"
    truncated.write_bytes(counts_h5ad.read_bytes()[:5000])
    with pytest.raises(ScaeInputError, match="cannot be read as an AnnData .h5ad file"):
        read_h5ad(truncated, "cell_type", stream=True)
    (tmp_path / "text.h5ad").write_text("hello")
    with pytest.raises(ScaeInputError, match="not HDF5"):
        read_h5ad(tmp_path / "text.h5ad", "cell_type")
    bad = raw_counts[0].copy()
    bad.data[bad.indptr[17] + 1] = np.nan
    write_h5ad(tmp_path / "nan.h5ad", bad, raw_counts[1])
    with pytest.raises(ScaeInputError, match="first at row 17, column"):
        read_h5ad(tmp_path / "nan.h5ad", "cell_type", stream=True)
    with pytest.raises(ScaeInputError, match="no obs column 'nope'"):
        read_h5ad(counts_h5ad, "nope", stream=True)


def test_streamed_npy(tmp_path, raw_counts):
    X = raw_counts[0].toarray()
    np.save(tmp_path / "c.npy", X)
    (tmp_path / "l.txt").write_text("\n".join(raw_counts[1]) + "\n")
    ds = read_counts_labels(tmp_path / "c.npy", tmp_path / "l.txt", stream=True)
    assert ds.on_disk and ds.counts
    assert ds.summary()["zero_fraction"] == pytest.approx(1 - np.count_nonzero(X) / X.size)
    X[4, 2] = np.inf
    np.save(tmp_path / "bad.npy", X)
    with pytest.raises(ScaeInputError, match="first at row 4, column 2"):
        read_counts_labels(tmp_path / "bad.npy", tmp_path / "l.txt", stream=True)


# ---------------------------------------------------------------- training and the study, streamed
def test_fit_streamed_equals_fit_in_memory(counts_h5ad, raw_counts):
    """Below one shuffle window the disk order is a plain permutation: identical training."""
    streamed = read_h5ad(counts_h5ad, "cell_type", stream=True).source()
    memory = ArraySource(normalize_counts(raw_counts[0]).toarray())
    train, test = np.arange(0, CELLS, 2)[:-10], np.arange(1, CELLS, 2)
    params = dict(latent_dim=4, hidden=(16,), epochs=3, batch_size=32, device="cpu")
    a = scae.Autoencoder(**params).fit(streamed.subset(train), eval_X=streamed.subset(test))
    b = scae.Autoencoder(**params).fit(memory.subset(train), eval_X=memory.subset(test))
    for ra, rb in zip(a.history_, b.history_):
        for key in ("train_loss", "test_loss", "test_mse"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5)
    assert a.train_cells_per_second_ > 0 and a.train_seconds_ <= a.fit_seconds_
    np.testing.assert_allclose(a.transform(streamed), b.transform(memory), rtol=1e-4, atol=1e-5)


FAST = dict(epochs=1, progress=False, kmeans_seeds=1, hidden=(16,),
            tsne=scae.TSNEConfig(early_exaggeration_iter=30, n_iter=30))


def test_study_streamed_with_sampled_reconstructions_and_resume(counts_h5ad, tmp_path):
    ds = read_h5ad(counts_h5ad, "cell_type", stream=True)
    out = tmp_path / "out"
    config = scae.StudyConfig(max_layer_entries=2000, sample_layer_entries=2000, max_embed_cells=200, **FAST)
    result = scae.run_study(ds, out, config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["raw_counts"] is True
    assert metrics["outputs"]["reconstructions"] == "reconstructions.h5ad (50 scored cells)"
    for name, run in metrics["runs"].items():
        assert run["timings"]["train_cells_per_second"] > 0 and run["resumed"] is False
        assert result.runs[name].reconstruction is None
    results = ad.read_h5ad(out / "results.h5ad")
    assert results.X is None and not results.layers and results.obsm["X_ae10"].shape == (CELLS, 10)
    sample = ad.read_h5ad(out / "reconstructions.h5ad")
    assert sample.shape == (50, GENES) and set(sample.layers) == {f"{n}_reconstruction" for n in metrics["runs"]}
    rows = result.sample_rows  # a seeded random sample of the scored cells, in file order
    assert rows.size == 50 and np.all(np.diff(rows) > 0) and np.isin(rows, result.embed_idx).all()
    assert rows[-1] > 100  # not just the first cells of the file
    np.testing.assert_array_equal(sample.obs_names, np.asarray(ds.obs_names)[rows])
    # the input's model view (normalised counts) of the sampled cells, and their reconstructions
    np.testing.assert_allclose(sample.X.toarray(), ds.source().tensor(rows).numpy(), rtol=1e-6)
    np.testing.assert_allclose(sample.layers["ae10_reconstruction"], result.runs["ae10"].model.reconstruct(ds.source().subset(rows)), rtol=1e-5, atol=1e-6)
    assert "log1p(counts / library size" in (out / "report.html").read_text()

    resumed = scae.run_study(ds, out, scae.StudyConfig(max_layer_entries=2000, sample_layer_entries=2000, max_embed_cells=200, resume=True, **FAST))
    assert all(run.resumed for run in resumed.runs.values())
    again = json.loads((out / "metrics.json").read_text())
    for name in metrics["runs"]:
        assert again["runs"][name]["history"] == metrics["runs"][name]["history"]
        assert again["runs"][name]["errors"] == metrics["runs"][name]["errors"]
    other = scae.StudyConfig(max_layer_entries=2000, sample_layer_entries=2000, max_embed_cells=200, resume=True, **{**FAST, "epochs": 2})
    with pytest.raises(ScaeInputError, match="was trained on another input or with other settings"):
        scae.run_study(ds, out, other)


# ---------------------------------------------------------------- the command line
def test_cli_stream_fit_and_refusals(counts_h5ad, tmp_path, capsys):
    from scae.cli import main

    assert main(["study", "--stream", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "the built-in dataset is made in memory" in capsys.readouterr().err
    (tmp_path / "dir.pt").mkdir()
    fit = ["fit", "--h5ad", str(counts_h5ad), "--label-key", "cell_type", "--stream", "--epochs", "1",
           "--hidden", "8", "--latent", "3", "--device", "cpu", "--quiet"]
    assert main([*fit, "--out", str(tmp_path / "dir.pt")]) == 2
    assert "is a directory; expected the path of the model file" in capsys.readouterr().err
    assert main([*fit, "--out", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert f"trained {CELLS} cells × {GENES} genes for 1 epoch(s)" in out
    model = scae.Autoencoder.load(tmp_path / "m.pt")
    assert model.latent_dim == 3 and len(model.history_) == 2 and model.train_cells_per_second_ > 0


# ---------------------------------------------------------------- raw(): count normalisation off
def _as_array(chunk) -> np.ndarray:
    if isinstance(chunk, torch.Tensor):
        return chunk.numpy()
    return chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk)


@pytest.fixture
def count_sources(tmp_path, counts_h5ad, raw_counts):
    """Every kind of source over the same raw counts, all with counts=True."""
    X = raw_counts[0]
    np.save(tmp_path / "raw.npy", X.toarray())
    return {
        "array dense": ArraySource(X.toarray(), counts=True),
        "array csr": ArraySource(X, counts=True),
        "h5": H5CSRSource(counts_h5ad, counts=True),
        "npy": NpySource(tmp_path / "raw.npy", counts=True),
        "subset": H5CSRSource(counts_h5ad, counts=True).subset(np.arange(0, CELLS, 2)),
    }


@pytest.mark.parametrize("kind", ["array dense", "array csr", "h5", "npy", "subset"])
def test_raw_reads_the_stored_counts_and_leaves_the_source_normalising(count_sources, raw_counts, kind):
    import pickle

    source = count_sources[kind]
    stored = raw_counts[0].toarray()
    if kind == "subset":
        stored = stored[::2]
    rows = np.array([0, 3, 4, 50, source.n_rows - 1])
    raw = source.raw()
    assert raw is not source and source.counts and not raw.counts
    assert raw.shape == source.shape and raw.on_disk == source.on_disk
    np.testing.assert_array_equal(raw.tensor(rows).numpy(), stored[rows])
    np.testing.assert_array_equal(_as_array(raw.matrix(rows)), stored[rows])
    np.testing.assert_allclose(source.tensor(rows).numpy(), reference_log1p_cp10k(stored[rows]), rtol=1e-5, atol=1e-6)
    assert raw.raw() is raw  # a source that does not normalise is its own raw()
    inner = np.array([1, 2, 4])
    np.testing.assert_array_equal(source.subset(rows).raw().tensor(inner).numpy(), raw.subset(rows).tensor(inner).numpy())
    np.testing.assert_array_equal(source.subset(rows).raw().tensor(inner).numpy(), stored[rows[inner]])
    copy = pickle.loads(pickle.dumps(raw))
    assert not copy.counts
    np.testing.assert_array_equal(copy.tensor(rows).numpy(), stored[rows])
    batches = list(BatchLoader(raw, np.arange(raw.n_rows), batch_size=64))
    np.testing.assert_array_equal(torch.cat([x for x, _ in batches]).numpy(), stored)


def test_raw_of_a_file_source_has_its_own_handle(counts_h5ad, raw_counts):
    source = H5CSRSource(counts_h5ad, counts=True)
    source.read(np.array([0]))  # opens the file
    raw = source.raw()
    source.close()  # closing the original leaves the raw view readable
    np.testing.assert_array_equal(raw.read(np.array([5, 6])).toarray(), raw_counts[0][[5, 6]].toarray())
    assert source.indptr is raw.indptr  # shared, not copied


def test_normalize_counts_with_a_given_library():
    X = np.array([[1, 0, 3, 4], [0, 2, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    library = np.array([10.0, 4.0, 0.0])
    expected = np.log1p(X[:, [0, 2]] / np.array([[10.0], [4.0], [1.0]]) * 1e4) * (library > 0)[:, None]
    np.testing.assert_allclose(normalize_counts(X[:, [0, 2]], library), expected, rtol=1e-6)
    np.testing.assert_allclose(normalize_counts(sp.csr_matrix(X[:, [0, 2]]), library).toarray(), expected, rtol=1e-6)


# ---------------------------------------------------------------- column subsets
def test_column_subset_normalises_with_the_library_of_all_genes(count_sources, raw_counts):
    from scae.sources import ColumnSubsetSource

    genes = np.array([1, 4, 5, 20, 39])
    full = raw_counts[0].toarray().astype(np.float64)
    library = full.sum(axis=1, keepdims=True)  # over all 40 genes, not the 5 kept
    expected = np.log1p(full[:, genes] / library * 1e4)
    expected_subset = expected[::2]
    for kind, source in count_sources.items():
        columns = ColumnSubsetSource(source, genes)
        want = expected_subset if kind == "subset" else expected
        assert columns.shape == (source.n_rows, 5) and not columns.counts and columns.on_disk == source.on_disk
        np.testing.assert_allclose(columns.tensor(slice(None)).numpy(), want, rtol=1e-5, atol=1e-6, err_msg=kind)
        np.testing.assert_allclose(_as_array(columns.matrix()), want, rtol=1e-5, atol=1e-6, err_msg=kind)
        stored = raw_counts[0].toarray()[:, genes][:: 2 if kind == "subset" else 1]
        np.testing.assert_array_equal(columns.raw().tensor(slice(None)).numpy(), stored, err_msg=kind)
    sparse_reads = ColumnSubsetSource(count_sources["h5"], genes).read(np.arange(10))
    assert sp.issparse(sparse_reads)  # a sparse file stays sparse


def test_column_subset_composes_with_row_subsets_pickles_and_loads_batches(counts_h5ad, raw_counts):
    import pickle

    from scae.sources import ColumnSubsetSource, stored_source

    source = H5CSRSource(counts_h5ad, counts=True)
    genes = np.array([0, 2, 3, 30])
    columns = ColumnSubsetSource(source, genes)
    rows, inner = np.arange(5, 200, 3), np.array([0, 1, 7, 30])
    np.testing.assert_array_equal(
        columns.subset(rows).tensor(inner).numpy(), columns.tensor(rows[inner]).numpy()
    )
    np.testing.assert_array_equal(columns.subset(rows).raw().tensor(inner).numpy(), columns.raw().subset(rows).tensor(inner).numpy())
    np.testing.assert_array_equal(columns.raw().tensor(rows).numpy(), raw_counts[0].toarray()[rows][:, genes])
    copy = pickle.loads(pickle.dumps(columns))
    np.testing.assert_array_equal(copy.tensor(rows).numpy(), columns.tensor(rows).numpy())
    order = np.random.default_rng(0).permutation(CELLS)
    loaded = torch.cat([x for x, _ in BatchLoader(columns, order, batch_size=50)]).numpy()
    np.testing.assert_array_equal(loaded, columns.tensor(slice(None)).numpy()[order])  # no second normalisation
    assert stored_source(columns.subset(rows)) is source and stored_source(columns.raw()).path == source.path
    plain = ColumnSubsetSource(source.raw(), genes)
    assert plain.raw() is plain  # no normalisation to turn off


@pytest.mark.parametrize("columns, message", [
    (np.array([], dtype=np.int64), "non-empty"), (np.array([0, 40]), "0…39"), (np.array([1.0, 2.0]), "column indices"),
])
def test_column_subset_refuses_bad_columns(columns, message):
    from scae.sources import ColumnSubsetSource

    with pytest.raises(ValueError, match=message):
        ColumnSubsetSource(ArraySource(np.ones((3, 40))), columns)


@pytest.mark.parametrize(("n_cols", "rows"), [(10, 4096), (256, 4096), (1000, 1048), (4096, 256), (20000, 256)])
def test_eval_batches_hold_about_a_million_entries(n_cols, rows):
    from scae.sources import ArraySource, eval_batch_rows

    assert eval_batch_rows(n_cols) == rows
    X = np.arange(3 * rows * n_cols // 2 + n_cols, dtype=np.float32).reshape(-1, n_cols)[: rows + 3]
    batches = list(ArraySource(X).batches())
    assert [b.shape[0] for b in batches] == [rows, 3]
    np.testing.assert_array_equal(torch.cat(batches).numpy(), X)


# ---------------------------------------------------------------- copies in a GPU's memory
# DeviceSource works on any device; the trainer makes one only on CUDA (tests/test_cuda.py runs
# it there), so these tests build it on the CPU to check everything but the device.
@pytest.mark.parametrize("kind", ["memory", "disk", "subset"])
def test_a_device_copy_reads_and_batches_like_its_source(counts_h5ad, raw_counts, kind, monkeypatch):
    monkeypatch.setattr(scae.sources, "DEVICE_COPY_ROWS", 64)  # several copy chunks
    source = {"memory": ArraySource(raw_counts[0], counts=True), "disk": H5CSRSource(counts_h5ad, counts=True),
              "subset": H5CSRSource(counts_h5ad, counts=True).subset(np.arange(3, CELLS, 2))}[kind]
    copy = DeviceSource(source, "cpu")
    assert copy.shape == source.shape and copy.counts and not copy.on_disk
    rows = np.array([0, 1, 2, 7, 50, source.n_rows - 1])
    torch.testing.assert_close(copy.tensor(rows), source.tensor(rows), rtol=0, atol=0)  # normalised
    torch.testing.assert_close(copy.raw().tensor(slice(5, 90)), source.raw().tensor(slice(5, 90)), rtol=0, atol=0)
    np.testing.assert_array_equal(copy.matrix(rows), np.asarray(sp.csr_matrix(source.matrix(rows)).toarray()))
    order = np.random.default_rng(2).permutation(source.n_rows)
    for window in (32, 96):  # a batch at a time (in memory), and windows of batches (from disk)
        for (a, na), (b, nb) in zip(BatchLoader(copy, order, 32, window_rows=window),
                                    BatchLoader(source, order, 32, window_rows=window)):
            assert na == nb
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sources_are_copied_to_a_gpu_only_when_they_fit(raw_counts, monkeypatch):
    source = ArraySource(raw_counts[0])
    sources = [source, source.subset(np.arange(10)), None]
    assert on_device(sources, torch.device("cpu")) == sources  # only CUDA devices get copies
    monkeypatch.setattr(scae.sources, "DeviceSource", lambda s, device: DeviceSource(s, "cpu"))
    needed = 4 * GENES * (CELLS + 10)  # both, dense float32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * needed, 10**12))
    copied = on_device(sources, torch.device("cuda"))
    assert [type(s) for s in copied[:2]] == [DeviceSource, DeviceSource] and copied[2] is None
    torch.testing.assert_close(copied[1].tensor(slice(None)), sources[1].tensor(slice(None)), rtol=0, atol=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * needed - 2, 10**12))
    assert on_device(sources, torch.device("cuda")) == sources  # more than half the free memory
    # memory PyTorch keeps cached for reuse (an earlier model's data) counts as free
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 996)
    assert type(on_device(sources, torch.device("cuda"))[0]) is DeviceSource


def test_a_device_copy_reads_at_most_a_window_of_memory_at_a_time(raw_counts, monkeypatch):
    source = ArraySource(raw_counts[0])
    reads = []
    original = source.read
    monkeypatch.setattr(source, "read", lambda rows: reads.append(rows) or original(rows))
    monkeypatch.setattr(scae.sources, "WINDOW_BYTES", 4 * GENES * 50)  # 50 rows of GENES float32
    copy = DeviceSource(source, "cpu")
    assert [r.stop - r.start for r in reads] == [50] * (CELLS // 50) + ([CELLS % 50] if CELLS % 50 else [])
    torch.testing.assert_close(copy.tensor(slice(None)), source.tensor(slice(None)), rtol=0, atol=0)
    rows = np.array([5, 0, 3, 3])  # any order, repeats
    torch.testing.assert_close(copy.take(rows), source.tensor(slice(None))[rows], rtol=0, atol=0)


@pytest.mark.parametrize("stream", [False, True])
def test_training_from_a_device_copy_is_training_from_the_source(counts_h5ad, raw_counts, stream, monkeypatch):
    """Same batches, same steps: bitwise the same history and weights (on the CPU), in memory
    and from disk (where the shuffle keeps following the file's blocks)."""
    for module in (scae.sources, scae.training):  # several blocks and windows of 2 blocks
        monkeypatch.setattr(module, "DISK_BLOCK_ROWS", 16)
    monkeypatch.setattr(scae.sources, "DISK_WINDOW_BLOCKS", 2)
    data = read_h5ad(counts_h5ad, "cell_type", stream=stream).source()
    train, test = data.subset(np.arange(0, CELLS, 2)), data.subset(np.arange(1, CELLS, 2))
    params = dict(latent_dim=3, hidden=(8,), loss="nb", epochs=2, batch_size=16, device="cpu",
                  early_stopping=True, patience=5)
    plain = scae.Autoencoder(**params).fit(train, eval_X=test)
    copies = []

    def copying(sources, device):
        made = [None if s is None else DeviceSource(s, device) for s in sources]
        copies.extend(m for m in made if m is not None)
        return made

    monkeypatch.setattr(scae.training, "on_device", copying)
    copied = scae.Autoencoder(**params).fit(train, eval_X=test)
    assert len(copies) == 3  # training, test and validation cells
    assert copied.history_ == plain.history_
    for a, b in zip(copied.net_.state_dict().values(), plain.net_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("stream", [False, True])
def test_fit_copies_to_the_device_before_the_input_moments_pass(counts_h5ad, stream, monkeypatch):
    """With ``scale_input`` the per-gene moments are read from the device copy: the stored rows
    are read once, to copy them, and the model is bitwise the one trained without copies (the
    shuffle still follows the file's blocks)."""
    for module in (scae.sources, scae.training):
        monkeypatch.setattr(module, "DISK_BLOCK_ROWS", 16)
    monkeypatch.setattr(scae.sources, "DISK_WINDOW_BLOCKS", 2)
    data = read_h5ad(counts_h5ad, "cell_type", stream=stream).count_source()
    train, test = data.subset(np.arange(0, CELLS, 2)), data.subset(np.arange(1, CELLS, 2))
    params = dict(latent_dim=3, hidden=(8,), loss="nb", epochs=2, batch_size=16, device="cpu",
                  scale_input=True, early_stopping=True, patience=5)
    plain = scae.Autoencoder(**params).fit(train, eval_X=test)
    stored = train.parent
    rows_read = []
    original = type(stored)._read
    monkeypatch.setattr(type(stored), "_read", lambda self, rows: rows_read.append(rows.size) or original(self, rows))
    monkeypatch.setattr(scae.models, "on_device",
                        lambda sources, device: [None if s is None else DeviceSource(s, "cpu") for s in sources])
    copied = scae.Autoencoder(**params).fit(train, eval_X=test)
    assert sum(rows_read) == CELLS  # the training (with its validation part) and test cells, once
    assert copied.history_ == plain.history_
    for a, b in zip(copied.net_.state_dict().values(), plain.net_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_copies_already_on_the_device_are_kept(raw_counts, monkeypatch):
    source = ArraySource(raw_counts[0])
    made = []
    monkeypatch.setattr(scae.sources, "DeviceSource",
                        lambda s, device: made.append(s) or DeviceSource(s, "cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**12, 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    kept = DeviceSource(source.subset(np.arange(5)), "cpu")
    monkeypatch.setattr(kept, "device", torch.device("cuda"))  # as if made on the GPU
    result = on_device([kept, source, None], torch.device("cuda"))
    assert result[0] is kept and type(result[1]) is DeviceSource and result[2] is None
    assert made == [source]  # only the source that was not copied yet


def test_a_device_copy_of_a_memory_map_reads_it_without_a_warning(tmp_path):
    import warnings

    np.save(tmp_path / "m.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")

    class Mapped(scae.sources.RowSource):
        n_rows, n_cols = mapped.shape

        def _read(self, rows):
            return mapped[rows[0] : rows[-1] + 1]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy = DeviceSource(Mapped(), "cpu")
    torch.testing.assert_close(copy.tensor(slice(None)), torch.from_numpy(np.load(tmp_path / "m.npy")), rtol=0, atol=0)


def test_read_only_rows_become_tensors_without_a_warning(tmp_path):
    """A memory-mapped float32 .npy is read-only; torch.from_numpy warned about it on every batch."""
    import warnings

    from scae.sources import _dense_tensor

    np.save(tmp_path / "m.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = _dense_tensor(mapped[1:])
    torch.testing.assert_close(x, torch.arange(4, 12, dtype=torch.float32).reshape(2, 4), rtol=0, atol=0)
    x += 1  # a copy: the file is untouched
    assert float(np.load(tmp_path / "m.npy")[1, 0]) == 4.0


@pytest.mark.parametrize("chunks", [None, (16, 8)])
def test_a_dense_h5ad_declaring_more_than_it_stores_is_refused(tmp_path, raw_counts, chunks):
    """HDF5 reads storage never written as zeros: a small file could declare terabytes."""
    import h5py

    path = tmp_path / "x.h5ad"
    write_h5ad(path, raw_counts[0].toarray(), raw_counts[1])
    with h5py.File(path, "r+") as f:  # the same shape, written in full, chunked or not: read as usual
        values = f["X"][:]
        del f["X"]
        f.create_dataset("X", data=values, chunks=chunks)
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    assert read_h5ad(path, "cell_type", stream=True).n_cells == CELLS
    with h5py.File(path, "r+") as f:  # only the first rows ever written (contiguous storage: none of it)
        del f["X"]
        f.create_dataset("X", shape=(CELLS, GENES), dtype="f4", chunks=chunks)
        if chunks is not None:
            f["X"][:16] = values[:16]
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    written = "its storage was never written" if chunks is None else "only 5 of its 75 storage chunks were ever written"
    for stream in (True, False):  # streamed or loaded
        with pytest.raises(ScaeInputError, match=f"declares a {CELLS} × {GENES} matrix, but {written}"):
            read_h5ad(path, "cell_type", stream=stream)
    with h5py.File(path, "r+") as f:  # X whole again, and the partial matrix a layer of counts
        if "layers" not in f:
            f.create_group("layers")
        f.move("X", "layers/counts")
        f.create_dataset("X", data=values)
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    with pytest.raises(ScaeInputError, match=f"layer 'counts': declares a {CELLS} × {GENES} matrix, but {written}"):
        read_h5ad(path, "cell_type", stream=True, counts_layer="counts")


@pytest.mark.parametrize("rows", [[5, 5, 7], [7, 5], [3, 2, 9]])
def test_reads_refuse_rows_that_are_not_strictly_increasing(raw_counts, tmp_path, rows):
    """The readers' shortcuts (a contiguous range read as one slice) rely on it: [5, 5, 7] read
    rows 5, 6 and 7."""
    write_h5ad(tmp_path / "x.h5ad", raw_counts[0].toarray(), raw_counts[1])
    for source in (ArraySource(raw_counts[0].toarray()), read_h5ad(tmp_path / "x.h5ad", "cell_type", stream=True).X):
        with pytest.raises(ValueError, match="rows must be sorted and distinct"):
            source.read(np.array(rows))


@pytest.mark.parametrize("kind", ["npy", "csr", "dense"])
def test_a_file_cut_short_while_it_is_read_is_an_error_not_zeros_or_a_crash(tmp_path, raw_counts, kind):
    """Another program truncating a streamed file: HDF5 read zeros past the new end (a study finished
    on them) and a memory map died of SIGBUS; every read first checks the size the file had."""
    import pickle

    from scae.sources import FileShrankError, H5DenseSource

    counts = raw_counts[0]
    if kind == "npy":
        path = tmp_path / "x.npy"
        np.save(path, counts.toarray())
        source = NpySource(path)
    else:
        path = tmp_path / "x.h5ad"
        write_h5ad(path, counts if kind == "csr" else counts.toarray(), raw_counts[1])
        source = H5CSRSource(path) if kind == "csr" else H5DenseSource(path)
    first = source.read(np.arange(5))
    assert (first.toarray() if sp.issparse(first) else first).shape == (5, GENES)
    elsewhere = pickle.loads(pickle.dumps(source))  # as handed to another process: the size first seen
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    for reader in (source, elsewhere):
        with pytest.raises(FileShrankError, match=rf"x\.(npy|h5ad): the file became shorter while scae was reading "
                                                   rf"it \({size // 2:,} bytes, {size:,} when opened\)"):
            reader.read(np.arange(CELLS - 5, CELLS))
    assert issubclass(FileShrankError, ScaeInputError)  # one line and exit 2 on the command line
