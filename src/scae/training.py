"""Minibatch training and batched evaluation of a PyTorch autoencoder.

The network passed in maps a batch ``x`` to a :class:`~scae.likelihoods.Output` (latent,
reconstruction, likelihood parameters) and has ``encode(x)``; a
:class:`~scae.likelihoods.Likelihood` scores it. Data comes from a
:class:`~scae.sources.RowSource` (in memory, a backed ``.h5ad`` or a memory-mapped ``.npy``);
the trainer never asks which. It runs on any ``torch.device`` and, given a
:class:`~scae.parallel.Distributed` context, trains with ``DistributedDataParallel``: every
process takes its shard of each global minibatch, and losses are reduced as exact sums so the
result matches one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from scae.errors import ScaeInputError
from scae.interrupts import raise_if_interrupted
from scae.likelihoods import get_likelihood
from scae.losses import LossTotals
from scae.optim import Adam, CosineSchedule, PlateauSchedule
from scae.parallel import Distributed, accumulator_dtype, all_reduce_sum
from scae.progress import progress_bar
from scae.sources import (
    DISK_BLOCK_ROWS,
    BatchLoader,
    RowSource,
    epoch_order,
    on_device,
    shard_bounds,
)


class TrainingDivergedError(ScaeInputError):
    """Training diverged: the loss became NaN or infinite (training stops at the end of that epoch),
    or it ended far above the untrained network's. Causes: a learning rate too large, or input
    values too large for the network."""


def check_finite_record(row: dict, learning_rate: float) -> None:
    """Raise :class:`TrainingDivergedError` when a loss in an epoch's history record is not finite.

    In a process group every process holds the same all-reduced values, so all of them stop.
    """
    which = {"train_loss": "training loss", "test_loss": "loss on the evaluation cells",
             "test_mse": "MSE on the evaluation cells", "val_loss": "loss on the validation cells"}
    bad = [key for key in which if key in row and not math.isfinite(row[key])]
    if not bad:
        return
    which = which[bad[0]]
    value = row[bad[0]]
    if row["epoch"] == 0:
        raise TrainingDivergedError(
            f"the {which} of the untrained network is already {value} (epoch 0): the input values are too "
            "large for float32 arithmetic; normalise the input (e.g. log1p of library-size-normalised counts)"
        )
    raise TrainingDivergedError(
        f"training diverged in epoch {row['epoch']}: the {which} became {value}; try a lower learning rate "
        f"(now {learning_rate:g}) or normalise the input (e.g. log1p of library-size-normalised counts)"
    )


DIVERGED_FACTOR = 100.0
"""Training that ends with a loss this many times the untrained network's has diverged."""


def check_not_blown_up(history: list[dict], learning_rate: float) -> None:
    """Raise :class:`TrainingDivergedError` when training ended far above where it started.

    An untrained network outputs values near zero, so its loss is about the data's mean square;
    ending :data:`DIVERGED_FACTOR` times above it means the steps overshot (a transient spike in
    an early epoch that training recovers from is not refused).
    """
    start, end = history[0]["train_loss"], history[-1]["train_loss"]
    if start > 0 and end > DIVERGED_FACTOR * start:
        raise TrainingDivergedError(
            f"training diverged: after {history[-1]['epoch']} epoch(s) the training loss is {end:.4g}, "
            f"{end / start:.3g} times the untrained network's {start:.4g}; try a lower learning rate "
            f"(now {learning_rate:g}) or normalise the input (e.g. log1p of library-size-normalised counts)"
        )


@dataclass
class TrainingRun:
    """What :func:`train_network` measured."""

    history: list[dict]
    """One record per epoch (see :func:`train_network`)."""
    train_seconds: float
    """Wall-clock time of the optimisation steps only (evaluation excluded)."""
    train_cells: int
    """Cells trained on, summed over epochs and processes."""
    best_epoch: int | None = None
    """With early stopping: the epoch whose weights were kept (lowest validation loss)."""

    @property
    def cells_per_second(self) -> float:
        return self.train_cells / self.train_seconds if self.train_seconds > 0 else float("nan")


