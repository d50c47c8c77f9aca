"""The autoencoder network and the scikit-learn style estimator."""

from __future__ import annotations

import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import scae_env
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

import scae
import scae.likelihoods
import scae.training
from scae import Autoencoder
from scae.errors import ScaeInputError
from scae.models import MODEL_FORMAT, AutoencoderNet
from scae.sources import ArraySource
from scae.training import DIVERGED_FACTOR, TrainingDivergedError

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
    out = net(x)
    z, x_hat = out.latent, out.reconstruction
    assert z.shape == (7, 4) and x_hat.shape == (7, 30)
    assert out.target is x and out.kl is None and out.log_mean is None
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
        decoded = fitted.net_.decoder(torch.from_numpy(Z2).to(fitted.device_)).cpu().numpy()
    np.testing.assert_allclose(decoded, R2, rtol=1e-5, atol=1e-5)


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


def test_load_never_unpickles_arbitrary_objects(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            import os

            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "scae.Autoencoder/1", "payload": Evil()}, path)
    with pytest.raises(ScaeInputError) as err:
        Autoencoder.load(path)
    assert str(err.value).startswith(f"{path}: holds a Python object (posix.mkdir) besides tensors and plain data; "
                                     "refused, since loading it could run code")
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


def test_unfitted_save_raises_not_fitted(tmp_path):
    with pytest.raises(NotFittedError, match="This Autoencoder instance is not fitted yet"):
        Autoencoder().save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("method", ["transform", "reconstruct", "transform_and_reconstruct", "reconstruction_error"])
def test_unfitted_model_raises_not_fitted(small_dense, method):
    with pytest.raises(NotFittedError, match="This Autoencoder instance is not fitted yet. Call 'fit'"):
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
    "params,message",
    [
        ({"loss": "mae"}, "loss must be one of: mse, nonzero_mse, poisson, nb, zinb; got 'mae'"),
        ({"norm": "group"}, "norm must be one of: none, batch, layer; got 'group'"),
        ({"dropout": 1.0}, "dropout must be a finite number >= 0 and < 1; got 1.0"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0 and <= 10; got -0.1"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of: none, plateau, cosine; got 'step'"),
        ({"variational": 1}, "variational must be True or False; got 1"),
        ({"kl_warmup_epochs": -1}, "kl_warmup_epochs must be an integer in [0, 1000000]; got -1"),
        ({"patience": 0}, "patience must be an integer in [1, 1000000]; got 0"),
        ({"validation_fraction": 1.0}, "validation_fraction must be a finite number > 0 and < 1; got 1.0"),
        ({"log_mse_weight": 1.0}, "log_mse_weight must be 0 with loss 'mse' (it adds a log-scale squared error to a "
                                  "count likelihood: poisson, nb or zinb); got 1.0"),
        ({"activation": "swish"}, "activation must be one of: relu, elu, gelu, tanh, sigmoid, leaky_relu; got 'swish'"),
        ({"latent_dim": 0}, "latent_dim must be an integer in [1, 100000]; got 0"),
        ({"hidden": (10, 0)}, "hidden must be a sequence of integers in [1, 100000], e.g. (100,) or (256, 64); got (10, 0)"),
    ],
)
def test_bad_params_raise(small_dense, params, message):
    with pytest.raises(ValueError) as err:
        Autoencoder(epochs=1, **params).fit(small_dense[:20])
    assert str(err.value) == message


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
        "variational": False, "kl_warmup_epochs": 0, "norm": "none", "dropout": 0.0, "weight_decay": 0.0,
        "lr_schedule": "none", "early_stopping": False, "patience": 10, "validation_fraction": 0.1,
        "scale_input": False, "input_noise": 0.0, "log_mse_weight": 0.0,
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


