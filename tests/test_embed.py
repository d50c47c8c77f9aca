"""``scae embed`` and :func:`scae.embed`: a preset fitted on an AnnData, its latent and denoised matrix stored."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scae
from scae.cli import main
from scae.errors import ScaeInputError
from scae.genes import top_count_genes
from scae.presets import RECOMMENDED, preset

CELLS, GENES, EPOCHS = 200, 40, 2
RAW_ONLY_GENES = 10
"""Genes of ``adata.raw`` that ``X`` lacks in the --counts-raw file."""


def _obs(labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"ct": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])


def _var(names) -> pd.DataFrame:
    return pd.DataFrame(index=list(names))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """The same simulated raw counts (200 cells × 40 genes) stored four ways:

    - ``counts.h5ad``: X holds the counts (CSR);
    - ``layered.h5ad``: X log-normalised (dense), the counts in ``layers["umi"]``;
    - ``raw.h5ad``: X the log-normalised values of 30 of the genes, in reverse order, and
      ``adata.raw`` the counts of all 40 (more genes than X, matched by name); a layer of the
      user's called ``counts`` that holds 7 everywhere (not counts of these cells);
    - ``lognorm.h5ad``: X log-normalised, no counts anywhere.
    """
    d = tmp_path_factory.mktemp("embed")
    counts, populations = scae.simulate_counts(CELLS, GENES, 3, seed=4)
    dense = counts.toarray()
    lognorm = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    labels = np.array([f"type{p}" for p in populations])
    names = np.array([f"g{j}" for j in range(GENES)])
    obs = _obs(labels)

    ad.AnnData(X=counts, obs=obs, var=_var(names)).write_h5ad(d / "counts.h5ad")
    ad.AnnData(X=lognorm, obs=obs, var=_var(names), layers={"umi": counts.copy()}).write_h5ad(d / "layered.h5ad")
    x_genes = np.arange(GENES - 1, RAW_ONLY_GENES - 1, -1)  # 39 … 10: reversed, 10 genes only in raw
    with_raw = ad.AnnData(X=lognorm[:, x_genes], obs=obs, var=_var(names[x_genes]),
                          layers={"counts": np.full((CELLS, x_genes.size), 7.0, np.float32)})  # a layer of the user's
    with_raw.raw = ad.AnnData(X=counts.copy(), obs=obs, var=_var(names))
    with_raw.write_h5ad(d / "raw.h5ad")
    ad.AnnData(X=lognorm, obs=obs, var=_var(names)).write_h5ad(d / "lognorm.h5ad")
    return SimpleNamespace(dir=d, counts=dense, lognorm=lognorm, labels=labels, names=names, x_genes=x_genes)


def _embed(source: Path, out: Path, *extra: str) -> int:
    return main(["embed", str(source), "--out", str(out), "--epochs", str(EPOCHS), "--device", "cpu", "--quiet", *extra])


def assert_one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("scae: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert needle in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def embedded(files, tmp_path_factory) -> SimpleNamespace:
    """``scae embed counts.h5ad`` with the defaults (the recommended preset), run once; the input's
    bytes before and after."""
    out = tmp_path_factory.mktemp("embedded") / "out.h5ad"
    before = (files.dir / "counts.h5ad").read_bytes()
    assert _embed(files.dir / "counts.h5ad", out) == 0
    return SimpleNamespace(out=out, adata=ad.read_h5ad(out), before=before,
                           after=(files.dir / "counts.h5ad").read_bytes())


# ---------------------------------------------------------------- the command
def test_embed_writes_latent_denoised_and_record(embedded, files):
    adata = embedded.adata
    assert adata.shape == (CELLS, GENES)
    latent = adata.obsm["X_scae"]
    assert latent.shape == (CELLS, preset(RECOMMENDED)["latent_dim"]) == (CELLS, 10)
    assert np.all(np.isfinite(latent)) and latent.std(axis=0).max() > 0
    denoised = adata.layers["scae_denoised"]
    assert denoised.shape == (CELLS, GENES) and np.all(np.isfinite(denoised))
    # log1p(expected proportion × 1e4): every cell's expected proportions sum to 1
    np.testing.assert_allclose(np.expm1(np.asarray(denoised, dtype=np.float64)).sum(axis=1), 1e4, rtol=1e-4)
    record = adata.uns["scae"]
    assert record["preset"] == "recommended" and record["latent_key"] == "X_scae"
    assert record["denoised_layer"] == "scae_denoised"
    params = json.loads(record["params"])
    expected = {**preset(RECOMMENDED), "epochs": EPOCHS, "hidden": list(preset(RECOMMENDED)["hidden"])}
    assert {k: params[k] for k in expected} == expected  # the preset's, with the --epochs override
    assert params["random_state"] == 0 and params["device"] == "cpu"
    # the rest of the AnnData is the input's
    np.testing.assert_array_equal(adata.X.toarray(), files.counts)
    assert list(adata.obs["ct"]) == list(files.labels) and list(adata.var_names) == list(files.names)


def test_embed_leaves_its_input_unchanged(embedded):
    assert embedded.after == embedded.before


def test_embed_latent_is_the_fitted_models(embedded, files):
    """The API on the same AnnData, seed and epochs gives the command's latent."""
    adata = ad.read_h5ad(files.dir / "counts.h5ad")
    model = scae.embed(adata, epochs=EPOCHS, device="cpu")
    np.testing.assert_array_equal(adata.obsm["X_scae"], embedded.adata.obsm["X_scae"])
    np.testing.assert_allclose(model.transform(files.counts), embedded.adata.obsm["X_scae"], rtol=1e-5, atol=1e-6)