def _shard_rows(n: int, distributed: Distributed | None) -> np.ndarray:
    if distributed is None:
        return np.arange(n)
    bounds = shard_bounds(n, distributed.world_size)
    return np.arange(bounds[distributed.rank], bounds[distributed.rank + 1])


def loss_scorers(loss: str, extra: tuple[str, ...] = (), log_mse_weight: float = 0.0) -> dict:
    """``{"objective": …, **{name: …}}``: (sum, count) functions of a batch and a network's output.

    ``objective`` is the training loss ``loss`` including a variational network's KL term at full
    weight (and ``log_mse_weight``'s term, see :meth:`~scae.likelihoods.Likelihood.objective`);
    the ``extra`` names (e.g. ``"mse"``) are plain likelihood terms, without KL.
    """
    likelihood = get_likelihood(loss)

    def objective(x, out):
        return likelihood.objective(x, out, 1.0, log_mse_weight)

    scorers = {"objective": objective}
    scorers.update({name: get_likelihood(name).terms for name in extra})
    return scorers


@torch.inference_mode()
def evaluate_losses(
    net: torch.nn.Module,
    source: RowSource,
    losses: tuple[str, ...] | dict = ("mse", "nonzero_mse"),
    device: torch.device | str = "cpu",
    distributed: Distributed | None = None,
) -> dict[str, float]:
    """Exact losses over a whole source (total error sum / total entry count), in batches.

    ``losses`` names likelihoods (:data:`scae.likelihoods.LIKELIHOODS`; ``mse`` and
    ``nonzero_mse`` compare the reconstruction with what the network encoded) or maps names to
    (sum, count) functions of a batch and its output (:func:`loss_scorers`). Distributed, each
    process scores its contiguous share of the rows and the sums are added up.
    """
    net.eval()
    scorers = losses if isinstance(losses, dict) else {name: get_likelihood(name).terms for name in losses}
    totals = LossTotals(terms=scorers)
    for x in source.batches(rows=_shard_rows(source.n_rows, distributed)):
        x = x.to(device, non_blocking=True)
        totals.add(x, net(x))
    if distributed is not None:
        totals.set_sums(all_reduce_sum(totals.sums(), distributed, torch.device(device)))
    return totals.result()