# ---------------------------------------------------------------- divergence
def test_nan_loss_stops_training_in_that_epoch(small_dense, monkeypatch):
    """A loss that becomes NaN stops fit at the end of that epoch, not after all epochs."""
    mse = scae.likelihoods.get_likelihood("mse")
    real = mse.objective
    calls = []

    def nan_after_first_epoch(x, out, kl_weight=1.0, log_mse_weight=0.0):
        err, count = real(x, out, kl_weight, log_mse_weight)
        if torch.is_inference_mode_enabled():  # evaluation: left alone
            return err, count
        calls.append(1)
        return (err * float("nan"), count) if len(calls) > 8 else (err, count)

    monkeypatch.setattr(mse, "objective", nan_after_first_epoch)
    model = Autoencoder(latent_dim=3, hidden=(8,), epochs=50, batch_size=32, learning_rate=0.01)
    with pytest.raises(TrainingDivergedError) as err:
        model.fit(small_dense[:256])  # 8 batches per epoch: epoch 2 turns NaN
    assert str(err.value) == (
        "training diverged in epoch 2: the training loss became nan; try a lower learning rate (now 0.01) "
        "or normalise the input (e.g. log1p of library-size-normalised counts)"
    )
    assert isinstance(err.value, ScaeInputError)
    assert len(calls) == 16  # stopped after epoch 2, not after 50 epochs
    assert not hasattr(model, "net_") and not hasattr(model, "history_")


def test_input_too_large_for_float32_refused_at_epoch_0(small_dense):
    """Matrices are refused up front (scae.data); a row source given directly is caught by the trainer."""
    X = small_dense[:64].copy()
    X[3, 5] = 1e30  # finite, but its square is not in float32
    with pytest.raises(TrainingDivergedError, match=r"^the training loss of the untrained network is already inf "
                                                    r"\(epoch 0\): the input values are too large"):
        Autoencoder(latent_dim=2, hidden=(4,), epochs=30).fit(ArraySource(X))


def test_evaluation_loss_non_finite_is_refused(small_dense):
    test = small_dense[:20].copy()
    test[0, 0] = 1e30
    with pytest.raises(TrainingDivergedError, match=r"loss on the evaluation cells of the untrained network is already inf"):
        Autoencoder(latent_dim=2, hidden=(4,), epochs=3).fit(small_dense[20:80], eval_X=ArraySource(test))


def test_blown_up_training_is_refused(small_dense):
    """Adam with a huge step keeps the loss finite but far above the untrained network's."""
    model = Autoencoder(latent_dim=4, hidden=(16,), epochs=4, learning_rate=10.0, random_state=0)
    with pytest.raises(TrainingDivergedError) as err:
        model.fit(small_dense)
    message = str(err.value)
    assert message.startswith("training diverged: after 4 epoch(s) the training loss is ")
    ratio = float(message.split(", ")[1].split(" times")[0])
    assert ratio > DIVERGED_FACTOR
    assert message.endswith("try a lower learning rate (now 10) or normalise the input "
                            "(e.g. log1p of library-size-normalised counts)")


# ---------------------------------------------------------------- malformed model files
@pytest.fixture(scope="module")
def saved_state(fitted, tmp_path_factory) -> dict:
    """What a real model file holds, read back as the loader reads it."""
    path = tmp_path_factory.mktemp("model") / "ok.pt"
    fitted.save(path)
    return torch.load(path, weights_only=True)


def edited(state: dict, **changes) -> dict:
    out = {**state, "params": dict(state["params"]), "state_dict": dict(state["state_dict"])}
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


_DROP = object()