def test_embed_refuses_to_overwrite_its_input(files, tmp_path, capsys):
    source = tmp_path / "in.h5ad"
    source.write_bytes((files.dir / "counts.h5ad").read_bytes())
    before = source.read_bytes()
    for out in (source, tmp_path / "." / "in.h5ad"):
        assert _embed(source, out) == 2
        assert_one_line_error(capsys, "is INPUT; scae never modifies its input")
    assert source.read_bytes() == before


def test_embed_without_counts_is_one_line(files, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    assert _embed(files.dir / "lognorm.h5ad", out) == 2
    assert_one_line_error(capsys, f"{files.dir / 'lognorm.h5ad'}: preset 'recommended' models raw counts, and X does "
                                  "not hold them (non-negative whole numbers); name them with --counts-layer NAME or "
                                  "--counts-raw")
    assert not out.exists()
    assert _embed(files.dir / "lognorm.h5ad", out, "--counts-layer", "umi") == 2
    assert_one_line_error(capsys, "no layer 'umi' for the raw counts; available layers: none")
    assert _embed(files.dir / "layered.h5ad", out, "--counts-layer", "umi", "--counts-raw") == 2
    assert_one_line_error(capsys, "give either --counts-layer or --counts-raw")
    assert not out.exists()


def test_embed_counts_from_a_layer_give_the_same_model(files, embedded, tmp_path):
    out = tmp_path / "layer.h5ad"
    assert _embed(files.dir / "layered.h5ad", out, "--counts-layer", "umi") == 0
    adata = ad.read_h5ad(out)
    np.testing.assert_array_equal(adata.obsm["X_scae"], embedded.adata.obsm["X_scae"])
    np.testing.assert_array_equal(adata.X, files.lognorm)  # X stays the log-normalised input
    assert "umi" in adata.layers


def test_embed_counts_from_raw_with_more_genes_than_x(files, tmp_path):
    out = tmp_path / "raw.h5ad"
    assert _embed(files.dir / "raw.h5ad", out, "--counts-raw") == 0
    adata = ad.read_h5ad(out)
    assert adata.shape == (CELLS, GENES - RAW_ONLY_GENES)
    assert adata.layers["scae_denoised"].shape == (CELLS, GENES - RAW_ONLY_GENES)
    assert adata.raw.shape == (CELLS, GENES)
    # the model saw raw's counts of X's genes, in X's order: as if X held them
    same = ad.AnnData(X=files.counts[:, files.x_genes], obs=_obs(files.labels), var=_var(files.names[files.x_genes]))
    scae.embed(same, epochs=EPOCHS, device="cpu")
    np.testing.assert_array_equal(adata.obsm["X_scae"], same.obsm["X_scae"])


def test_embed_top_genes_keeps_that_many(files, tmp_path):
    out = tmp_path / "top.h5ad"
    assert _embed(files.dir / "counts.h5ad", out, "--top-genes", "15") == 0
    adata = ad.read_h5ad(out)
    assert adata.shape == (CELLS, 15) and adata.layers["scae_denoised"].shape == (CELLS, 15)
    expected = top_count_genes(files.counts, 15)
    assert list(adata.var_names) == list(files.names[expected])
    np.testing.assert_array_equal(adata.X.toarray(), files.counts[:, expected])
    assert json.loads(adata.uns["scae"]["params"])["loss"] == "nb"


@pytest.mark.parametrize("n", [GENES, GENES + 1, 10**6])
def test_embed_top_genes_at_or_above_the_gene_count_keeps_them_all(files, tmp_path, n):
    out = tmp_path / "all.h5ad"
    assert _embed(files.dir / "counts.h5ad", out, "--top-genes", str(n)) == 0
    adata = ad.read_h5ad(out)
    assert list(adata.var_names) == list(files.names)
    np.testing.assert_array_equal(adata.X.toarray(), files.counts)


def test_embed_top_genes_match_scanpy_seurat_v3(files):
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("skmisc")
    adata = ad.AnnData(X=files.counts.copy(), var=_var(files.names))
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=15)
    chosen = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    np.testing.assert_array_equal(top_count_genes(files.counts, 15), chosen)


