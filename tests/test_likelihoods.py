"""Count likelihoods against scipy.stats, the likelihood interface, and count/variational networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

import scae.likelihoods
from scae.likelihoods import (
    COUNT_LOSSES,
    LIKELIHOODS,
    Output,
    get_likelihood,
    nb_log_likelihood_sum,
    nb_log_prob,
    poisson_log_prob,
    zinb_log_prob,
)
from scae.models import AutoencoderNet
from scae.params import LOSSES


@pytest.fixture(scope="module")
def count_values():
    """Counts from 0 to 10⁵, means from 10⁻³ to 10⁴, inverse dispersions from 10⁻² to 10³."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros(40), rng.integers(1, 5, 40), rng.integers(5, 1000, 40), [1e4, 5e4, 1e5] * 5])
    mean = 10 ** rng.uniform(-3, 4, x.size)
    theta = 10 ** rng.uniform(-2, 3, x.size)
    logit = rng.normal(0, 3, x.size)
    return x, mean, theta, logit


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


@pytest.fixture(params=["gathered", "masked"])
def nb_formulation(request, monkeypatch):
    """Both ways the NB terms that vanish at zero counts are summed: on the nonzero entries
    gathered (the CPU's way) and on every entry masked (a GPU's: no host synchronisation, no
    scatter-add)."""
    if request.param == "masked":
        monkeypatch.setattr(scae.likelihoods, "_sparse_on", lambda x: False)
    return request.param


def test_poisson_log_prob_matches_scipy(count_values):
    x, mean, _, _ = count_values
    got = poisson_log_prob(_t(x), _t(np.log(mean))).numpy()
    np.testing.assert_allclose(got, stats.poisson.logpmf(x, mean), rtol=1e-9, atol=1e-9)


def test_nb_log_prob_matches_scipy(count_values):
    x, mean, theta, _ = count_values
    got = nb_log_prob(_t(x), _t(np.log(mean)), _t(np.log(theta))).numpy()
    # scipy's nbinom(n, p): n failures, success probability p; mean μ and inverse dispersion θ give n = θ, p = θ/(θ+μ)
    expected = stats.nbinom.logpmf(x, theta, theta / (theta + mean))
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)


def test_zinb_log_prob_matches_the_mixture(count_values):
    x, mean, theta, logit = count_values
    got = zinb_log_prob(_t(x), _t(np.log(mean)), _t(np.log(theta)), _t(logit)).numpy()
    pi = expit(logit)
    nb = stats.nbinom.logpmf(x, theta, theta / (theta + mean))
    # P(x) = π·[x = 0] + (1 − π)·NB(x)
    expected = np.where(
        x == 0,
        logsumexp(np.stack([np.log(pi), np.log1p(-pi) + nb]), axis=0),
        np.log1p(-pi) + nb,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)


def test_nb_with_huge_inverse_dispersion_approaches_poisson():
    x, log_mean = _t([0.0, 3.0, 40.0]), _t(np.log([0.5, 3.0, 35.0]))
    nb = nb_log_prob(x, log_mean, _t(np.full(3, np.log(1e8))))
    np.testing.assert_allclose(nb.numpy(), poisson_log_prob(x, log_mean).numpy(), rtol=1e-6)


def test_count_log_probs_are_finite_in_float32_at_the_extremes():
    x = torch.tensor([0.0, 0.0, 1e5, 1.0])
    log_mean = torch.tensor([-40.0, 20.0, 0.0, 25.0])  # μ from e⁻⁴⁰ to e²⁵
    log_theta = torch.tensor([-8.0, 12.0, 0.0, 10.0])
    for values in (nb_log_prob(x, log_mean, log_theta), zinb_log_prob(x, log_mean, log_theta, torch.tensor([30.0, -30.0, 0.0, 5.0]))):
        assert torch.isfinite(values).all()


def _output(x, **parts) -> Output:
    return Output(latent=torch.zeros(x.shape[0], 2), reconstruction=parts.pop("reconstruction", x), target=x, **parts)


