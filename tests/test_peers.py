"""scvi-tools' SCVI as a peer (scae.peers): the missing-package message everywhere, a real fit where
scvi-tools is installed (``pip install 'scae[peers]'``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import scae
from scae.errors import ScaeInputError
from scae.peers import fit_scvi, scvi_available


@pytest.fixture
def no_scvi(monkeypatch):
    """Make ``import scvi`` fail as it does where scvi-tools is not installed."""
    monkeypatch.setitem(sys.modules, "scvi", None)  # None in sys.modules: import raises ImportError


def test_scae_import_does_not_import_scvi():
    import subprocess

    code = "import sys, scae, scae.peers; print('scvi' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_missing_scvi_message(no_scvi):
    counts, _ = scae.simulate_counts(30, 20, seed=0)
    assert scvi_available() is False
    with pytest.raises(ScaeInputError) as info:
        fit_scvi(counts, max_epochs=1)
    message = str(info.value)
    assert message.startswith("scvi-tools is not installed; pip install 'scae[peers]'")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"seed": -1}, "seed must be an integer in [0, 4294967295]; got -1"),
        ({"n_latent": 0}, "n_latent must be an integer in [1, 100000]; got 0"),
        ({"max_epochs": 0}, "max_epochs must be an integer in [1, 1000000]; got 0"),
        ({"max_epochs": 2.5}, "max_epochs must be an integer in [1, 1000000]; got 2.5"),
        ({"progress": "yes"}, "progress must be True or False; got 'yes'"),
    ],
)
def test_bad_parameters_are_refused_before_scvi_is_needed(no_scvi, kwargs, expected):
    counts, _ = scae.simulate_counts(30, 20, seed=0)
    with pytest.raises(ScaeInputError) as info:
        fit_scvi(counts, **kwargs)
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        (np.log1p(np.arange(12, dtype=np.float32).reshape(4, 3)), "counts: the matrix is not raw counts"),
        (np.array([[1, -2, 3], [4, 5, 6]]), "counts: the matrix is not raw counts"),
        (np.array([[1, 2, 3], [0, 0, 0], [4, 5, 6]]), "counts: 1 cell(s) have no counts, first at row 1"),
        (np.array([[1, np.nan, 3], [4, 5, 6]]), "counts: 1 NaN or infinite value(s), first at row 0, column 1"),
        (np.array([1, 2, 3]), "counts: matrix has shape (3,) (1-D); expected 2-D cells × genes"),
    ],
)
def test_bad_counts_are_refused_before_scvi_is_needed(no_scvi, matrix, expected):
    with pytest.raises(ScaeInputError) as info:
        fit_scvi(matrix, max_epochs=1)
    assert str(info.value).startswith(expected)


@pytest.fixture(scope="module")
def tiny_counts():
    return scae.simulate_counts(300, 50)


def test_one_epoch_fit_shape_finite_and_seeded(tiny_counts, capfd):
    pytest.importorskip("scvi")
    counts, _ = tiny_counts
    before = counts.copy()
    latent, info = fit_scvi(counts, seed=3, max_epochs=1)
    assert latent.shape == (300, 10) and latent.dtype == np.float32
    assert np.all(np.isfinite(latent))
    assert latent.std(axis=0).min() > 0  # a real embedding, not a constant
    assert info["epochs"] == 1 and info["max_epochs"] == 1
    assert info["fit_seconds"] > 0
    assert (info["n_cells"], info["n_genes"]) == (300, 50)
    import scvi

    assert info["scvi_version"] == scvi.__version__
    # the input is not modified (same sparsity structure and values)
    assert (counts != before).nnz == 0 and counts.dtype == before.dtype
    # quiet by default: no progress bar or Lightning chatter
    out, err = capfd.readouterr()
    assert "GPU available" not in out + err and "Epoch" not in out + err

    again, _ = fit_scvi(counts, seed=3, max_epochs=1)
    np.testing.assert_array_equal(again, latent)
    other, _ = fit_scvi(counts.toarray(), seed=4, max_epochs=1, n_latent=4)
    assert other.shape == (300, 4)


def test_dense_and_sparse_input_give_the_same_latent(tiny_counts):
    pytest.importorskip("scvi")
    counts, _ = tiny_counts
    sparse, _ = fit_scvi(counts, seed=0, max_epochs=1)
    dense, _ = fit_scvi(counts.toarray().astype(np.int64), seed=0, max_epochs=1)
    np.testing.assert_allclose(dense, sparse, rtol=1e-5, atol=1e-5)


def test_default_epochs_follow_scvi_rule(tiny_counts, monkeypatch):
    """``max_epochs=None`` leaves the number of epochs to scvi-tools' own rule."""
    scvi = pytest.importorskip("scvi")
    asked = {}
    original = scvi.model.SCVI.train

    def train(self, max_epochs=None, **kwargs):  # record what fit_scvi asks, then train 1 epoch
        asked["max_epochs"] = max_epochs
        return original(self, max_epochs=1, **kwargs)

    monkeypatch.setattr(scvi.model.SCVI, "train", train)
    counts, _ = tiny_counts
    _, info = fit_scvi(counts, seed=0)
    assert asked["max_epochs"] is None  # scvi-tools decides
    assert info["epochs"] == 1