def test_embed_top_genes_with_counts_raw(files, tmp_path):
    out = tmp_path / "top_raw.h5ad"
    assert _embed(files.dir / "raw.h5ad", out, "--counts-raw", "--top-genes", "12") == 0
    adata = ad.read_h5ad(out)
    x_counts = files.counts[:, files.x_genes]
    expected = top_count_genes(x_counts, 12)
    kept = files.names[files.x_genes][expected]
    assert list(adata.var_names) == list(kept) and adata.raw.shape == (CELLS, GENES)
    np.testing.assert_array_equal(adata.layers["counts"], np.full((CELLS, 12), 7.0))  # the user's layer, as it was
    # the model saw raw's counts of the kept genes
    same = ad.AnnData(X=x_counts[:, expected], obs=_obs(files.labels), var=_var(kept))
    scae.embed(same, epochs=EPOCHS, device="cpu")
    np.testing.assert_array_equal(adata.obsm["X_scae"], same.obsm["X_scae"])


def test_embed_top_genes_without_counts_is_one_line(files, tmp_path, capsys):
    assert _embed(files.dir / "lognorm.h5ad", tmp_path / "o.h5ad", "--top-genes", "10") == 2
    assert_one_line_error(capsys, "--top-genes ranks genes by their raw counts, and X holds none")


def test_embed_same_seed_same_latent_other_seed_another(files, embedded, tmp_path):
    again, other = tmp_path / "again.h5ad", tmp_path / "other.h5ad"
    assert _embed(files.dir / "counts.h5ad", again) == 0
    assert _embed(files.dir / "counts.h5ad", other, "--seed", "1") == 0
    np.testing.assert_array_equal(ad.read_h5ad(again).obsm["X_scae"], embedded.adata.obsm["X_scae"])
    np.testing.assert_array_equal(ad.read_h5ad(again).layers["scae_denoised"], embedded.adata.layers["scae_denoised"])
    assert not np.allclose(ad.read_h5ad(other).obsm["X_scae"], embedded.adata.obsm["X_scae"])


def test_embed_keys_and_preset_from_the_command_line(files, tmp_path):
    out = tmp_path / "keys.h5ad"
    assert _embed(files.dir / "counts.h5ad", out, "--preset", "zinb_ae", "--latent-key", "X_dca",
                  "--denoised-layer", "dca") == 0
    adata = ad.read_h5ad(out)
    assert set(adata.obsm) == {"X_dca"} and set(adata.layers) == {"dca"}
    assert adata.uns["scae"]["preset"] == "zinb_ae" and adata.uns["scae"]["latent_key"] == "X_dca"
    assert json.loads(adata.uns["scae"]["params"])["loss"] == "zinb"


