"""The autoencoder: a PyTorch network and a scikit-learn style estimator around it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch import nn

from scae.data import as_matrix, dense_if_small
from scae.files import atomic_path
from scae.losses import LOSSES
from scae.parallel import DEVICES, Distributed, resolve_device
from scae.sources import ArraySource, RowSource
from scae.training import encode, evaluate_losses, predict, train_network

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}
MODEL_FORMAT = "scae.Autoencoder/1"


class AutoencoderNet(nn.Module):
    """Symmetric fully connected autoencoder.

    ``n_genes → hidden[0] → … → latent_dim → … → hidden[0] → n_genes``, with ``activation``
    after every hidden layer and no activation on the input, latent or output layer.
    """

    def __init__(
        self, n_genes: int, latent_dim: int, hidden: tuple[int, ...] = (100,), activation: str = "relu"
    ) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        widths = [n_genes, *hidden]
        enc: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [nn.Linear(a, b), act()]
        enc.append(nn.Linear(widths[-1], latent_dim))
        dec: list[nn.Module] = []
        back = [latent_dim, *reversed(hidden)]
        for a, b in zip(back[:-1], back[1:]):
            dec += [nn.Linear(a, b), act()]
        dec.append(nn.Linear(back[-1], n_genes))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(latent, reconstruction)``."""
        z = self.encoder(x)
        return z, self.decoder(z)


