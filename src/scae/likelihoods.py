"""Likelihoods: how a network's output is scored against a batch of cells.

A network (:class:`scae.models.AutoencoderNet`) maps a batch to an :class:`Output`; a
:class:`Likelihood` turns the batch and that output into a pair of *sums* (error sum, entry
count), so that the loss of a batch is ``sum / count`` and the loss of many batches is
``total sum / total count`` — exact however the cells are split into batches or processes
(:class:`scae.losses.LossTotals` accumulates them).

- :class:`MSE` and :class:`NonzeroMSE` compare the reconstruction with the values the network
  encoded (the log-normalised matrix), as the assignment's runs do.
- :class:`Poisson`, :class:`NegativeBinomial` and :class:`ZeroInflatedNB` are negative
  log-likelihoods of the *raw counts*: the decoder gives per-gene proportions ρ (a softmax), the
  mean is ρ times the cell's library size, the negative binomial adds a learned per-gene
  inverse dispersion θ, and the zero-inflated one a per-entry dropout logit. Each entry counts
  once, so the loss is the mean negative log-likelihood per entry.

A variational network adds its KL term through the same door: :meth:`Likelihood.objective`
adds ``kl_weight × Σ KL`` to the error sum; a count model may add the squared error of its
log-normalised reconstruction (``log_mse_weight``), which keeps its latent faithful to the
log-scale geometry that neighbours and clusters are measured in.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from scae.losses import mse_terms, nonzero_mse_terms
from scae.sources import TARGET_SUM

LOG_EPS = 1e-8
"""Added to a cell's library size before its log (a cell without counts has a finite loss)."""


class Output(NamedTuple):
    """What a network returns for a batch."""

    latent: torch.Tensor
    """Latent codes (a variational network samples them while training; else the posterior mean)."""
    reconstruction: torch.Tensor | None
    """The reconstruction on the scale the network encodes: the input itself for MSE networks,
    ``log1p(ρ × 10⁴)`` (the expected proportions, normalised like the input) for count networks
    (which compute it in evaluation mode only: their training loss does not need it)."""
    target: torch.Tensor
    """What the network encoded: the batch, or ``log1p(counts / library × 10⁴)`` for count networks."""
    log_mean: torch.Tensor | None = None
    """Count networks: log of the expected counts, ``log ρ + log library``."""
    log_theta: torch.Tensor | None = None
    """Negative binomial: per-gene log inverse dispersion (one row, broadcast over the batch)."""
    dropout_logit: torch.Tensor | None = None
    """Zero-inflated negative binomial: logit of each entry's dropout probability."""
    kl: torch.Tensor | None = None
    """Variational networks: each cell's KL divergence of q(z | x) from the N(0, I) prior."""


# ---------------------------------------------------------------- log-probabilities, per entry
def poisson_log_prob(x: torch.Tensor, log_mean: torch.Tensor) -> torch.Tensor:
    """``log P(x)`` under Poisson(μ), with ``log_mean = log μ``."""
    return x * log_mean - log_mean.exp() - torch.lgamma(x + 1.0)


