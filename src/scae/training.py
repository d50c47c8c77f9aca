"""Minibatch training and batched evaluation of a PyTorch autoencoder.

The network passed in must map a batch ``x`` to ``(latent, reconstruction)``. Data comes from a
:class:`~scae.sources.RowSource` (in memory, a backed ``.h5ad`` or a memory-mapped ``.npy``);
the trainer never asks which. It runs on any ``torch.device`` and, given a
:class:`~scae.parallel.Distributed` context, trains with ``DistributedDataParallel``: every
process takes its shard of each global minibatch, and losses are reduced as exact sums so the
result matches one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from scae.errors import ScaeInputError
from scae.losses import LossTotals, get_loss_terms
from scae.parallel import Distributed, accumulator_dtype, all_reduce_sum
from scae.sources import (
    DISK_BLOCK_ROWS,
    EVAL_BATCH_SIZE,
    BatchLoader,
    RowSource,
    epoch_order,
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
    bad = [key for key in ("train_loss", "test_loss", "test_mse") if key in row and not math.isfinite(row[key])]
    if not bad:
        return
    which = {"train_loss": "training loss", "test_loss": "loss on the evaluation cells",
             "test_mse": "MSE on the evaluation cells"}[bad[0]]
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

    @property
    def cells_per_second(self) -> float:
        return self.train_cells / self.train_seconds if self.train_seconds > 0 else float("nan")


def _shard_rows(n: int, distributed: Distributed | None) -> np.ndarray:
    if distributed is None:
        return np.arange(n)
    bounds = shard_bounds(n, distributed.world_size)
    return np.arange(bounds[distributed.rank], bounds[distributed.rank + 1])


@torch.inference_mode()
def evaluate_losses(
    net: torch.nn.Module,
    source: RowSource,
    losses: tuple[str, ...] = ("mse", "nonzero_mse"),
    device: torch.device | str = "cpu",
    distributed: Distributed | None = None,
) -> dict[str, float]:
    """Exact losses over a whole source (total error sum / total entry count), in batches.

    Distributed, each process scores its contiguous share of the rows and the sums are added up.
    """
    net.eval()
    totals = LossTotals(losses)
    for x in source.batches(EVAL_BATCH_SIZE, _shard_rows(source.n_rows, distributed)):
        x = x.to(device, non_blocking=True)
        totals.add(x, net(x)[1])
    if distributed is not None:
        totals.set_sums(all_reduce_sum(totals.sums(), distributed, torch.device(device)))
    return totals.result()


@torch.inference_mode()
def predict(net: torch.nn.Module, source: RowSource, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Latent codes and reconstructions of every row, as float32 arrays."""
    net.eval()
    latents, recons = [], []
    for x in source.batches():
        z, x_hat = net(x.to(device, non_blocking=True))
        latents.append(z.float().cpu().numpy())
        recons.append(x_hat.float().cpu().numpy())
    return np.concatenate(latents), np.concatenate(recons)


@torch.inference_mode()
def encode(net: torch.nn.Module, source: RowSource, device: torch.device | str = "cpu") -> np.ndarray:
    """Latent codes of every row (the decoder is not run)."""
    net.eval()
    return np.concatenate([net.encoder(x.to(device, non_blocking=True)).float().cpu().numpy() for x in source.batches()])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_network(
    net: torch.nn.Module,
    train: RowSource,
    test: RowSource | None = None,
    *,
    loss: str = "mse",
    epochs: int = 50,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
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
    ``test_mse`` (plain MSE on the test cells). Shuffling is seeded by ``seed``; sources on
    disk are shuffled by blocks within prefetched windows (:func:`~scae.sources.epoch_order`).

    With ``distributed``, ``batch_size`` is the global batch: each process trains on its shard
    of it, and each step's loss is ``(this shard's error sum) × world size / (global entry
    count)``, so DDP's gradient average is the gradient of the exact global batch loss.

    Training stops with :class:`TrainingDivergedError` at the end of the first epoch whose
    training loss (the epoch's accumulated total, read once per epoch anyway, so no extra
    synchronisation) or evaluation loss is NaN or infinite, and at the end when the final
    training loss is :data:`DIVERGED_FACTOR` times the untrained network's; in a process group
    the totals are all-reduced, so every process reaches the same decision.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    device = torch.device(device)
    terms = get_loss_terms(loss)
    rng = np.random.default_rng(seed)
    world = 1 if distributed is None else distributed.world_size
    model = net
    if distributed is not None:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, process_group=distributed.group
        )
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate, fused=fused)
    eval_losses = tuple(dict.fromkeys((loss, "mse")))
    exact = accumulator_dtype(device)
    block = DISK_BLOCK_ROWS if train.on_disk else None
    window_blocks = max(1, train.window_rows() // DISK_BLOCK_ROWS)

    def record(epoch: int, train_loss: float) -> dict:
        row = {"epoch": epoch, "train_loss": train_loss}
        if test is not None:
            scores = evaluate_losses(net, test, eval_losses, device, distributed)
            row["test_loss"] = scores[loss]
            row["test_mse"] = scores["mse"]
        return row

    history = [record(0, evaluate_losses(net, train, (loss,), device, distributed)[loss])]
    check_finite_record(history[0], learning_rate)
    show = progress and (distributed is None or distributed.is_main)
    bar = tqdm(total=epochs * train.n_rows, desc=description, unit="cell", unit_scale=True,
               disable=not show, leave=False)
    train_seconds = 0.0
    with contextlib.closing(bar):
        for epoch in range(1, epochs + 1):
            order = epoch_order(train.n_rows, rng, block, window_blocks)
            loader = BatchLoader(
                train, order, batch_size,
                rank=0 if distributed is None else distributed.rank, world_size=world, device=device,
                window_rows=window_blocks * DISK_BLOCK_ROWS if block else None,
            )
            net.train()
            total = torch.zeros((), dtype=exact, device=device)
            _synchronize(device)
            started = time.perf_counter()
            with contextlib.closing(iter(loader)) as batches:  # stops the prefetch thread on any exit
                for x, n_global in batches:
                    _, x_hat = model(x)
                    err, count = terms(x, x_hat)
                    if distributed is not None:
                        sums = torch.stack([err.detach().to(exact), count.to(exact)])
                        torch.distributed.all_reduce(sums, group=distributed.group)
                        global_err, global_count = sums[0], sums[1].clamp(min=1.0)
                        value = err * (world / global_count.to(err.dtype))
                        total += global_err / global_count
                    else:
                        value = err / count.clamp(min=1.0)
                        total += value.detach().to(exact)
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    bar.update(n_global)
            _synchronize(device)
            train_seconds += time.perf_counter() - started
            train_loss = float(total) / len(loader)
            check_finite_record({"epoch": epoch, "train_loss": train_loss}, learning_rate)  # before evaluating
            history.append(record(epoch, train_loss))
            check_finite_record(history[-1], learning_rate)
            bar.set_postfix({"epoch": epoch, **{k: f"{v:.4g}" for k, v in history[-1].items() if k in ("train_loss", "test_loss")}})
    check_not_blown_up(history, learning_rate)
    net.eval()
    return TrainingRun(history=history, train_seconds=train_seconds, train_cells=train.n_rows * epochs)