def _write_case(case: str, path, state: dict, fitted) -> None:
    good = io_bytes(state)
    weights = state["state_dict"]
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    elif case == "text":
        path.write_text("latent_dim = 10\nhidden = 100\n")
    elif case == "altered weights":  # bytes changed inside a stored weight tensor: torch.load takes it
        import zipfile

        path.write_bytes(good)
        with zipfile.ZipFile(path) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest weight matrix
        data = bytearray(good)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data[start + 8: start + 72] = np.random.default_rng(1).bytes(64)
        path.write_bytes(bytes(data))
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    elif case == "state dict only":
        torch.save(fitted.net_.state_dict(), path)
    elif case == "other format":
        torch.save({"format": "something/1", "state_dict": {}}, path)
    elif case == "non-ASCII version digit":  # str.isdigit() takes it, int() does not
        torch.save(edited(state, format="scae.Autoencoder/²"), path)
    elif case == "version of 5000 digits":  # more than int() converts
        torch.save(edited(state, format="scae.Autoencoder/" + "9" * 5000), path)
    elif case == "newer version":
        torch.save(edited(state, format="scae.Autoencoder/3"), path)
    elif case == "no state_dict":
        torch.save(edited(state, state_dict=_DROP), path)
    elif case == "unknown entry":
        torch.save(edited(state, optimizer={"lr": 1.0}), path)
    elif case == "unknown parameter":
        torch.save(edited(state, params={**state["params"], "momentum": 0.9}), path)
    elif case == "params not a dict":
        torch.save(edited(state, params=[1, 2]), path)
    elif case == "bad parameter value":
        torch.save(edited(state, params={**state["params"], "learning_rate": float("nan")}), path)
    elif case == "other architecture":
        torch.save(edited(state, params={**state["params"], "latent_dim": 7}), path)
    elif case == "missing weight":
        torch.save(edited(state, state_dict={k: v for k, v in weights.items() if k != "decoder.2.bias"}), path)
    elif case == "extra weight":
        torch.save(edited(state, state_dict={**weights, "encoder.9.weight": torch.zeros(2)}), path)
    elif case == "nan weight":
        torch.save(edited(state, state_dict={**weights, "encoder.0.bias": torch.full_like(weights["encoder.0.bias"], float("nan"))}), path)
    elif case == "sparse weight":
        torch.save(edited(state, state_dict={**weights, "encoder.0.weight": weights["encoder.0.weight"].to_sparse()}), path)
    elif case == "meta weight":
        torch.save(edited(state, state_dict={**weights, "encoder.0.bias": weights["encoder.0.bias"].to("meta")}), path)
    elif case == "bad n_features_in":
        torch.save(edited(state, n_features_in=-3), path)
    elif case == "huge architecture":
        torch.save(edited(state, n_features_in=10**6, params={**state["params"], "hidden": [100_000, 100_000]}), path)
    elif case == "history not a list":
        torch.save(edited(state, history="epochs"), path)
    else:  # pragma: no cover
        raise AssertionError(case)


def io_bytes(state: dict) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


