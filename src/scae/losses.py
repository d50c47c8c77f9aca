"""Reconstruction losses.

Each loss is given as a pair of *sums* (error sum, entry count) so that a whole data set can be
scored exactly in batches: the loss of a batch is ``sum / count`` and the loss of many batches is
``total sum / total count``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("mse", "nonzero_mse")


def mse_terms(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-error sum and entry count over all entries (PyTorch's fused ``mse_loss`` kernel:
    one pass forward and one backward)."""
    # the count as a fill on x's device (torch.tensor(n, device=...) would copy it from the host
    # and wait for the GPU at every step)
    return F.mse_loss(x_hat, x, reduction="sum"), x.new_full((), float(x.numel()))


def nonzero_mse_terms(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-error sum and entry count over the nonzero entries of the input ``x``.

    With ``mask = (x != 0)`` the error sum is ``sum(mask * (x - x_hat * mask) ** 2)`` and the
    count is ``sum(mask)``. Since ``x = 0`` wherever ``mask = 0``, the error sum is the plain
    squared error between ``x`` and ``x_hat * mask``, which PyTorch's fused ``mse_loss`` computes.
    """
    mask = (x != 0).to(x.dtype)
    return F.mse_loss(x_hat * mask, x, reduction="sum"), mask.sum()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries."""
    total, count = mse_terms(x, x_hat)
    return total / count


def nonzero_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the nonzero entries of ``x``: ``sum(mask·(x − x̂)²) / sum(mask)``.

    A batch without any nonzero entry has loss 0 (no signal to fit) rather than NaN.
    """
    total, count = nonzero_mse_terms(x, x_hat)
    return total / count.clamp(min=1.0)


LossTerms = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

_LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse,
    "nonzero_mse": nonzero_mse,
}
_LOSS_TERMS: dict[str, LossTerms] = {"mse": mse_terms, "nonzero_mse": nonzero_mse_terms}


class LossTotals:
    """Exact losses over many batches: accumulates each loss's error sum and entry count.

    Parameters
    ----------
    names
        Losses to accumulate (from :data:`LOSSES`), each given ``(x, x_hat)``.
    terms
        Instead of ``names``: ``{name: function}`` of any (sum, count) functions; :meth:`add`
        passes its arguments to each (e.g. a batch and a network's output, see
        :mod:`scae.likelihoods`).
    """

    def __init__(self, names: tuple[str, ...] = LOSSES, terms: dict[str, Callable] | None = None) -> None:
        self._terms = dict(terms) if terms is not None else {name: get_loss_terms(name) for name in names}
        self._sums = {name: [0.0, 0.0] for name in self._terms}

    def add(self, *batch) -> None:
        """Add one batch (the arguments each terms function takes, e.g. inputs and reconstructions)."""
        for name, terms in self._terms.items():
            err, count = terms(*batch)
            self._sums[name][0] += float(err)
            self._sums[name][1] += float(count)

    def sums(self) -> list[float]:
        """The accumulated (error sum, count) pairs, flattened in the order of ``names``."""
        return [value for pair in self._sums.values() for value in pair]

    def set_sums(self, values: list[float]) -> None:
        """Replace the accumulated sums (e.g. by their totals over all processes)."""
        for i, name in enumerate(self._sums):
            self._sums[name] = [float(values[2 * i]), float(values[2 * i + 1])]

    def result(self) -> dict[str, float]:
        """Each loss as total error / total count (0 where nothing was counted)."""
        return {name: (err / count if count else 0.0) for name, (err, count) in self._sums.items()}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The batch loss function called ``name`` (one of :data:`LOSSES`)."""
    _check_name(name)
    return _LOSS_FUNCTIONS[name]


def get_loss_terms(name: str) -> LossTerms:
    """The (sum, count) function of the loss called ``name``."""
    _check_name(name)
    return _LOSS_TERMS[name]


def _check_name(name: str) -> None:
    if name not in _LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss '{name}'; expected one of: {', '.join(LOSSES)}")
