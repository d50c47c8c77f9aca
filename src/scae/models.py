"""The autoencoder: a PyTorch network and a scikit-learn style estimator around it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch import nn

from scae.data import as_matrix
from scae.files import atomic_path
from scae.losses import LOSSES
from scae.training import RowSource, encode, evaluate_losses, predict, train_network

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
        Wall-clock training time.
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

    def _build(self, n_features: int) -> AutoencoderNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            return AutoencoderNet(
                n_features, int(self.latent_dim), tuple(int(h) for h in self.hidden), self.activation
            )

    def fit(self, X, y=None, *, eval_X=None, description: str = "training") -> Autoencoder:
        """Train on ``X`` (array, sparse matrix or AnnData); ``y`` is ignored.

        Parameters
        ----------
        eval_X
            Held-out cells; their loss is recorded after every epoch in ``history_``.
        description
            Label of the progress bar.
        """
        self._check_params()
        X = as_matrix(X, "training matrix")
        test = None
        if eval_X is not None:
            eval_X = as_matrix(eval_X, "evaluation matrix")
            if eval_X.shape[1] != X.shape[1]:
                raise ValueError(
                    f"eval_X has {eval_X.shape[1]} genes (columns); the training matrix has {X.shape[1]}"
                )
            test = RowSource(eval_X)
        self.n_features_in_ = int(X.shape[1])
        self.net_ = self._build(self.n_features_in_)
        started = time.perf_counter()
        self.history_ = train_network(
            self.net_,
            RowSource(X),
            test,
            loss=self.loss,
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            learning_rate=float(self.learning_rate),
            seed=int(self.random_state),
            progress=self.progress,
            description=description,
        )
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def _source(self, X) -> RowSource:
        if not hasattr(self, "net_"):
            raise RuntimeError("this Autoencoder is not fitted yet; call fit() first")
        X = as_matrix(X)
        self._check_n_features(X)
        return RowSource(X)

    def _check_n_features(self, X) -> None:
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} genes (columns); the model expects {self.n_features_in_}")

    def transform(self, X) -> np.ndarray:
        """Latent representation, cells × ``latent_dim``."""
        source = self._source(X)
        return encode(self.net_, source)

    def reconstruct(self, X) -> np.ndarray:
        """Reconstructed (denoised) expression, cells × genes."""
        source = self._source(X)
        return predict(self.net_, source)[1]

    def transform_and_reconstruct(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Latent representation and reconstruction in one pass."""
        source = self._source(X)
        return predict(self.net_, source)

    def reconstruction_error(self, X) -> dict[str, float]:
        """MSE over all entries (``mse``) and over the nonzero entries (``nonzero_mse``)."""
        source = self._source(X)
        return evaluate_losses(self.net_, source)

    def save(self, path: str | Path) -> None:
        """Save parameters, weights and history to one file (written atomically)."""
        if not hasattr(self, "net_"):
            raise RuntimeError("this Autoencoder is not fitted yet; call fit() first")
        params = self.get_params()
        params["hidden"] = [int(h) for h in params["hidden"]]
        state = {
            "format": MODEL_FORMAT,
            "params": params,
            "n_features_in": self.n_features_in_,
            "state_dict": self.net_.state_dict(),
            "history": self.history_,
            "fit_seconds": self.fit_seconds_,
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
        return model