class Autoencoder(TransformerMixin, BaseEstimator):
    """Autoencoder for cells × genes expression matrices.

    Parameters
    ----------
    latent_dim
        Size of the latent (bottleneck) layer.
    hidden
        Widths of the hidden layers between input and latent; the decoder mirrors them.
    activation
        Activation of the hidden layers: one of ``relu``, ``elu``, ``gelu``, ``tanh``,
        ``sigmoid``, ``leaky_relu``.
    loss
        ``"mse"`` or ``"nonzero_mse"`` (MSE over the nonzero input entries of each batch).
    epochs, batch_size, learning_rate
        Adam training schedule.
    random_state
        Seeds weight initialisation and batch order.
    device
        ``"auto"`` (a CUDA GPU, else Apple MPS, else the CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``.
    progress
        Show a progress bar while fitting.

    Attributes
    ----------
    net_ : AutoencoderNet
        The trained network.
    history_ : list of dict
        Per-epoch ``train_loss`` (and ``test_loss``, ``test_mse`` when ``eval_X`` was given).
    n_features_in_ : int
        Number of genes seen in :meth:`fit`.
    fit_seconds_ : float
        Wall-clock time of :meth:`fit` (training steps and per-epoch evaluation).
    train_seconds_ : float
        Time of the training steps alone.
    train_cells_per_second_ : float
        Training throughput: cells × epochs / ``train_seconds_`` (all processes together).
    """

    def __init__(
        self,
        latent_dim: int = 10,
        hidden: tuple[int, ...] = (100,),
        activation: str = "relu",
        loss: str = "mse",
        epochs: int = 50,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        random_state: int = 0,
        device: str = "auto",
        progress: bool = False,
    ) -> None:
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.activation = activation
        self.loss = loss
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.random_state = random_state
        self.device = device
        self.progress = progress

    def _check_params(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss '{self.loss}'; expected one of: {', '.join(LOSSES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation '{self.activation}'; expected one of: {', '.join(ACTIVATIONS)}"
            )
        if int(self.latent_dim) < 1 or any(int(h) < 1 for h in self.hidden):
            raise ValueError("latent_dim and hidden widths must be positive integers")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device '{self.device}'; expected one of: {', '.join(DEVICES)}")

    def _build(self, n_features: int) -> AutoencoderNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            return AutoencoderNet(
                n_features, int(self.latent_dim), tuple(int(h) for h in self.hidden), self.activation
            )

    def fit(
        self,
        X,
        y=None,
        *,
        eval_X=None,
        description: str = "training",
        distributed: Distributed | None = None,
    ) -> Autoencoder:
        """Train on ``X`` (array, sparse matrix, AnnData or :class:`~scae.sources.RowSource`); ``y`` is ignored.

        Parameters
        ----------
        eval_X
            Held-out cells; their loss is recorded after every epoch in ``history_``.
        description
            Label of the progress bar.
        distributed
            This process's place in a ``torch.distributed`` group (see :mod:`scae.parallel`);
            every process of the group calls ``fit`` with the same data and parameters.
        """
        self._check_params()
        train = _as_source(X, "training matrix")
        test = None
        if eval_X is not None:
            test = _as_source(eval_X, "evaluation matrix")
            if test.n_cols != train.n_cols:
                raise ValueError(
                    f"eval_X has {test.n_cols} genes (columns); the training matrix has {train.n_cols}"
                )
        device = resolve_device(self.device, 0 if distributed is None else distributed.local_rank)
        self.n_features_in_ = int(train.n_cols)
        self.net_ = self._build(self.n_features_in_).to(device)
        started = time.perf_counter()
        run = train_network(
            self.net_,
            train,
            test,
            loss=self.loss,
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            learning_rate=float(self.learning_rate),
            seed=int(self.random_state),
            device=device,
            distributed=distributed,
            progress=self.progress,
            description=description,
        )
        self.fit_seconds_ = time.perf_counter() - started
        self.history_ = run.history
        self.train_seconds_ = run.train_seconds
        self.train_cells_per_second_ = run.cells_per_second
        return self

    @property
    def device_(self) -> torch.device:
        """The device the fitted network is on."""
        return next(self.net_.parameters()).device

    def _source(self, X) -> RowSource:
        if not hasattr(self, "net_"):
            raise RuntimeError("this Autoencoder is not fitted yet; call fit() first")
        source = _as_source(X)
        self._check_n_features(source)
        return source

    def _check_n_features(self, source: RowSource) -> None:
        if source.n_cols != self.n_features_in_:
            raise ValueError(f"X has {source.n_cols} genes (columns); the model expects {self.n_features_in_}")

    def transform(self, X) -> np.ndarray:
        """Latent representation, cells × ``latent_dim``."""
        source = self._source(X)
        return encode(self.net_, source, self.device_)

    def reconstruct(self, X) -> np.ndarray:
        """Reconstructed (denoised) expression, cells × genes."""
        source = self._source(X)
        return predict(self.net_, source, self.device_)[1]

    def transform_and_reconstruct(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Latent representation and reconstruction in one pass."""
        source = self._source(X)
        return predict(self.net_, source, self.device_)

    def reconstruction_error(self, X) -> dict[str, float]:
        """MSE over all entries (``mse``) and over the nonzero entries (``nonzero_mse``)."""
        source = self._source(X)
        return evaluate_losses(self.net_, source, device=self.device_)

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Save parameters, weights and history to one file (written atomically).

        ``metadata`` (plain strings and numbers) is stored beside them and comes back as
        ``metadata_`` from :meth:`load`.
        """
        if not hasattr(self, "net_"):
            raise RuntimeError("this Autoencoder is not fitted yet; call fit() first")
        params = self.get_params()
        params["hidden"] = [int(h) for h in params["hidden"]]
        state = {
            "format": MODEL_FORMAT,
            "params": params,
            "n_features_in": self.n_features_in_,
            "state_dict": {k: v.cpu() for k, v in self.net_.state_dict().items()},
            "history": self.history_,
            "fit_seconds": self.fit_seconds_,
            "train_seconds": self.train_seconds_,
            "train_cells_per_second": self.train_cells_per_second_,
            "metadata": dict(metadata or getattr(self, "metadata_", {})),
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: str | Path) -> Autoencoder:
        """Load a model written by :meth:`save` (weights-only loading: no code is executed)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not an scae model file (expected format {MODEL_FORMAT})")
        params = dict(state["params"])
        params["hidden"] = tuple(params["hidden"])
        model = cls(**params)
        model.n_features_in_ = int(state["n_features_in"])
        model.net_ = model._build(model.n_features_in_)
        model.net_.load_state_dict(state["state_dict"])
        model.net_.eval()
        model.history_ = list(state["history"])
        model.fit_seconds_ = float(state["fit_seconds"])
        model.train_seconds_ = float(state.get("train_seconds", float("nan")))
        model.train_cells_per_second_ = float(state.get("train_cells_per_second", float("nan")))
        model.metadata_ = dict(state.get("metadata", {}))
        return model


def _as_source(X, what: str = "matrix") -> RowSource:
    """``X`` as a row source: a :class:`RowSource` as given, anything else validated into memory."""
    if isinstance(X, RowSource):
        return X
    return ArraySource(dense_if_small(as_matrix(X, what)))
