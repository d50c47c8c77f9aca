"""scae's Adam and learning-rate schedules against torch.optim's, and what training imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from scae.likelihoods import get_likelihood
from scae.models import AutoencoderNet
from scae.optim import Adam, CosineSchedule, PlateauSchedule


def _net(seed: int = 0) -> AutoencoderNet:
    torch.manual_seed(seed)
    return AutoencoderNet(6, 2, (5,), loss="nb")  # NB: a per-gene parameter beside the layers


def _train(net: AutoencoderNet, optimizer, steps: int, lr_at=None) -> None:
    x = torch.from_numpy(np.random.default_rng(1).poisson(3.0, (steps, 8, 6)).astype(np.float32))
    for step in range(steps):
        if lr_at is not None:
            lr_at(optimizer, step)
        err, count = get_likelihood("nb").objective(x[step], net(x[step]), 1.0, 0.0)
        optimizer.zero_grad()
        (err / count).backward()
        if step % 3 == 2:  # now and then a step in which one parameter has no gradient
            net.log_theta.grad = None
        optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("fused", [True, False])
def test_adam_steps_are_bitwise_those_of_torch_optim(weight_decay, fused):
    ours, theirs = _net(), _net()
    torch_class = torch.optim.AdamW if weight_decay else torch.optim.Adam

    def set_lr(optimizer, step):  # a rate that changes between steps, as a schedule makes it
        rate = 1e-2 / (1 + step)
        if isinstance(optimizer, Adam):
            optimizer.lr = rate
        else:
            optimizer.param_groups[0]["lr"] = rate

    _train(ours, Adam(ours.parameters(), 1e-2, weight_decay, fused=fused), 9, set_lr)
    _train(theirs, torch_class(theirs.parameters(), lr=1e-2, weight_decay=weight_decay, fused=fused or None), 9, set_lr)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.log_theta, _net().log_theta)  # it did train


def test_adam_skips_parameters_without_gradients_and_zero_grad_drops_them():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    frozen = torch.ones(2)  # no gradient wanted: not optimised at all
    optimizer = Adam([a, b, frozen], lr=0.1)
    assert optimizer.params == [a, b]
    (a.sum() * 2).backward()
    optimizer.step()
    # Adam's first step moves every coordinate by the rate, against the gradient's sign
    np.testing.assert_allclose(a.detach().numpy(), 0.9, rtol=1e-6)
    assert torch.equal(b, torch.ones(2)) and set(optimizer.state) == {0}
    optimizer.zero_grad()
    assert a.grad is None


def test_plateau_schedule_matches_reduce_lr_on_plateau():
    losses = [5.0, 4.0, 4.0, 3.999, 4.1, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0]
    param = torch.zeros(1, requires_grad=True)
    reference = torch.optim.SGD([param], lr=1.0)
    torch_schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, factor=0.5, patience=2)
    ours = Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = PlateauSchedule(ours, factor=0.5, patience=2)
    rates = []
    for loss in losses:
        torch_schedule.step(loss)
        schedule.step(loss)
        assert ours.lr == reference.param_groups[0]["lr"]
        rates.append(ours.lr)
    assert rates[-1] == 0.125  # lowered three times: the comparison is not trivially true


def test_cosine_schedule_matches_cosine_annealing():
    param = torch.zeros(1, requires_grad=True)
    reference = torch.optim.SGD([param], lr=0.3)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=7, eta_min=0.003)
    ours = Adam([torch.zeros(1, requires_grad=True)], lr=0.3)
    schedule = CosineSchedule(ours, epochs=7, floor=0.003)
    for _ in range(7):
        reference.step()
        torch_schedule.step()
        schedule.step()
        assert ours.lr == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12)
    assert ours.lr == pytest.approx(0.003)


def test_training_does_not_import_torch_dynamo():
    """torch.optim's Optimizer imports torch._dynamo (1 s, 70 MiB) on first use; scae's does not."""
    code = (
        "import sys, numpy as np\n"
        "from scae import Autoencoder\n"
        "X = np.random.default_rng(0).poisson(2.0, (60, 8)).astype(np.float32)\n"
        "Autoencoder(latent_dim=2, hidden=(4,), epochs=3, early_stopping=True, lr_schedule='plateau',\n"
        "            weight_decay=1e-3).fit(X)\n"
        "Autoencoder(latent_dim=2, hidden=(4,), epochs=2, loss='nb', lr_schedule='cosine').fit(X)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
