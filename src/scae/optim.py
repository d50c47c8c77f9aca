"""Adam and the learning-rate schedules of the trainer, without ``torch.optim.Optimizer``.

``torch.optim.Adam``'s methods (its constructor, ``step`` and ``zero_grad``) import
``torch._dynamo`` the first time they run: 1.0–1.2 s and 70 MiB in every process that trains,
a sixth of a small study. :class:`Adam` keeps the state ``torch.optim.Adam`` keeps and updates
it with PyTorch's own functional Adam (``torch.optim.adam.adam``: the fused kernel on the CPU
and CUDA), so its steps are bitwise those of ``torch.optim.Adam`` / ``AdamW`` with the same
settings. :class:`PlateauSchedule` and :class:`CosineSchedule` set its learning rate as
``ReduceLROnPlateau`` and ``CosineAnnealingLR`` would (those accept only a
``torch.optim.Optimizer``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.adam import adam

BETAS = (0.9, 0.999)
"""Adam's decay rates of the gradient's first and second moments (PyTorch's defaults)."""
EPS = 1e-8
"""Added to the root of the second moment (PyTorch's default)."""


class Adam:
    """Adam over ``params``; with ``weight_decay > 0`` AdamW's decoupled weight decay
    (Loshchilov & Hutter), as ``torch.optim.AdamW`` defines it.

    Parameters
    ----------
    params
        Tensors to optimise (those that do not require a gradient are left out).
    lr
        Learning rate (:attr:`lr` may be changed between steps, as the schedules do).
    weight_decay
        Decoupled weight decay (0: plain Adam).
    fused
        Use PyTorch's fused kernel (it exists on the CPU and CUDA); ``None``: on those devices.

    As in ``torch.optim``, a parameter's moments and step count start with its first gradient,
    and a step skips parameters that have no gradient.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0,
                 fused: bool | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.fused = fused
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _moments(self, index: int, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """First and second moment and step count of parameter ``index`` (created at its first step)."""
        if index not in self.state:
            step = (torch.zeros((), dtype=torch.float32, device=p.device) if self.fused
                    else torch.tensor(0.0, dtype=torch.float32))
            self.state[index] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format), step)
        return self.state[index]

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for index, p in enumerate(self.params):
            if p.grad is None:
                continue
            exp_avg, exp_avg_sq, step = self._moments(index, p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(exp_avg)
            exp_avg_sqs.append(exp_avg_sq)
            steps.append(step)
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=self.fused or None,
             decoupled_weight_decay=self.weight_decay > 0, amsgrad=False, beta1=BETAS[0], beta2=BETAS[1],
             lr=self.lr, weight_decay=self.weight_decay, eps=EPS, maximize=False)

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (``set_to_none``, as ``torch.optim`` does by default)."""
        for p in self.params:
            p.grad = None


class PlateauSchedule:
    """Multiply the learning rate by ``factor`` after more than ``patience`` epochs without a
    monitored loss below ``(1 − threshold) ×`` the best so far (``ReduceLROnPlateau`` in its
    default ``min``/``rel`` mode, no cooldown, no floor)."""

    THRESHOLD = 1e-4
    EPS = 1e-8

    def __init__(self, optimizer: Adam, factor: float, patience: int) -> None:
        self.optimizer, self.factor, self.patience = optimizer, factor, patience
        self.best, self.bad_epochs = math.inf, 0

    def step(self, loss: float) -> None:
        """Record an epoch's monitored loss; lower the rate after too many epochs without progress."""
        current = float(loss)
        if current < self.best * (1.0 - self.THRESHOLD):
            self.best, self.bad_epochs = current, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            lowered = self.optimizer.lr * self.factor
            if self.optimizer.lr - lowered > self.EPS:
                self.optimizer.lr = lowered
            self.bad_epochs = 0


class CosineSchedule:
    """Lower the learning rate along a half cosine from its start to ``floor`` over ``epochs``
    epochs (``CosineAnnealingLR`` with ``T_max=epochs``, in its closed form)."""

    def __init__(self, optimizer: Adam, epochs: int, floor: float) -> None:
        self.optimizer, self.epochs, self.floor = optimizer, epochs, floor
        self.start, self.epoch = optimizer.lr, 0

    def step(self, loss: float | None = None) -> None:
        """Move to the next epoch's rate (the epoch's loss, which the trainer passes to every
        schedule, does not matter here)."""
        self.epoch += 1
        cosine = (1.0 + math.cos(math.pi * self.epoch / self.epochs)) / 2.0
        self.optimizer.lr = self.floor + (self.start - self.floor) * cosine