def test_embed_output_works_with_scanpy_neighbors(embedded):
    sc = pytest.importorskip("scanpy")
    import torch

    threads = torch.get_num_threads()
    try:
        adata = embedded.adata.copy()
        sc.pp.neighbors(adata, use_rep="X_scae", n_neighbors=10, random_state=0)
    finally:
        # numba's OpenMP layer (under pynndescent) sets the OpenMP thread count to every core when it
        # starts, and PyTorch shares it: restored, so that later tests of this process (which compare
        # in-process runs bitwise with runs in a child process) train with the thread count they began with
        torch.set_num_threads(threads)
    assert adata.obsp["connectivities"].shape == (CELLS, CELLS)
    assert adata.uns["neighbors"]["params"]["use_rep"] == "X_scae"
    np.testing.assert_array_equal(adata.obsm["X_scae"], embedded.adata.obsm["X_scae"])


# ---------------------------------------------------------------- the Python API
def test_embed_api_works_in_place_and_returns_the_model(files):
    adata = ad.AnnData(X=sp.csr_matrix(files.counts), obs=_obs(files.labels), var=_var(files.names))
    before = adata.X.copy()
    model = scae.embed(adata, epochs=EPOCHS, device="cpu", random_state=5)
    assert isinstance(model, scae.Autoencoder) and model.history_[-1]["epoch"] == EPOCHS
    assert model.get_params() == {**scae.Autoencoder.from_preset("recommended").get_params(), "epochs": EPOCHS,
                                  "device": "cpu", "random_state": 5}
    np.testing.assert_array_equal(adata.X.toarray(), before.toarray())  # X untouched
    assert adata.obsm["X_scae"].shape == (CELLS, 10)
    latent, denoised = model.transform_and_reconstruct(files.counts)
    np.testing.assert_allclose(adata.obsm["X_scae"], latent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.layers["scae_denoised"], denoised, rtol=1e-5, atol=1e-6)
    assert adata.uns["scae"]["best_epoch"] in range(1, EPOCHS + 1)


def test_embed_api_keys_are_configurable_and_denoised_optional(files):
    adata = ad.AnnData(X=files.counts.copy(), obs=_obs(files.labels), var=_var(files.names))
    scae.embed(adata, "nb_ae", latent_key="X_nb", denoised_layer=None, epochs=EPOCHS, device="cpu", latent_dim=3)
    assert set(adata.obsm) == {"X_nb"} and adata.obsm["X_nb"].shape == (CELLS, 3)
    assert len(adata.layers) == 0
    assert adata.uns["scae"]["denoised_layer"] == "" and adata.uns["scae"]["latent_key"] == "X_nb"
    assert json.loads(adata.uns["scae"]["params"])["latent_dim"] == 3


def test_embed_api_counts_layer_and_mse_model_on_log_values(files):
    layered = ad.AnnData(X=files.lognorm.copy(), obs=_obs(files.labels), var=_var(files.names),
                         layers={"umi": files.counts.copy()})
    with pytest.raises(scae.ScaeInputError, match="adata.X does not hold counts"):
        scae.embed(layered, epochs=EPOCHS, device="cpu")
    assert "X_scae" not in layered.obsm
    scae.embed(layered, counts_layer="umi", epochs=EPOCHS, device="cpu")
    assert layered.obsm["X_scae"].shape == (CELLS, 10)
    # a model of log-normalised values needs no counts; its denoised layer is on X's scale
    plain = ad.AnnData(X=files.lognorm.copy(), obs=_obs(files.labels), var=_var(files.names))
    model = scae.embed(plain, "nb_ae", loss="mse", epochs=EPOCHS, device="cpu")
    np.testing.assert_allclose(plain.layers["scae_denoised"], model.reconstruct(files.lognorm), rtol=1e-5, atol=1e-6)
    assert plain.uns["scae"]["denoised_scale"] == "the model input's scale (log-normalised)"
    with pytest.raises(scae.ScaeInputError, match="unknown preset 'best'"):
        scae.embed(plain, "best")


def test_embed_api_stays_callable_after_its_module_is_imported(files):
    """The function ``scae.embed`` lives in :mod:`scae.anndata_embed`: importing that module must not
    hide the function behind a module of the same name (``scae.embed(adata)`` keeps working)."""
    import scae.anndata_embed as module

    for _ in range(2):
        adata = ad.AnnData(X=files.counts[:40].copy(), var=_var(files.names))
        assert callable(scae.embed) and scae.embed is module.embed
        model = scae.embed(adata, "nb_ae", epochs=1, device="cpu", early_stopping=False, latent_dim=2)
        assert isinstance(model, scae.Autoencoder) and adata.obsm["X_scae"].shape == (40, 2)
    assert module.LATENT_KEY == "X_scae"