EXPECTED = f"expected a model file written by scae's Autoencoder.save (format {MODEL_FORMAT})"
MALFORMED = {
    "missing": "cannot be read (No such file or directory); " + EXPECTED,
    "directory": "is a directory; " + EXPECTED,
    "empty": "is empty; " + EXPECTED,
    "truncated": "not a readable PyTorch file (truncated, corrupted or another kind of file); " + EXPECTED,
    "random bytes": "not a readable PyTorch file (truncated, corrupted or another kind of file); " + EXPECTED,
    "text": "not a readable PyTorch file (truncated, corrupted or another kind of file); " + EXPECTED,
    "altered weights": "damaged: its part 'archive/data/0' fails its checksum (the file was altered or corrupted "
                       "after it was written); " + EXPECTED,
    "tensor": "a PyTorch file but not an scae model (Tensor without a format entry); " + EXPECTED,
    "state dict only": "a PyTorch file but not an scae model (OrderedDict without a format entry); " + EXPECTED,
    "other format": "not an scae model file (format 'something/1'); " + EXPECTED,
    "non-ASCII version digit": "not an scae model file (format 'scae.Autoencoder/²'); " + EXPECTED,
    "version of 5000 digits": "not an scae model file (format 'scae.Autoencoder/99999999999999",
    "newer version": "written in model format version 3 by a newer scae; this scae reads version 2: upgrade scae to load it",
    "no state_dict": "incomplete scae model file: no 'state_dict' entry",
    "unknown entry": "unexpected entries 'optimizer' in an scae model file; " + EXPECTED,
    "unknown parameter": "unknown Autoencoder parameter(s) 'momentum'; expected some of: activation, batch_size, "
                         "device, dropout, early_stopping, epochs, hidden, input_noise, kl_warmup_epochs, latent_dim, "
                         "learning_rate, log_mse_weight, loss, lr_schedule, norm, patience, progress, random_state, "
                         "scale_input, validation_fraction, variational, weight_decay",
    "params not a dict": "params must be a dict of Autoencoder parameters; got list",
    "bad parameter value": "stored parameter learning_rate must be a finite number > 0 and <= 10; got nan",
    "other architecture": "the weights do not match the stored architecture (n_features_in=120, latent_dim=7, "
                          "hidden=(32,)): encoder.2.weight has shape (6, 32), expected (7, 32)",
    "missing weight": "the weights do not match the stored architecture (n_features_in=120, latent_dim=6, "
                      "hidden=(32,)): missing decoder.2.bias",
    "extra weight": "the weights do not match the stored architecture (n_features_in=120, latent_dim=6, "
                    "hidden=(32,)): unexpected encoder.9.weight",
    "nan weight": "weight encoder.0.bias holds NaN or infinite values",
    "sparse weight": "weight encoder.0.weight is a sparse tensor; expected dense values",
    "meta weight": "weight encoder.0.bias is a meta tensor; expected dense values",
    "bad n_features_in": "n_features_in must be a positive integer; got -3",
    "huge architecture": "the network 1000000 → 100000 → 100000 → 6 → 100000 → 100000 → 1000000 would have "
                         "220,002,600,006 parameters, more than 1,000,000,000",
    "history not a list": "history must be a list of per-epoch records; got str",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_load_malformed_file_is_one_clear_error(case, saved_state, fitted, tmp_path):
    path = tmp_path / "model.pt"
    if case != "missing":
        _write_case(case, path, saved_state, fitted)
    with pytest.raises(ScaeInputError) as err:
        Autoencoder.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {MALFORMED[case]}"), message
    assert "\n" not in message


@pytest.mark.parametrize(("path", "message"), [
    (None, "path must be a file name (str or pathlib.Path); got NoneType"),
    (3, "path must be a file name (str or pathlib.Path); got int"),
    (b"model.pt", "path must be a file name (str or pathlib.Path); got bytes"),
    ("a\0b.pt", "path 'a\\x00b.pt' holds a NUL character; expected a file name"),
    ("n" * 5000, "n" * 120 + ": cannot be read (File name too long); " + EXPECTED),
])
def test_load_of_a_path_that_names_no_file_is_one_clear_error(path, message):
    with pytest.raises(ScaeInputError) as err:
        Autoencoder.load(path)
    assert str(err.value) == message


@pytest.mark.parametrize("name", [["nb_dae"], 3, None])
def test_a_preset_named_by_something_else_than_a_string_is_a_value_error(name):
    with pytest.raises(ScaeInputError, match=r"^a preset is named by a string; got "):
        Autoencoder.from_preset(name)


def test_load_accepts_the_file_the_malformed_cases_start_from(saved_state, fitted, tmp_path):
    path = tmp_path / "again.pt"
    path.write_bytes(io_bytes(saved_state))
    assert Autoencoder.load(path).get_params() == fitted.get_params()


# ---------------------------------------------------------------- count models, VAE, regularisation
@pytest.fixture(scope="module")
def small_counts() -> np.ndarray:
    """Raw counts, 300 cells × 60 genes, 3 populations."""
    return scae.simulate_counts(300, 60, 3, seed=2)[0].toarray()


@pytest.mark.parametrize("loss", ["poisson", "nb", "zinb"])
def test_count_models_train_on_raw_counts(small_counts, loss):
    model = Autoencoder(latent_dim=4, hidden=(16,), loss=loss, epochs=4, batch_size=32)
    model.fit(small_counts[:240], eval_X=small_counts[240:])
    losses = [row["test_loss"] for row in model.history_]
    assert losses[-1] < losses[0]  # the negative log-likelihood falls
    assert all(np.isfinite(row["test_mse"]) for row in model.history_)
    Z, recon = model.transform_and_reconstruct(small_counts)
    assert Z.shape == (300, 4) and recon.shape == (300, 60)
    # the reconstruction is log1p of the expected proportions × 1e4: back on the count scale it sums to 1e4
    np.testing.assert_allclose(np.expm1(recon).sum(axis=1), 1e4, rtol=1e-3)
    # its MSE is measured against the log-normalised counts the network encodes
    library = small_counts.sum(axis=1, keepdims=True)
    lognorm = np.log1p(small_counts / library * 1e4)
    assert model.reconstruction_error(small_counts)["mse"] == pytest.approx(float(np.mean((lognorm - recon) ** 2)), rel=1e-4)


@pytest.mark.parametrize("bad,word", [(-1.0, "negative"), (0.5, "non-integer")])
def test_count_model_refuses_values_that_are_not_counts(small_counts, bad, word):
    X = small_counts.copy()
    X[3, 4] = bad
    with pytest.raises(ScaeInputError) as err:
        Autoencoder(loss="nb", epochs=1).fit(X)
    assert str(err.value) == (
        f"training matrix: loss 'nb' models raw counts, but the matrix holds {word} values (e.g. {bad:g}); give the "
        "raw counts (non-negative whole numbers), or use loss 'mse' for log-normalised values"
    )


def test_count_model_reads_a_normalising_source_raw(small_counts):
    source = ArraySource(small_counts, counts=True)  # MSE models read it log-normalised
    as_source = Autoencoder(loss="nb", latent_dim=3, hidden=(8,), epochs=2, batch_size=32).fit(source)
    as_array = Autoencoder(loss="nb", latent_dim=3, hidden=(8,), epochs=2, batch_size=32).fit(small_counts)
    assert as_source.history_ == as_array.history_


def test_variational_model_transform_is_the_posterior_mean_and_deterministic(small_counts):
    model = Autoencoder(latent_dim=3, hidden=(16,), loss="nb", variational=True, kl_warmup_epochs=2,
                        norm="batch", dropout=0.2, epochs=3, batch_size=32)
    model.fit(small_counts)
    np.testing.assert_array_equal(model.transform(small_counts), model.transform(small_counts))
    again = clone(model).fit(small_counts)  # dropout and latent samples are seeded
    assert again.history_ == model.history_
    other = clone(model).set_params(random_state=1).fit(small_counts)
    assert other.history_ != model.history_


def test_kl_weight_warms_up_linearly():
    assert [scae.training.kl_weight(e, 4) for e in range(1, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert scae.training.kl_weight(1, 0) == 1.0


def test_early_stopping_on_a_single_cell_says_what_to_do(small_dense):
    with pytest.raises(ScaeInputError) as err:
        Autoencoder(early_stopping=True, epochs=1).fit(small_dense[:1])
    assert str(err.value) == ("the training matrix has 1 cell; early stopping (early_stopping, --early-stopping, on in "
                              "the presets) holds some of them out, so it needs at least 2: give more cells, or turn "
                              "it off (early_stopping=False, --no-early-stopping)")
    Autoencoder(early_stopping=False, epochs=1).fit(small_dense[:1])  # without it, one cell trains


def test_early_stopping_keeps_the_best_epoch(small_dense):
    model = Autoencoder(latent_dim=4, hidden=(32,), epochs=60, batch_size=32, learning_rate=0.05,
                        early_stopping=True, patience=3, validation_fraction=0.2)
    model.fit(small_dense)
    val = [row["val_loss"] for row in model.history_]
    last = model.history_[-1]["epoch"]
    assert model.best_epoch_ == int(np.argmin(val[1:])) + 1
    assert last == model.best_epoch_ + 3 < 60  # stopped after 3 epochs without improvement
    # the kept weights are the best epoch's: the validation cells score exactly its loss again
    _, validation = scae.models._validation_split(ArraySource(small_dense), 0.2, 0)
    score = scae.training.evaluate_losses(model.net_, validation, ("mse",), model.device_)["mse"]
    assert score == pytest.approx(val[model.best_epoch_], rel=1e-6)


def test_validation_split_is_seeded_and_disjoint():
    source = ArraySource(np.arange(40, dtype=np.float32).reshape(20, 2))
    fit, held = scae.models._validation_split(source, 0.25, 7)
    rows_fit, rows_held = fit.read(slice(None))[:, 0] / 2, held.read(slice(None))[:, 0] / 2
    assert len(rows_held) == 5 and len(rows_fit) == 15
    assert set(rows_fit.tolist()).isdisjoint(rows_held.tolist())
    again = scae.models._validation_split(source, 0.25, 7)[1].read(slice(None))
    np.testing.assert_array_equal(again, held.read(slice(None)))


def test_weight_decay_uses_adamw_and_schedules_change_the_rate():
    from scae.optim import Adam

    net = AutoencoderNet(5, 2, (4,))
    adam = scae.training._optimizer(net, 1e-3, 0.0, torch.device("cpu"))
    assert type(adam) is Adam and adam.weight_decay == 0.0 and adam.fused
    adamw = scae.training._optimizer(net, 1e-3, 0.01, torch.device("cpu"))
    assert adamw.weight_decay == 0.01
    cosine = scae.training._scheduler(adamw, "cosine", 10)
    for _ in range(10):
        adamw.step()
        cosine.step()
    assert adamw.lr == pytest.approx(1e-5)  # 1% of the start after all epochs
    assert scae.training._scheduler(adamw, "none", 10) is None
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        scae.training._scheduler(adamw, "step", 10)


def test_plateau_schedule_halves_the_rate_when_the_loss_stalls():
    optimizer = scae.training._optimizer(AutoencoderNet(5, 2, (4,)), 1.0, 0.0, torch.device("cpu"))
    plateau = scae.training._scheduler(optimizer, "plateau", 20)
    for loss in [1.0] + [1.0] * scae.training.PLATEAU_PATIENCE:
        plateau.step(loss)
    assert optimizer.lr == 1.0  # patience epochs without progress: not yet
    plateau.step(1.0)
    assert optimizer.lr == 0.5


def test_presets_build_estimators_and_unknown_ones_are_refused():
    from scae.presets import PRESETS, RECOMMENDED

    model = Autoencoder.from_preset("recommended", epochs=3)
    assert model.epochs == 3
    assert model.get_params() == {**Autoencoder().get_params(), **PRESETS[RECOMMENDED], "epochs": 3}
    for name in PRESETS:
        Autoencoder.from_preset(name)._check_params()
    with pytest.raises(ScaeInputError, match="unknown preset 'best'; expected one of: recommended, "):
        Autoencoder.from_preset("best")


def test_count_vae_with_batch_norm_round_trips_through_a_file(small_counts, tmp_path):
    model = Autoencoder(latent_dim=3, hidden=(16,), loss="zinb", variational=True, norm="batch",
                        epochs=2, batch_size=32, early_stopping=True, patience=1).fit(small_counts)
    model.save(tmp_path / "m.pt")
    loaded = Autoencoder.load(tmp_path / "m.pt")
    assert loaded.get_params() == model.get_params() and loaded.best_epoch_ == model.best_epoch_
    np.testing.assert_array_equal(loaded.transform(small_counts), model.transform(small_counts))
    np.testing.assert_array_equal(loaded.reconstruct(small_counts), model.reconstruct(small_counts))


def test_load_puts_the_network_where_its_device_parameter_says_when_it_can(fitted, small_dense, tmp_path):
    path = tmp_path / "m.pt"
    fitted.save(path)  # device "auto"
    assert Autoencoder.load(path).device_ == scae.parallel.resolve_device("auto")
    assert Autoencoder.load(path, device="cpu").device_.type == "cpu"
    state = torch.load(path, weights_only=True)
    state["params"]["device"] = "mps" if torch.cuda.is_available() else "cuda"  # a device this machine lacks
    torch.save(state, path)
    if not torch.backends.mps.is_available():
        loaded = Autoencoder.load(path)
        assert loaded.device_.type == "cpu" and loaded.device == state["params"]["device"]
        np.testing.assert_allclose(loaded.transform(small_dense), fitted.transform(small_dense), rtol=1e-5, atol=1e-6)
        with pytest.raises(ScaeInputError, match=f"--device {loaded.device}: "):
            Autoencoder.load(path, device=loaded.device)  # asked for explicitly: refused
    with pytest.raises(ScaeInputError, match="unknown device 'tpu'"):
        Autoencoder.load(path, device="tpu")


def test_format_1_files_still_load(fitted, small_dense, tmp_path):
    path = tmp_path / "v1.pt"
    fitted.save(path)
    state = torch.load(path, weights_only=True)
    old_params = {k: state["params"][k] for k in ("latent_dim", "hidden", "activation", "loss", "epochs",
                                                  "batch_size", "learning_rate", "random_state", "device", "progress")}
    state.pop("best_epoch")
    torch.save({**state, "format": "scae.Autoencoder/1", "params": old_params}, path)
    loaded = Autoencoder.load(path)
    np.testing.assert_array_equal(loaded.transform(small_dense), fitted.transform(small_dense))
    assert loaded.best_epoch_ is None and loaded.variational is False


@pytest.mark.parametrize("metadata, message", [
    ({"a": np.arange(3)}, "metadata['a'] must be a plain string, number, boolean or None; got ndarray"),
    ({"a": object()}, "metadata['a'] must be a plain string, number, boolean or None; got object"),
    ({"a": np.float64(1.5)}, "metadata['a'] must be a plain string, number, boolean or None; got float64"),
    ({"a": np.str_("x")}, "metadata['a'] must be a plain string, number, boolean or None; got str_"),
    ({1: "x"}, "metadata names must be plain strings; got int '1'"),
    ({np.str_("k"): "x"}, "metadata names must be plain strings; got str_ 'k'"),
    ([1, 2], "metadata must be a dict of names to plain strings and numbers; got list"),
])
def test_save_refuses_metadata_load_could_not_read(fitted, tmp_path, metadata, message):
    with pytest.raises(ScaeInputError, match=re.escape(message)):
        fitted.save(tmp_path / "m.pt", metadata=metadata)
    assert list(tmp_path.iterdir()) == []
    fitted.save(tmp_path / "m.pt", metadata={"name": "x", "n": 3, "r": 0.5, "ok": True, "none": None})
    assert Autoencoder.load(tmp_path / "m.pt").metadata_ == {"name": "x", "n": 3, "r": 0.5, "ok": True, "none": None}


def test_save_to_a_folder_or_a_missing_folder_names_the_path(fitted, tmp_path):
    with pytest.raises(ScaeInputError, match=re.escape(f"{tmp_path}: is a directory; expected the path of the model file")):
        fitted.save(tmp_path)
    missing = tmp_path / "nope" / "m.pt"
    with pytest.raises(ScaeInputError, match=re.escape(f"{missing}: its folder {missing.parent} does not exist")):
        fitted.save(missing)
    assert list(tmp_path.iterdir()) == []


def test_device_before_fit_is_not_fitted():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        Autoencoder().device_


# ---------------------------------------------------------------- the host session
def test_a_float64_default_dtype_or_no_grad_in_the_caller_changes_nothing(small_dense, tmp_path):
    """torch.set_default_dtype(torch.float64) made a float64 network meet float32 batches; fit within
    torch.no_grad() or torch.inference_mode() had no gradients. Same numbers, the caller's settings back."""
    reference = Autoencoder(epochs=2, random_state=0, progress=False).fit(small_dense).transform(small_dense)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = Autoencoder(epochs=2, random_state=0, progress=False).fit(small_dense)
        assert torch.get_default_dtype() == torch.float64
        np.testing.assert_array_equal(model.transform(small_dense), reference)
        model.save(tmp_path / "m.pt")
        np.testing.assert_array_equal(Autoencoder.load(tmp_path / "m.pt").transform(small_dense), reference)
    finally:
        torch.set_default_dtype(previous)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            model = Autoencoder(epochs=2, random_state=0, progress=False).fit(small_dense)
            assert not torch.is_grad_enabled()
        np.testing.assert_array_equal(model.transform(small_dense), reference)


def test_fitting_without_a_progress_bar_leaves_multiprocessing_alone_and_needs_no_stderr():
    """A disabled tqdm bar still fixed multiprocessing's start method (a later set_start_method failed);
    an enabled one wrote to a sys.stderr that was None (pythonw, some services)."""
    code = ("import multiprocessing as mp, sys, numpy as np, scae\n"
            "X = np.random.default_rng(0).random((60, 8), dtype=np.float32)\n"
            "scae.Autoencoder(epochs=1, progress=False).fit(X)\n"
            "print(mp.get_start_method(allow_none=True))\n"
            "sys.stderr = None\n"
            "scae.Autoencoder(epochs=1, progress=True).fit(X)\n"
            "print('fitted')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=scae_env(), timeout=120)
    assert out.stdout.split() == ["None", "fitted"], out.stderr