@torch.inference_mode()
def predict(net: torch.nn.Module, source: RowSource, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Latent codes and reconstructions of every row, as float32 arrays."""
    net.eval()
    latents, recons = [], []
    for x in source.batches():
        out = net(x.to(device, non_blocking=True))
        latents.append(out.latent.float().cpu().numpy())
        recons.append(out.reconstruction.float().cpu().numpy())
    return np.concatenate(latents), np.concatenate(recons)


@torch.inference_mode()
def encode(net: torch.nn.Module, source: RowSource, device: torch.device | str = "cpu") -> np.ndarray:
    """Latent codes of every row (a variational network's posterior means; the decoder is not run)."""
    net.eval()
    return np.concatenate([net.encode(x.to(device, non_blocking=True)).float().cpu().numpy() for x in source.batches()])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LR_SCHEDULES = ("none", "plateau", "cosine")
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 4
"""``lr_schedule="plateau"``: the learning rate halves after this many epochs without improvement
of the monitored loss (the validation loss with early stopping, else the training loss)."""
COSINE_FLOOR = 0.01
"""``lr_schedule="cosine"``: the learning rate falls along a half cosine to this fraction of its start."""
MIN_IMPROVEMENT = 1e-4
"""Early stopping: a validation loss counts as better when it is this much (relative) below the best."""


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    """Weight of the KL term in training epoch ``epoch`` (1-based): rises linearly from 0 in
    the first epoch to 1 after ``warmup_epochs`` epochs (1 throughout without warm-up)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch - 1) / warmup_epochs)


def _optimizer(net: torch.nn.Module, learning_rate: float, weight_decay: float, device: torch.device) -> Adam:
    """Adam (``weight_decay > 0``: AdamW's decoupled decay), fused on the CPU and CUDA."""
    return Adam(net.parameters(), learning_rate, weight_decay, fused=device.type in ("cpu", "cuda"))


def _scheduler(optimizer: Adam, lr_schedule: str, epochs: int) -> PlateauSchedule | CosineSchedule | None:
    if lr_schedule == "plateau":
        return PlateauSchedule(optimizer, PLATEAU_FACTOR, PLATEAU_PATIENCE)
    if lr_schedule == "cosine":
        return CosineSchedule(optimizer, epochs, optimizer.lr * COSINE_FLOOR)
    if lr_schedule != "none":
        raise ValueError(f"unknown lr_schedule '{lr_schedule}'; expected one of: {', '.join(LR_SCHEDULES)}")
    return None


def _has_batch_norm(net: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


class _EarlyStopping:
    """Keeps the weights of the epoch with the lowest validation loss; says when to stop."""

    def __init__(self, net: torch.nn.Module, patience: int) -> None:
        self.net, self.patience = net, patience
        self.best, self.best_epoch, self.waited = math.inf, 0, 0
        self.best_state = copy.deepcopy(net.state_dict())

    def update(self, epoch: int, loss: float) -> bool:
        """Record an epoch's validation loss; ``True`` when training should stop."""
        if loss < self.best - MIN_IMPROVEMENT * abs(self.best if math.isfinite(self.best) else loss):
            self.best, self.best_epoch, self.waited = loss, epoch, 0
            self.best_state = copy.deepcopy(self.net.state_dict())
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self) -> None:
        self.net.load_state_dict(self.best_state)


def train_network(
    net: torch.nn.Module,
    train: RowSource,
    test: RowSource | None = None,
    *,
    loss: str = "mse",
    epochs: int = 50,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    lr_schedule: str = "none",
    kl_warmup_epochs: int = 0,
    log_mse_weight: float = 0.0,
    validation: RowSource | None = None,
    patience: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    distributed: Distributed | None = None,
    progress: bool = False,
    description: str = "training",
) -> TrainingRun:
    """Train ``net`` (already on ``device``) with Adam on minibatches of ``train``.

    The history has one record per epoch, starting with epoch 0 (before any update):
    ``train_loss`` (epoch 0: the objective on all training cells; later epochs: the mean of the
    epoch's global minibatch losses, as deep-learning frameworks report it), and, when ``test``
    is given, ``test_loss`` (the objective over all test entries after the epoch) and
    ``test_mse`` (plain MSE of the reconstruction on the test cells), and with ``validation``
    ``val_loss``. The objective of a variational network includes its KL term; evaluation
    always weighs it fully, training by :func:`kl_weight` (a warm-up over
    ``kl_warmup_epochs``). Shuffling is seeded by ``seed``, and so are dropout and the latent
    samples of a variational network; sources on disk are shuffled by blocks within
    prefetched windows (:func:`~scae.sources.epoch_order`). A count model's objective may add
    ``log_mse_weight`` × the squared error of its log-normalised reconstruction.

    ``weight_decay > 0`` trains with AdamW; ``lr_schedule`` is ``"none"``, ``"plateau"``
    (halve the rate when the monitored loss stalls) or ``"cosine"``. With ``validation`` and
    ``patience``, training stops after ``patience`` epochs without a better validation loss and
    the best epoch's weights are restored (``TrainingRun.best_epoch``).

    With ``distributed``, ``batch_size`` is the global batch: each process trains on its shard
    of it, and each step's loss is ``(this shard's error sum) × world size / (global entry
    count)``, so DDP's gradient average is the gradient of the exact global batch loss. (A
    network with batch normalisation normalises by each process's shard on the CPU; minibatches
    too small for batch statistics — fewer than 2 rows per process — are skipped.)

    Training stops with :class:`TrainingDivergedError` at the end of the first epoch whose
    training loss (the epoch's accumulated total, read once per epoch anyway, so no extra
    synchronisation) or evaluation loss is NaN or infinite, and at the end when the final
    training loss is :data:`DIVERGED_FACTOR` times the untrained network's; in a process group
    the totals are all-reduced, so every process reaches the same decision.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    device = torch.device(device)
    likelihood = get_likelihood(loss)
    rng = np.random.default_rng(seed)
    world = 1 if distributed is None else distributed.world_size
    model = net
    if distributed is not None:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, process_group=distributed.group
        )
    optimizer = _optimizer(net, learning_rate, weight_decay, device)
    scheduler = _scheduler(optimizer, lr_schedule, epochs)
    min_rows = 2 * world if _has_batch_norm(net) else 1
    objective = loss_scorers(loss, ("mse",), log_mse_weight)
    exact = accumulator_dtype(device)
    # the shuffle follows where the rows are stored (by blocks on disk), also when a GPU holds a copy
    stored = train.storage()
    block = DISK_BLOCK_ROWS if stored.on_disk else None
    window_blocks = max(1, stored.window_rows // DISK_BLOCK_ROWS)
    train, test, validation = on_device([train, test, validation], device)
    stopper = _EarlyStopping(net, patience) if validation is not None and patience is not None else None

    def record(epoch: int, train_loss: float) -> dict:
        row = {"epoch": epoch, "train_loss": train_loss}
        if test is not None:
            scores = evaluate_losses(net, test, objective, device, distributed)
            row["test_loss"] = scores["objective"]
            row["test_mse"] = scores["mse"]
        if validation is not None:
            row["val_loss"] = evaluate_losses(net, validation, {"objective": objective["objective"]}, device, distributed)["objective"]
        return row

    history = [record(0, evaluate_losses(net, train, {"objective": objective["objective"]}, device, distributed)["objective"])]
    check_finite_record(history[0], learning_rate)
    show = progress and (distributed is None or distributed.is_main)
    bar = progress_bar(show, total=epochs * train.n_rows, desc=description, unit="cell", unit_scale=True, leave=False)
    train_seconds, trained_cells = 0.0, 0
    # dropout and latent samples draw from torch's generator: seeded here, the caller's state restored after
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with contextlib.closing(bar), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            order = epoch_order(train.n_rows, rng, block, window_blocks)
            loader = BatchLoader(
                train, order, batch_size,
                rank=0 if distributed is None else distributed.rank, world_size=world, device=device,
                window_rows=window_blocks * DISK_BLOCK_ROWS if block else None,
            )
            weight = kl_weight(epoch, kl_warmup_epochs)
            net.train()
            total = torch.zeros((), dtype=exact, device=device)
            steps = 0
            _synchronize(device)
            started = time.perf_counter()
            with contextlib.closing(iter(loader)) as batches:  # stops the prefetch thread on any exit
                for x, n_global in batches:
                    bar.update(n_global)
                    if n_global < min_rows:  # batch statistics need 2 rows per process
                        continue
                    err, count = likelihood.objective(x, model(x), weight, log_mse_weight)
                    if distributed is not None:
                        sums = torch.stack([err.detach().to(exact), count.to(exact)])
                        torch.distributed.all_reduce(sums, group=distributed.group)
                        global_err, global_count = sums[0], sums[1].clamp(min=1.0)
                        value = err * (world / global_count.to(err.dtype))
                        total += global_err / global_count
                    else:
                        value = err / count.clamp(min=1.0)
                        total += value.detach().to(exact)
                    optimizer.zero_grad()
                    value.backward()
                    optimizer.step()
                    steps += 1
            _synchronize(device)
            raise_if_interrupted()
            train_seconds += time.perf_counter() - started
            trained_cells += train.n_rows
            train_loss = float(total) / max(steps, 1)
            check_finite_record({"epoch": epoch, "train_loss": train_loss}, learning_rate)  # before evaluating
            history.append(record(epoch, train_loss))
            check_finite_record(history[-1], learning_rate)
            bar.set_postfix({"epoch": epoch, **{k: f"{v:.4g}" for k, v in history[-1].items() if k in ("train_loss", "test_loss")}})
            monitored = history[-1].get("val_loss", train_loss)
            if scheduler is not None:
                scheduler.step(monitored)
            if stopper is not None and stopper.update(epoch, monitored):
                break
    check_not_blown_up(history, learning_rate)
    if stopper is not None:
        stopper.restore()
    net.eval()
    return TrainingRun(history=history, train_seconds=train_seconds, train_cells=trained_cells,
                       best_epoch=None if stopper is None else stopper.best_epoch)