def nb_log_prob(x: torch.Tensor, log_mean: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """``log P(x)`` under the negative binomial with mean μ and inverse dispersion θ
    (variance ``μ + μ² / θ``), from ``log μ`` and ``log θ`` (broadcast against each other):
    ``lgamma(x + θ) − lgamma(θ) − lgamma(x + 1) + θ·log(θ / (θ + μ)) + x·log(μ / (θ + μ))``.
    """
    theta = log_theta.exp()
    log_theta_mean = torch.logaddexp(log_theta, log_mean)  # log(θ + μ), without overflow
    return (
        torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
        + theta * (log_theta - log_theta_mean) + x * (log_mean - log_theta_mean)
    )


def zinb_log_prob(
    x: torch.Tensor, log_mean: torch.Tensor, log_theta: torch.Tensor, dropout_logit: torch.Tensor
) -> torch.Tensor:
    """``log P(x)`` under the zero-inflated negative binomial: with probability
    ``π = sigmoid(dropout_logit)`` a zero, otherwise a draw of :func:`nb_log_prob`'s distribution.
    """
    nb = nb_log_prob(x, log_mean, log_theta)
    log_keep = -F.softplus(dropout_logit)  # log(1 − π)
    log_drop = -F.softplus(-dropout_logit)  # log π
    zero = torch.logaddexp(log_drop, log_keep + nb)  # x = 0: a dropout, or an NB zero
    return torch.where(x > 0, log_keep + nb, zero)


def _sparse_on(x: torch.Tensor) -> bool:
    """Whether the NB terms that vanish at zero counts are computed on the nonzero entries only.

    On the CPU, yes: gathering the nonzero entries saves most ``lgamma``/``digamma`` calls. On a
    GPU they are computed on every entry and masked instead: finding the nonzero entries needs
    their number on the host (a synchronisation at every step), and their gradients would be
    added up by atomic (run-to-run nondeterministic) scatter-adds.
    """
    return x.device.type == "cpu"


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the true entries of a CPU boolean tensor (NumPy's search: about five
    times faster than ``torch.nonzero``)."""
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


class _NonzeroEntries(NamedTuple):
    """The nonzero entries of a count batch: where they are, their values and genes."""

    mask: torch.Tensor
    values: torch.Tensor
    genes: torch.Tensor
    per_gene: torch.Tensor
    """Nonzero entries of each gene (as the batch's dtype)."""


def _nonzero_entries(x: torch.Tensor) -> _NonzeroEntries:
    mask = x > 0
    flat = _flat_nonzero(mask)
    genes = flat % x.shape[1]
    per_gene = torch.bincount(genes, minlength=x.shape[1]).to(x.dtype)
    return _NonzeroEntries(mask, x.reshape(-1).index_select(0, flat), genes, per_gene)


def _nb_sums(x: torch.Tensor, log_mean: torch.Tensor, log_theta: torch.Tensor):
    """The pieces of the summed NB log-likelihood of a count batch, computed sparsely.

    ``log_theta`` is one row (per gene). Returns ``(zero_terms, rest_sum, nonzero)``:
    ``zero_terms = θ·log(θ / (θ + μ))`` for every entry (an entry's log-probability when it is
    0), and the sum over all entries of what the others add,
    ``x·log(μ / (θ + μ)) + lgamma(x + θ) − lgamma(θ) − lgamma(x + 1)``. The ``lgamma`` terms
    vanish at ``x = 0``, so they run only on the nonzero entries of sparse counts (``lgamma(θ)``
    once per gene, weighted by its number of nonzero entries).
    """
    log_theta = log_theta.reshape(-1)
    theta = log_theta.exp()
    log_theta_mean = torch.logaddexp(log_theta, log_mean)  # log(θ + μ), without overflow
    zero_terms = theta * (log_theta - log_theta_mean)
    rest_sum = (x * (log_mean - log_theta_mean)).sum()
    if not _sparse_on(x):
        mask = x > 0
        lgammas = torch.lgamma(x + theta) - torch.lgamma(x + 1.0) - torch.lgamma(theta)
        return zero_terms, rest_sum + torch.where(mask, lgammas, 0.0).sum(), mask
    entries = _nonzero_entries(x)
    xn = entries.values
    rest_sum = (
        rest_sum
        + (torch.lgamma(xn + theta.index_select(0, entries.genes)) - torch.lgamma(xn + 1.0)).sum()
        - (entries.per_gene * torch.lgamma(theta)).sum()
    )
    return zero_terms, rest_sum, entries.mask


class _NBLogLikelihoodSum(torch.autograd.Function):
    """``Σ log P(x)`` of a count batch under NB(μ, θ), with its gradient written out.

    The same sum as :func:`nb_log_prob` (and :func:`_nb_sums`), in a few passes over the batch
    instead of autograd's two dozen: with ``u = log μ − log θ`` and ``s = softplus(u) =
    log(1 + μ/θ)``, an entry's log-probability is
    ``x·(u − s) − θ·s + [lgamma(x + θ) − lgamma(θ) − lgamma(x + 1)]``, the bracket only at
    nonzero ``x``; its derivatives are ``∂/∂log μ = x − (x + θ)·sigmoid(u)`` and
    ``∂/∂log θ = θ·[ψ(x + θ) − ψ(θ)] − θ·s − ∂/∂log μ`` (ψ at nonzero ``x`` only), summed over
    the cells for the per-gene ``log θ``. Tested against autograd on :func:`nb_log_prob`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, log_mean: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
        theta = log_theta.exp()
        u = log_mean - log_theta
        s = F.softplus(u)
        s_per_gene = s.sum(dim=0)
        dense = torch.dot(x.reshape(-1), u.sub_(s).reshape(-1)) - torch.dot(theta, s_per_gene)
        ctx.sparse = _sparse_on(x)
        if ctx.sparse:  # the lgamma terms of the nonzero entries, gathered
            entries = _nonzero_entries(x)
            x_theta = entries.values + theta.index_select(0, entries.genes)
            total = (dense + (torch.lgamma(x_theta) - torch.lgamma(entries.values + 1.0)).sum()
                     - torch.dot(entries.per_gene, torch.lgamma(theta)))
            where, per_gene = entries.genes, entries.per_gene
        else:  # on every entry, masked (see _sparse_on); lgamma(x + θ) − lgamma(θ) entry by entry,
            where = x > 0  # which keeps its precision where θ is large
            x_theta = x + theta
            total = dense + torch.where(where, torch.lgamma(x_theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0), 0.0).sum()
            per_gene = None
        ctx.save_for_backward(x, log_mean, log_theta, theta, s_per_gene, x_theta, where, per_gene)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, log_mean, log_theta, theta, s_per_gene, x_theta, where, per_gene = ctx.saved_tensors
        d_mean = torch.addcmul(x, x + theta, torch.sigmoid(log_mean - log_theta), value=-1.0)
        d_theta = None
        if ctx.needs_input_grad[2]:
            if ctx.sparse:  # where: the genes of the nonzero entries; Σ ψ(x + θ) − n·ψ(θ) per gene
                psi = torch.zeros_like(theta).index_add_(0, where, torch.digamma(x_theta)) - per_gene * torch.digamma(theta)
            else:  # where: the nonzero mask; ψ(x + θ) − ψ(θ) entry by entry, summed per gene
                psi = torch.where(where, torch.digamma(x_theta) - torch.digamma(theta), 0.0).sum(dim=0)
            d_theta = (theta * (psi - s_per_gene) - d_mean.sum(dim=0)).mul_(grad)
        return None, d_mean.mul_(grad), d_theta


def nb_log_likelihood_sum(x: torch.Tensor, log_mean: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """``Σ log P(x)`` over a count batch under the negative binomial (:func:`nb_log_prob`'s
    distribution; ``log_theta`` one value per gene), computed sparsely with a written-out gradient."""
    return _NBLogLikelihoodSum.apply(x, log_mean, log_theta.reshape(-1).expand(x.shape[1]).contiguous())


def count_reconstruction(x: torch.Tensor, out: Output) -> torch.Tensor:
    """A count network's reconstruction ``log1p(ρ × 10⁴)`` (computed from ``log_mean`` and the
    batch's libraries when the network left it out, as it does while training)."""
    if out.reconstruction is not None:
        return out.reconstruction
    log_library = torch.log(x.sum(dim=1, keepdim=True) + LOG_EPS)
    return torch.log1p((out.log_mean - log_library).exp() * TARGET_SUM)


def _entries(x: torch.Tensor) -> torch.Tensor:
    return x.new_full((), float(x.numel()))  # a fill on x's device: no copy from the host


# ---------------------------------------------------------------- likelihoods
class Likelihood:
    """How a batch is scored: :meth:`terms` gives (error sum, entry count).

    Attributes
    ----------
    name
        The loss name (``Autoencoder(loss=name)``).
    counts
        Whether the network models raw counts (it is given raw counts and normalises them
        itself; its decoder gives proportions of the library).
    parameters
        Which per-gene / per-entry distribution parameters the decoder must provide besides the
        mean: ``"theta"`` (inverse dispersion), ``"dropout"`` (zero-inflation logits).
    """

    name: str = ""
    counts: bool = False
    parameters: tuple[str, ...] = ()

    def terms(self, x: torch.Tensor, out: Output) -> tuple[torch.Tensor, torch.Tensor]:
        """(error sum, entry count) of a batch ``x`` (as given to the network) and its output."""
        raise NotImplementedError

    def objective(
        self, x: torch.Tensor, out: Output, kl_weight: float = 1.0, log_mse_weight: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`terms`, plus ``kl_weight`` × the batch's summed KL divergence for a variational
        network, plus, for a count likelihood, ``log_mse_weight`` × the squared error of the
        log-normalised reconstruction (:func:`count_reconstruction`) summed over the entries."""
        total, count = self.terms(x, out)
        if log_mse_weight > 0 and self.counts:
            total = total + log_mse_weight * mse_terms(out.target, count_reconstruction(x, out))[0]
        if out.kl is not None:
            total = total + kl_weight * out.kl.sum()
        return total, count


class MSE(Likelihood):
    """Squared error of the reconstruction over all entries of what the network encoded."""

    name = "mse"

    def terms(self, x, out):
        return mse_terms(out.target, out.reconstruction)


class NonzeroMSE(Likelihood):
    """Squared error over the nonzero entries only: ``sum(mask·(x − x̂·mask)²) / sum(mask)``."""

    name = "nonzero_mse"

    def terms(self, x, out):
        return nonzero_mse_terms(out.target, out.reconstruction)


class Poisson(Likelihood):
    """Negative log-likelihood of the counts under Poisson(ρ × library)."""

    name, counts = "poisson", True

    def terms(self, x, out):
        return -poisson_log_prob(x, out.log_mean).sum(), _entries(x)


class NegativeBinomial(Likelihood):
    """Negative log-likelihood of the counts under NB(ρ × library, θ), θ learned per gene
    (:func:`nb_log_prob`, summed sparsely: see :func:`nb_log_likelihood_sum`)."""

    name, counts, parameters = "nb", True, ("theta",)

    def terms(self, x, out):
        return -nb_log_likelihood_sum(x, out.log_mean, out.log_theta), _entries(x)


class ZeroInflatedNB(Likelihood):
    """Negative log-likelihood of the counts under the zero-inflated NB, dropout logits per entry
    (:func:`zinb_log_prob`, summed sparsely: a nonzero entry adds ``log(1 − π)`` to its NB term,
    a zero ``log(π + (1 − π)·NB(0))``)."""

    name, counts, parameters = "zinb", True, ("theta", "dropout")

    def terms(self, x, out):
        zero_terms, rest_sum, nonzero = _nb_sums(x, out.log_mean, out.log_theta)
        log_keep = -F.softplus(out.dropout_logit)  # log(1 − π)
        log_drop = log_keep + out.dropout_logit  # log π = log(1 − π) + logit
        zero = torch.logaddexp(log_drop, log_keep + zero_terms)
        total = torch.where(nonzero, log_keep + zero_terms, zero).sum() + rest_sum
        return -total, _entries(x)


LIKELIHOODS: dict[str, Likelihood] = {
    like.name: like for like in (MSE(), NonzeroMSE(), Poisson(), NegativeBinomial(), ZeroInflatedNB())
}
COUNT_LOSSES = tuple(name for name, like in LIKELIHOODS.items() if like.counts)


def get_likelihood(name: str) -> Likelihood:
    """The likelihood of the loss called ``name`` (one of :data:`LIKELIHOODS`)."""
    try:
        return LIKELIHOODS[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; expected one of: {', '.join(LIKELIHOODS)}") from None
