"""Reconstruction losses against a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scae.losses import LOSSES, get_loss, get_loss_terms, mse, mse_terms, nonzero_mse, nonzero_mse_terms


def sparse_batch(seed: int, dtype, shape=(17, 23), zero_fraction=0.7):
    """A random batch with ~70% exact zeros in the input and a dense 'reconstruction'."""
    rng = np.random.default_rng(seed)
    y = rng.gamma(1.0, 2.0, size=shape)
    y[rng.random(shape) < zero_fraction] = 0.0
    y_hat = rng.normal(0.5, 1.5, size=shape)
    return y.astype(dtype), y_hat.astype(dtype)


def np_nonzero_mse(y: np.ndarray, y_hat: np.ndarray) -> float:
    y, y_hat = y.astype(np.float64), y_hat.astype(np.float64)
    mask = (y != 0).astype(np.float64)
    return float(np.sum(mask * (y - y_hat * mask) ** 2) / np.sum(mask))


def np_mse(y: np.ndarray, y_hat: np.ndarray) -> float:
    y, y_hat = y.astype(np.float64), y_hat.astype(np.float64)
    return float(np.mean((y - y_hat) ** 2))


DTYPES = [(np.float32, torch.float32, 1e-5), (np.float64, torch.float64, 1e-12)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("np_dtype,torch_dtype,rtol", DTYPES)
def test_nonzero_mse_matches_numpy_reference(seed, np_dtype, torch_dtype, rtol):
    y, y_hat = sparse_batch(seed, np_dtype)
    assert 0 < np.count_nonzero(y) < y.size  # really a mix of zeros and nonzeros
    value = nonzero_mse(torch.from_numpy(y), torch.from_numpy(y_hat))
    assert value.dtype == torch_dtype
    assert value.ndim == 0
    np.testing.assert_allclose(float(value), np_nonzero_mse(y, y_hat), rtol=rtol)
    # it really ignores the zero entries: differs from the plain MSE on this batch
    assert abs(float(value) - np_mse(y, y_hat)) > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("np_dtype,torch_dtype,rtol", DTYPES)
def test_mse_matches_numpy_reference(seed, np_dtype, torch_dtype, rtol):
    y, y_hat = sparse_batch(seed, np_dtype)
    value = mse(torch.from_numpy(y), torch.from_numpy(y_hat))
    assert value.dtype == torch_dtype
    np.testing.assert_allclose(float(value), np_mse(y, y_hat), rtol=rtol)


@pytest.mark.parametrize("seed", [0, 5])
def test_terms_give_sum_and_count(seed):
    y, y_hat = sparse_batch(seed, np.float64)
    yt, yht = torch.from_numpy(y), torch.from_numpy(y_hat)
    total, count = nonzero_mse_terms(yt, yht)
    assert float(count) == np.count_nonzero(y)
    mask = y != 0
    np.testing.assert_allclose(float(total), np.sum((y[mask] - y_hat[mask]) ** 2), rtol=1e-12)
    total, count = mse_terms(yt, yht)
    assert float(count) == y.size
    np.testing.assert_allclose(float(total), np.sum((y - y_hat) ** 2), rtol=1e-12)


def test_terms_add_up_over_batches_to_whole_matrix_loss():
    """Sum/count pairs of row batches combine to the exact loss of the whole matrix."""
    y, y_hat = sparse_batch(7, np.float64, shape=(40, 11))
    for terms, reference in ((nonzero_mse_terms, np_nonzero_mse), (mse_terms, np_mse)):
        parts = [terms(torch.from_numpy(y[i : i + 13]), torch.from_numpy(y_hat[i : i + 13])) for i in range(0, 40, 13)]
        total = sum(float(t) for t, _ in parts) / sum(float(c) for _, c in parts)
        np.testing.assert_allclose(total, reference(y, y_hat), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonzero_mse_of_all_zero_batch_is_zero_not_nan(dtype):
    y = torch.zeros((5, 8), dtype=dtype)
    y_hat = torch.randn((5, 8), generator=torch.Generator().manual_seed(0), dtype=dtype, requires_grad=True)
    value = nonzero_mse(y, y_hat)
    assert torch.isfinite(value)
    assert value.item() == 0.0
    value.backward()
    assert torch.all(y_hat.grad == 0)


def test_mse_is_zero_for_perfect_reconstruction():
    y, _ = sparse_batch(3, np.float32)
    t = torch.from_numpy(y)
    assert float(mse(t, t.clone())) == 0.0
    assert float(nonzero_mse(t, t.clone())) == 0.0


def test_nonzero_mse_ignores_predictions_at_zero_entries():
    y, y_hat = sparse_batch(11, np.float64)
    changed = y_hat.copy()
    changed[y == 0] += 100.0  # wildly wrong only where the input is zero
    a = nonzero_mse(torch.from_numpy(y), torch.from_numpy(y_hat))
    b = nonzero_mse(torch.from_numpy(y), torch.from_numpy(changed))
    assert float(a) == float(b)
    assert float(mse(torch.from_numpy(y), torch.from_numpy(changed))) > float(mse(torch.from_numpy(y), torch.from_numpy(y_hat)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonzero_mse_gradient_flows_only_through_nonzero_entries(seed):
    y, y_hat = sparse_batch(seed, np.float64)
    yt = torch.from_numpy(y)
    x_hat = torch.from_numpy(y_hat).requires_grad_(True)
    nonzero_mse(yt, x_hat).backward()
    grad = x_hat.grad.numpy()
    zero = y == 0
    assert np.all(grad[zero] == 0.0)
    # and on nonzero entries it is the analytic gradient -2 (y - y_hat) / n_nonzero
    expected = -2.0 * (y - y_hat) / np.count_nonzero(y)
    np.testing.assert_allclose(grad[~zero], expected[~zero], rtol=1e-10)
    assert np.all(grad[~zero] != 0.0)


def test_mse_gradient_flows_through_all_entries():
    y, y_hat = sparse_batch(2, np.float64)
    x_hat = torch.from_numpy(y_hat).requires_grad_(True)
    mse(torch.from_numpy(y), x_hat).backward()
    np.testing.assert_allclose(x_hat.grad.numpy(), -2.0 * (y - y_hat) / y.size, rtol=1e-10)


def test_get_loss_returns_named_functions():
    assert set(LOSSES) == {"mse", "nonzero_mse"}
    assert get_loss("mse") is mse
    assert get_loss("nonzero_mse") is nonzero_mse
    assert get_loss_terms("mse") is mse_terms
    assert get_loss_terms("nonzero_mse") is nonzero_mse_terms


@pytest.mark.parametrize("name", ["MSE", "mae", "", "nonzero"])
def test_get_loss_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown loss") as info:
        get_loss(name)
    assert "mse" in str(info.value) and "nonzero_mse" in str(info.value)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss_terms(name)