@pytest.mark.parametrize(("option", "key"), [("--latent-key", ""), ("--denoised-layer", ""), ("--latent-key", "a/b"),
                                             ("--denoised-layer", " "), ("--latent-key", "."),
                                             ("--denoised-layer", ".."), ("--latent-key", "a\nb"),
                                             ("--denoised-layer", "\x1b[31m"), ("--latent-key", "k" * 201)])
def test_embed_refuses_keys_an_h5ad_cannot_hold(files, tmp_path, capsys, option, key):
    """"" would be written as the obsm group itself and "a/b" as nested groups: anndata could not
    read the file back."""
    out = tmp_path / "out.h5ad"
    assert _embed(files.dir / "counts.h5ad", out, option, key) == 2
    assert_one_line_error(capsys, f"{option} must be a non-empty name without '/', not '.' or '..' (an .h5ad key) "
                                  f"and of at most 200 printable characters; got {key!r:.120}")
    assert not out.exists()


def test_embed_api_names_the_parameter_of_a_bad_key():
    adata = ad.AnnData(np.ones((5, 3), dtype=np.float32))
    with pytest.raises(scae.ScaeInputError, match="latent_key must be a non-empty name without '/'"):
        scae.embed(adata, latent_key="a/b")
    assert "X_scae" not in adata.obsm


def test_the_denoised_matrix_never_replaces_the_counts_it_was_fitted_on(files, tmp_path, capsys):
    out = tmp_path / "o.h5ad"
    assert _embed(files.dir / "layered.h5ad", out, "--counts-layer", "umi", "--denoised-layer", "umi") == 2
    assert_one_line_error(capsys, "--denoised-layer umi: is the layer --counts-layer reads the raw counts from")
    assert not out.exists()
    adata = ad.read_h5ad(files.dir / "layered.h5ad")
    with pytest.raises(scae.ScaeInputError, match="denoised_layer .umi. is the layer the raw counts are read from"):
        scae.embed(adata, counts_layer="umi", denoised_layer="umi", epochs=EPOCHS, device="cpu")
    assert "X_scae" not in adata.obsm


@pytest.mark.parametrize("X, problem", [
    (np.tile(np.arange(1, 11, dtype=np.float32), (30, 1)), "all 30 cells have the same values"),
    (np.zeros((30, 10), dtype=np.float32), "every value is 0"),
])
def test_embed_refuses_a_matrix_without_variation(X, problem):
    adata = ad.AnnData(X=X.copy())
    with pytest.raises(ScaeInputError, match=f"adata X: {problem}"):
        scae.embed(adata, epochs=1, device="cpu")
    assert "X_scae" not in adata.obsm


@pytest.mark.parametrize("given, message", [
    (np.ones((5, 5)), "adata must be an anndata.AnnData; got ndarray"),
    (None, "adata must be an anndata.AnnData; got NoneType"),
])
def test_embed_api_refuses_what_is_not_an_anndata(given, message):
    with pytest.raises(ScaeInputError, match=message):
        scae.embed(given)


def test_embed_api_checks_counts_raw_is_a_boolean(files):
    adata = ad.read_h5ad(files.dir / "counts.h5ad")
    with pytest.raises(ScaeInputError, match="counts_raw must be True or False; got 'no'"):
        scae.embed(adata, counts_raw="no")


def test_embed_refuses_a_dense_matrix_whose_storage_was_never_written(files, tmp_path, capsys):
    import h5py

    path = tmp_path / "partial.h5ad"
    ad.AnnData(X=files.counts.astype(np.float32), obs=_obs(files.labels), var=_var(files.names)).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        del f["X"]
        f.create_dataset("X", shape=(CELLS, GENES), dtype="f4", chunks=(50, GENES))
        f["X"][:50] = files.counts[:50]
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    assert main(["embed", str(path), "--epochs", "1", "--quiet", "--out", str(tmp_path / "out.h5ad")]) == 2
    assert f"{path} X: declares a {CELLS} × {GENES} matrix, but only 1 of its 4 storage chunks were ever written " \
           "(the rest would read as its fill value, 0.0)" in capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()
