"""Minibatch training and batched evaluation of a PyTorch autoencoder.

The network passed in must map a batch ``x`` to ``(latent, reconstruction)``. Matrices may be
dense NumPy arrays or SciPy CSR matrices; sparse data is densified one batch at a time unless it
fits comfortably in memory as a dense tensor (see :func:`scae.data.dense_if_small`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from scae.data import dense_if_small
from scae.losses import LossTotals, get_loss

EVAL_BATCH_SIZE = 4096


class RowSource:
    """Row batches of a dense or CSR matrix as float32 tensors.

    Parameters
    ----------
    X
        Cells × features, dense ``ndarray`` or ``scipy.sparse`` matrix.
    """

    def __init__(self, X) -> None:
        X = dense_if_small(sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else X)
        if sp.issparse(X):
            self._sparse = X
            self._dense = None
        else:
            X = np.asarray(X, dtype=np.float32)
            if not X.flags.writeable or not X.flags.c_contiguous:
                X = np.array(X, dtype=np.float32, order="C")  # torch wants writeable memory
            self._sparse = None
            self._dense = torch.from_numpy(X)
        self.n_rows = int(X.shape[0])
        self.n_cols = int(X.shape[1])

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rows selected by an index tensor or a slice, as a dense float32 tensor."""
        if self._dense is not None:
            return self._dense[index]
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        return torch.from_numpy(self._sparse[index].toarray())

    def batches(self, batch_size: int = EVAL_BATCH_SIZE) -> Iterator[torch.Tensor]:
        """All rows in order, ``batch_size`` at a time."""
        for start in range(0, self.n_rows, batch_size):
            yield self.rows(slice(start, min(start + batch_size, self.n_rows)))


@torch.inference_mode()
def evaluate_losses(
    net: torch.nn.Module, source: RowSource, losses: tuple[str, ...] = ("mse", "nonzero_mse")
) -> dict[str, float]:
    """Exact losses over a whole matrix (total error sum / total entry count), in batches."""
    net.eval()
    totals = LossTotals(losses)
    for x in source.batches():
        totals.add(x, net(x)[1])
    return totals.result()


@torch.inference_mode()
def predict(net: torch.nn.Module, source: RowSource) -> tuple[np.ndarray, np.ndarray]:
    """Latent codes and reconstructions of every row, as float32 arrays."""
    net.eval()
    latents, recons = [], []
    for x in source.batches():
        z, x_hat = net(x)
        latents.append(z.numpy())
        recons.append(x_hat.numpy())
    return np.concatenate(latents), np.concatenate(recons)


@torch.inference_mode()
def encode(net: torch.nn.Module, source: RowSource) -> np.ndarray:
    """Latent codes of every row (the decoder is not run)."""
    net.eval()
    return np.concatenate([net.encoder(x).numpy() for x in source.batches()])


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
    progress: bool = False,
    description: str = "training",
) -> list[dict]:
    """Train ``net`` with Adam on minibatches of ``train``; return the per-epoch history.

    The history has one record per epoch, starting with epoch 0 (before any update):
    ``train_loss`` (epoch 0: the objective on all training cells; later epochs: the mean of the
    epoch's minibatch losses, as deep-learning frameworks report it), and, when ``test`` is
    given, ``test_loss`` (the objective over all test entries after the epoch) and ``test_mse``
    (plain MSE on the test cells). Shuffling is seeded by ``seed``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    batch_loss = get_loss(loss)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate, fused=True)

    def record(epoch: int, train_loss: float) -> dict:
        row = {"epoch": epoch, "train_loss": train_loss}
        if test is not None:
            scores = evaluate_losses(net, test, tuple(dict.fromkeys((loss, "mse"))))
            row["test_loss"] = scores[loss]
            row["test_mse"] = scores["mse"]
        return row

    history = [record(0, evaluate_losses(net, train, (loss,))[loss])]
    bar = tqdm(range(1, epochs + 1), desc=description, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        net.train()
        order = torch.randperm(train.n_rows, generator=generator)
        total, n_batches = 0.0, 0
        for start in range(0, train.n_rows, batch_size):
            x = train.rows(order[start : start + batch_size])
            _, x_hat = net(x)
            value = batch_loss(x, x_hat)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total += value.item()
            n_batches += 1
        history.append(record(epoch, total / n_batches))
        bar.set_postfix(
            {k: f"{v:.4g}" for k, v in history[-1].items() if k in ("train_loss", "test_loss")}
        )
    bar.close()
    return history