def test_likelihood_terms_are_sums_and_entry_counts():
    x = torch.tensor([[0.0, 2.0, 5.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    log_mean = torch.log(torch.tensor([[0.5, 2.0, 4.0], [1.0, 0.2, 2.5]], dtype=torch.float64))
    log_theta = torch.log(torch.tensor([2.0, 0.5, 9.0], dtype=torch.float64))  # one per gene
    logit = torch.tensor([[1.0, -2.0, 0.0], [0.5, 3.0, -1.0]], dtype=torch.float64)
    out = _output(x, log_mean=log_mean, log_theta=log_theta, dropout_logit=logit)
    for name, expected in (
        ("poisson", -stats.poisson.logpmf(x.numpy(), log_mean.exp().numpy()).sum()),
        ("nb", -stats.nbinom.logpmf(x.numpy(), log_theta.exp().numpy(),
                                    (log_theta.exp() / (log_theta.exp() + log_mean.exp())).numpy()).sum()),
        ("zinb", -zinb_log_prob(x, log_mean, log_theta, logit).sum().item()),
    ):
        total, count = get_likelihood(name).terms(x, out)  # NB and ZINB summed sparsely
        assert float(count) == 6.0
        assert float(total) == pytest.approx(expected, rel=1e-10)
    # MSE compares the reconstruction with what the network encoded (the target), not the raw batch
    recon = x + 1.0
    total, count = get_likelihood("mse").terms(x * 100, _output(x, reconstruction=recon))
    assert (float(total), float(count)) == (6.0, 6.0)


def test_objective_adds_the_weighted_kl_sum():
    x = torch.ones(2, 3)
    out = _output(x, reconstruction=x + 2.0, kl=torch.tensor([0.5, 1.5]))
    like = get_likelihood("mse")
    assert float(like.objective(x, out, kl_weight=0.25)[0]) == pytest.approx(24.0 + 0.25 * 2.0)
    assert float(like.objective(x, out._replace(kl=None), kl_weight=0.25)[0]) == pytest.approx(24.0)


def test_loss_names_agree_between_params_and_likelihoods():
    assert LOSSES == tuple(LIKELIHOODS)
    assert COUNT_LOSSES == ("poisson", "nb", "zinb")
    with pytest.raises(ValueError, match="unknown loss 'gauss'"):
        get_likelihood("gauss")


# ---------------------------------------------------------------- networks
def _counts(n=6, g=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).poisson(3.0, (n, g)).astype(np.float32))


@pytest.mark.parametrize("loss", COUNT_LOSSES)
def test_count_network_outputs_proportions_of_the_library(loss):
    torch.manual_seed(0)
    net = AutoencoderNet(5, 2, (8,), loss=loss).eval()
    x = _counts()
    out = net(x)
    library = x.sum(dim=1)
    np.testing.assert_allclose(out.log_mean.exp().sum(dim=1).detach().numpy(), library.numpy(), rtol=1e-5)
    rho = out.log_mean.exp() / library[:, None]
    np.testing.assert_allclose(out.reconstruction.detach().numpy(), np.log1p(rho.detach().numpy() * 1e4), rtol=1e-5)
    expected_input = np.log1p(x.numpy() / library.numpy()[:, None] * 1e4)
    np.testing.assert_allclose(out.target.numpy(), expected_input, rtol=1e-6)
    np.testing.assert_array_equal(net.encode(x).detach().numpy(), out.latent.detach().numpy())
    assert (out.log_theta is not None) == (loss in ("nb", "zinb"))
    assert (out.dropout_logit is not None) == (loss == "zinb")
    assert out.kl is None


def test_variational_network_samples_in_training_and_uses_the_mean_in_evaluation():
    torch.manual_seed(0)
    net = AutoencoderNet(5, 3, (8,), loss="nb", variational=True)
    x = _counts()
    net.eval()
    first, second = net(x), net(x)
    torch.testing.assert_close(first.latent, second.latent)
    torch.testing.assert_close(first.latent, net.encode(x))
    h = net.encoder[1](net.encoder[0](net.model_input(x)))
    mean, var = net.encoder[2](h), net.z_log_var(h).exp() + 1e-4
    expected_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=1)
    torch.testing.assert_close(first.kl, expected_kl, rtol=1e-5, atol=1e-6)
    net.train()
    assert not torch.allclose(net(x).latent, net(x).latent)


def test_default_network_layout_is_unchanged():
    """Model files from before the count models keep loading: same parameter names for the defaults."""
    net = AutoencoderNet(7, 3)
    assert list(net.state_dict()) == [
        "encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
        "decoder.0.weight", "decoder.0.bias", "decoder.2.weight", "decoder.2.bias",
    ]


def test_norm_and_dropout_layers():
    net = AutoencoderNet(7, 3, (6, 4), norm="batch", dropout=0.2)
    kinds = [type(m).__name__ for m in net.encoder]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert [type(m).__name__ for m in AutoencoderNet(7, 3, (6,), norm="layer").decoder] == ["Linear", "LayerNorm", "ReLU", "Linear"]


@pytest.mark.parametrize("loss", ["nb", "zinb"])
def test_sparse_sums_and_their_gradients_equal_the_dense_formula(loss, nb_formulation):
    """The summed NB/ZINB terms skip lgamma on zero entries; value and gradients are the dense sum's."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.poisson(0.7, (7, 5)).astype(np.float64))
    x[2] = 0.0  # a cell without counts
    leaves = [torch.from_numpy(a).requires_grad_() for a in
              (rng.normal(0, 2, (7, 5)), rng.normal(0, 1, 5), rng.normal(0, 2, (7, 5)))]
    log_mean, log_theta, logit = leaves
    out = _output(x, log_mean=log_mean, log_theta=log_theta, dropout_logit=logit)
    sparse = get_likelihood(loss).terms(x, out)[0]
    grads = torch.autograd.grad(sparse, leaves, allow_unused=True)
    dense_fn = nb_log_prob(x, log_mean, log_theta) if loss == "nb" else zinb_log_prob(x, log_mean, log_theta, logit)
    dense = -dense_fn.sum()
    dense_grads = torch.autograd.grad(dense, leaves, allow_unused=True)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-12)
    for got, expected in zip(grads, dense_grads):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_log_mse_weight_adds_the_squared_error_of_the_log_normalised_reconstruction():
    torch.manual_seed(0)
    net = AutoencoderNet(5, 2, (8,), loss="nb")
    x = _counts()
    nb = get_likelihood("nb")
    net.train()
    out = net(x)  # training mode: the count network leaves the reconstruction out
    assert out.reconstruction is None
    plain, count = nb.objective(x, out)
    weighted, _ = nb.objective(x, out, log_mse_weight=0.5)
    net.eval()
    recon = net(x).reconstruction  # the same weights: evaluation mode computes it
    library = x.sum(dim=1, keepdim=True)
    expected = 0.5 * ((torch.log1p(x / library * 1e4) - recon) ** 2).sum()
    assert (weighted - plain).item() == pytest.approx(expected.item(), rel=1e-5)
    assert count.item() == x.numel()
    mse_out = AutoencoderNet(5, 2, (8,)).eval()(x)  # not a count likelihood: no extra term
    mse = get_likelihood("mse")
    assert mse.objective(x, mse_out, log_mse_weight=0.5)[0].item() == mse.terms(x, mse_out)[0].item()


def test_nb_sum_with_written_out_gradient_matches_autograd_in_float32_at_the_extremes(nb_formulation):
    """The fused NB sum (one pass forward, its gradient written out) agrees in float32 with
    autograd on the per-entry formula in float64: counts 0 to 10⁵, μ from e⁻¹⁵ to e¹², θ from e⁻⁶ to e⁹."""
    rng = np.random.default_rng(3)
    cells, genes = 40, 30
    x = rng.poisson(rng.gamma(0.3, 4.0, (cells, genes))).astype(np.float64)
    x[0, :5] = [1e5, 5e4, 1e3, 1.0, 0.0]
    x[5] = 0.0  # a cell without counts
    x[:, 7] = 0.0  # a gene without counts
    log_mean = rng.uniform(-15, 12, (cells, genes))
    log_theta = rng.uniform(-6, 9, genes)
    leaves64 = [_t(a).requires_grad_() for a in (log_mean, log_theta)]
    expected = nb_log_prob(_t(x), *leaves64).sum()
    expected_grads = torch.autograd.grad(expected, leaves64)
    leaves32 = [_t(a).float().requires_grad_() for a in (log_mean, log_theta)]
    got = nb_log_likelihood_sum(_t(x).float(), *leaves32)
    grads = torch.autograd.grad(got, leaves32)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-3 * e.abs().max().item())


def test_nb_sum_gradient_only_for_the_mean_when_theta_is_fixed(nb_formulation):
    x = torch.tensor([[0.0, 2.0], [7.0, 0.0]], dtype=torch.float64)
    log_mean = torch.tensor([[0.1, 0.5], [2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    log_theta = torch.tensor([0.3, -0.2], dtype=torch.float64)  # no gradient wanted
    (grad,) = torch.autograd.grad(nb_log_likelihood_sum(x, log_mean, log_theta), (log_mean,))
    (expected,) = torch.autograd.grad(nb_log_prob(x, log_mean, log_theta).sum(), (log_mean,))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    # a scalar θ broadcasts over the genes like a per-gene one
    scalar = torch.tensor([0.3], dtype=torch.float64)
    assert nb_log_likelihood_sum(x, log_mean, scalar).item() == pytest.approx(
        nb_log_prob(x, log_mean, scalar).sum().item(), rel=1e-12)


def test_masked_nb_sum_keeps_float32_precision_at_large_inverse_dispersion(monkeypatch):
    """On a GPU, lgamma(x + θ) − lgamma(θ) is taken entry by entry: at θ = e¹² (a gene close to
    Poisson) the float32 sum stays within 2e-4 of float64 (the per-gene difference of two sums
    of huge lgammas would lose three digits)."""
    monkeypatch.setattr(scae.likelihoods, "_sparse_on", lambda x: False)
    rng = np.random.default_rng(7)
    x = rng.poisson(3.0, (64, 8)).astype(np.float64)
    log_mean = rng.uniform(0.0, 2.0, (64, 8))
    log_theta = np.full(8, 12.0)
    expected = nb_log_prob(_t(x), _t(log_mean), _t(log_theta)).sum().item()
    got = nb_log_likelihood_sum(_t(x).float(), _t(log_mean).float(), _t(log_theta).float()).item()
    assert got == pytest.approx(expected, rel=2e-4)
