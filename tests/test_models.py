"""The autoencoder network and the scikit-learn style estimator."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from torch import nn

from scae import Autoencoder
from scae.models import AutoencoderNet

EPOCHS = 3


def layer_signature(seq: nn.Sequential) -> list[tuple]:
    out = []
    for layer in seq:
        if isinstance(layer, nn.Linear):
            out.append(("Linear", layer.in_features, layer.out_features))
        else:
            out.append((type(layer).__name__,))
    return out


# ---------------------------------------------------------------- AutoencoderNet
def test_net_layers_single_hidden():
    net = AutoencoderNet(1000, 10, (100,))
    assert layer_signature(net.encoder) == [("Linear", 1000, 100), ("ReLU",), ("Linear", 100, 10)]
    assert layer_signature(net.decoder) == [("Linear", 10, 100), ("ReLU",), ("Linear", 100, 1000)]


def test_net_layers_deeper_hidden_mirror():
    net = AutoencoderNet(500, 8, (128, 64, 32), activation="tanh")
    assert layer_signature(net.encoder) == [
        ("Linear", 500, 128), ("Tanh",), ("Linear", 128, 64), ("Tanh",), ("Linear", 64, 32), ("Tanh",),
        ("Linear", 32, 8),
    ]
    assert layer_signature(net.decoder) == [
        ("Linear", 8, 32), ("Tanh",), ("Linear", 32, 64), ("Tanh",), ("Linear", 64, 128), ("Tanh",),
        ("Linear", 128, 500),
    ]


def test_net_forward_shapes_and_unbounded_output():
    torch.manual_seed(0)
    net = AutoencoderNet(30, 4, (16,))
    x = torch.randn(7, 30) * 10
    z, x_hat = net(x)
    assert z.shape == (7, 4) and x_hat.shape == (7, 30)
    # no activation on latent or output: both take negative values
    assert (z < 0).any() and (x_hat < 0).any()
    assert torch.equal(net.decoder(z), x_hat)


# ---------------------------------------------------------------- estimator fixtures
@pytest.fixture(scope="module")
def fitted(small_dense):
    """A model fitted on the first 240 cells with the other 60 as evaluation cells."""
    X = small_dense
    model = Autoencoder(latent_dim=6, hidden=(32,), epochs=EPOCHS, batch_size=32, random_state=0)
    model.fit(X[:240], eval_X=X[240:])
    return model


def test_fit_sets_attributes_and_history(fitted, small_dense):
    assert fitted.n_features_in_ == small_dense.shape[1]
    assert isinstance(fitted.net_, AutoencoderNet)
    assert fitted.fit_seconds_ > 0
    h = fitted.history_
    assert len(h) == EPOCHS + 1
    assert [row["epoch"] for row in h] == list(range(EPOCHS + 1))
    for row in h:
        assert set(row) == {"epoch", "train_loss", "test_loss", "test_mse"}
        assert all(np.isfinite(row[k]) and row[k] > 0 for k in ("train_loss", "test_loss", "test_mse"))
        assert row["test_loss"] == row["test_mse"]  # loss="mse": the objective is the MSE


def test_history_without_eval_has_only_train_loss(small_dense):
    m = Autoencoder(latent_dim=3, hidden=(16,), epochs=2).fit(small_dense[:100])
    assert len(m.history_) == 3
    assert all(set(row) == {"epoch", "train_loss"} for row in m.history_)


def test_history_epoch0_is_untrained_objective_and_last_test_is_exact(small_dense):
    X_train, X_test = small_dense[:240], small_dense[240:]
    m = Autoencoder(latent_dim=5, hidden=(20,), loss="nonzero_mse", epochs=2, random_state=4)
    m.fit(X_train, eval_X=X_test)
    untrained = Autoencoder(latent_dim=5, hidden=(20,), loss="nonzero_mse", epochs=1, random_state=4)
    untrained.n_features_in_ = X_train.shape[1]
    untrained.net_ = untrained._build(X_train.shape[1])  # same seeded initial weights
    e0_train = untrained.reconstruction_error(X_train)
    e0_test = untrained.reconstruction_error(X_test)
    assert m.history_[0]["train_loss"] == pytest.approx(e0_train["nonzero_mse"], rel=1e-5)
    assert m.history_[0]["test_loss"] == pytest.approx(e0_test["nonzero_mse"], rel=1e-5)
    assert m.history_[0]["test_mse"] == pytest.approx(e0_test["mse"], rel=1e-5)
    final = m.reconstruction_error(X_test)
    assert m.history_[-1]["test_loss"] == pytest.approx(final["nonzero_mse"], rel=1e-5)
    assert m.history_[-1]["test_mse"] == pytest.approx(final["mse"], rel=1e-5)
    assert m.history_[-1]["test_loss"] != m.history_[-1]["test_mse"]


def test_training_lowers_test_loss(small_dense):
    X = small_dense
    m = Autoencoder(latent_dim=10, hidden=(64,), epochs=5, batch_size=32, random_state=0)
    m.fit(X[:240], eval_X=X[240:])
    h = m.history_
    assert h[-1]["test_loss"] < 0.8 * h[0]["test_loss"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]


def test_output_shapes(fitted, small_dense):
    X = small_dense
    Z = fitted.transform(X)
    R = fitted.reconstruct(X)
    Z2, R2 = fitted.transform_and_reconstruct(X)
    assert Z.shape == (X.shape[0], 6) and Z.dtype == np.float32
    assert R.shape == X.shape and R.dtype == np.float32
    np.testing.assert_allclose(Z2, Z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(R2, R, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(Z)) and np.all(np.isfinite(R))
    # the latent really is what the decoder reconstructs from
    with torch.no_grad():
        np.testing.assert_allclose(fitted.net_.decoder(torch.from_numpy(Z2)).numpy(), R2, rtol=1e-5, atol=1e-5)


def test_fit_transform(small_dense):
    X = small_dense[:80]
    m = Autoencoder(latent_dim=3, hidden=(8,), epochs=1)
    Z = m.fit_transform(X)
    assert Z.shape == (80, 3)
    np.testing.assert_array_equal(Z, m.transform(X))


def test_dense_sparse_anndata_inputs_identical(small_dataset, small_dense):
    kwargs = dict(latent_dim=4, hidden=(16,), epochs=2, batch_size=50, random_state=3)
    dense = Autoencoder(**kwargs).fit(small_dense)
    sparse = Autoencoder(**kwargs).fit(sp.csr_matrix(small_dataset.X))
    adata = Autoencoder(**kwargs).fit(ad.AnnData(X=small_dataset.X))
    assert dense.history_ == sparse.history_ == adata.history_
    for model in (sparse, adata):
        for a, b in zip(dense.net_.state_dict().values(), model.net_.state_dict().values()):
            assert torch.equal(a, b)
    Zd, Rd = dense.transform_and_reconstruct(small_dense)
    Zs, Rs = dense.transform_and_reconstruct(small_dataset.X)
    Za, Ra = dense.transform_and_reconstruct(ad.AnnData(X=small_dataset.X))
    np.testing.assert_array_equal(Zd, Zs)
    np.testing.assert_array_equal(Rd, Rs)
    np.testing.assert_array_equal(Zd, Za)
    np.testing.assert_array_equal(Rd, Ra)
    np.testing.assert_array_equal(dense.reconstruct(small_dataset.X), Rd)


def test_same_seed_bitwise_identical_different_seed_differs(small_dense):
    X = small_dense[:150]
    kwargs = dict(latent_dim=4, hidden=(16,), epochs=2, batch_size=32)
    a = Autoencoder(random_state=11, **kwargs).fit(X)
    b = Autoencoder(random_state=11, **kwargs).fit(X)
    c = Autoencoder(random_state=12, **kwargs).fit(X)
    sa, sb, sc = (m.net_.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1)
    assert a.history_ == b.history_
    assert a.history_ != c.history_
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    assert not np.allclose(a.transform(X), c.transform(X))


def test_fit_does_not_touch_global_torch_rng(small_dense):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(small_dense[:40])
    assert torch.equal(torch.rand(3), expected)


def test_fit_does_not_modify_input(small_dense):
    X = small_dense[:60].copy()
    before = X.copy()
    Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(X, eval_X=X)
    np.testing.assert_array_equal(X, before)


def test_save_load_roundtrip(fitted, small_dense, tmp_path):
    path = tmp_path / "model.pt"
    fitted.save(path)
    assert path.is_file()
    assert not list(tmp_path.glob(".*.part"))  # no temporary file left behind
    loaded = Autoencoder.load(path)
    assert isinstance(loaded, Autoencoder)
    assert loaded.get_params() == fitted.get_params()
    assert loaded.hidden == (32,)
    assert loaded.n_features_in_ == fitted.n_features_in_
    assert loaded.history_ == fitted.history_
    assert loaded.fit_seconds_ == fitted.fit_seconds_
    np.testing.assert_array_equal(loaded.transform(small_dense), fitted.transform(small_dense))
    np.testing.assert_array_equal(loaded.reconstruct(small_dense), fitted.reconstruct(small_dense))
    assert loaded.reconstruction_error(small_dense) == fitted.reconstruction_error(small_dense)


def test_load_rejects_non_scae_files(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"format": "something/1", "state_dict": {}}, other)
    with pytest.raises(ValueError, match="not an scae model"):
        Autoencoder.load(other)
    plain = tmp_path / "weights.pt"
    torch.save(AutoencoderNet(5, 2, (3,)).state_dict(), plain)
    with pytest.raises(ValueError, match="not an scae model"):
        Autoencoder.load(plain)
    text = tmp_path / "text.pt"
    text.write_text("hello, I am not a model\n")
    with pytest.raises(Exception):  # noqa: B017 - any refusal; it must not load
        Autoencoder.load(text)


def test_load_never_unpickles_arbitrary_objects(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            import os

            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "scae.Autoencoder/1", "payload": Evil()}, path)
    with pytest.raises(Exception):  # noqa: B017
        Autoencoder.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("loss", ["mse", "nonzero_mse"])
def test_reconstruction_error_matches_numpy(fitted, small_dense, loss):
    X = small_dense[240:]
    R = fitted.reconstruct(X).astype(np.float64)
    Xd = X.astype(np.float64)
    mask = Xd != 0
    expected = {
        "mse": float(np.mean((Xd - R) ** 2)),
        "nonzero_mse": float(np.sum(mask * (Xd - R * mask) ** 2) / mask.sum()),
    }
    got = fitted.reconstruction_error(X)
    assert set(got) == {"mse", "nonzero_mse"}
    assert got[loss] == pytest.approx(expected[loss], rel=1e-5)
    assert got["mse"] != pytest.approx(got["nonzero_mse"], rel=1e-3)


def test_reconstruction_error_sparse_equals_dense(fitted, small_dataset, small_dense):
    a = fitted.reconstruction_error(small_dense)
    b = fitted.reconstruction_error(small_dataset.X)
    assert a["mse"] == pytest.approx(b["mse"], rel=1e-6)
    assert a["nonzero_mse"] == pytest.approx(b["nonzero_mse"], rel=1e-6)


@pytest.mark.parametrize("method", ["transform", "reconstruct", "transform_and_reconstruct", "reconstruction_error"])
def test_wrong_number_of_genes(fitted, small_dense, method):
    with pytest.raises(ValueError, match=r"X has 100 genes \(columns\); the model expects 120"):
        getattr(fitted, method)(small_dense[:, :100])


def test_unfitted_save_raises(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        Autoencoder().save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("method", ["transform", "reconstruct", "transform_and_reconstruct", "reconstruction_error"])
def test_unfitted_model_raises_not_fitted(small_dense, method):
    with pytest.raises(RuntimeError, match="not fitted"):
        getattr(Autoencoder(), method)(small_dense)


@pytest.mark.parametrize("method", ["transform", "reconstruct", "transform_and_reconstruct", "reconstruction_error"])
def test_unfitted_model_raises(small_dense, method):
    with pytest.raises((RuntimeError, AttributeError)):
        getattr(Autoencoder(), method)(small_dense)


def test_fit_rejects_eval_matrix_with_wrong_genes(small_dense):
    with pytest.raises(ValueError, match="genes"):
        Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(small_dense, eval_X=small_dense[:, :100])


def test_refit_on_other_genes_with_eval(small_dense):
    m = Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(small_dense)
    m.fit(small_dense[:, :100], eval_X=small_dense[:50, :100])
    assert m.n_features_in_ == 100


def test_refit_on_other_genes_without_eval(small_dense):
    m = Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(small_dense)
    m.fit(small_dense[:, :100])
    assert m.n_features_in_ == 100 and m.transform(small_dense[:, :100]).shape == (small_dense.shape[0], 2)


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"loss": "mae"}, "unknown loss"),
        ({"activation": "swish"}, "unknown activation"),
        ({"latent_dim": 0}, "positive"),
        ({"hidden": (10, 0)}, "positive"),
    ],
)
def test_bad_params_raise(small_dense, params, needle):
    with pytest.raises(ValueError, match=needle):
        Autoencoder(epochs=1, **params).fit(small_dense[:20])


def test_fit_rejects_nan_input():
    X = np.ones((10, 5), dtype=np.float32)
    X[2, 3] = np.nan
    with pytest.raises(ValueError, match="row 2, column 3"):
        Autoencoder(epochs=1).fit(X)


def test_sklearn_get_params_and_clone(fitted, small_dense):
    params = fitted.get_params()
    assert params == {
        "latent_dim": 6, "hidden": (32,), "activation": "relu", "loss": "mse", "epochs": EPOCHS,
        "batch_size": 32, "learning_rate": 1e-3, "random_state": 0, "device": "auto", "progress": False,
    }
    twin = clone(fitted)
    assert twin is not fitted
    assert twin.get_params() == params
    assert not hasattr(twin, "net_") and not hasattr(twin, "history_")
    twin.set_params(latent_dim=3)
    assert twin.latent_dim == 3 and fitted.latent_dim == 6
    # a clone trained on the same data with the same seed reproduces the original
    again = clone(fitted).fit(small_dense[:240], eval_X=small_dense[240:])
    assert again.history_ == fitted.history_
    np.testing.assert_array_equal(again.transform(small_dense), fitted.transform(small_dense))
