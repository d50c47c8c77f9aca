"""The autoencoder: a PyTorch network and a scikit-learn style estimator around it."""

from __future__ import annotations

import re
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from scae import params as rules
from scae.data import as_matrix, dense_if_small
from scae.errors import ScaeInputError
from scae.files import atomic_path
from scae.parallel import Distributed, resolve_device
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
MODEL_FORMAT_NAME = "scae.Autoencoder"
MODEL_FORMAT_VERSION = 1
MODEL_FORMAT = f"{MODEL_FORMAT_NAME}/{MODEL_FORMAT_VERSION}"
MODEL_KEYS = frozenset({
    "format", "params", "n_features_in", "state_dict", "history", "fit_seconds", "train_seconds",
    "train_cells_per_second", "metadata",
})
"""Entries of a model file (format version 1); the first six are required."""
REQUIRED_MODEL_KEYS = ("format", "params", "n_features_in", "state_dict", "history", "fit_seconds")
ARCHITECTURE_PARAMS = ("latent_dim", "hidden", "activation", "loss")
"""Parameters a model file must store (the others fall back to their defaults)."""


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
        for a, b in pairwise(widths):
            enc += [nn.Linear(a, b), act()]
        enc.append(nn.Linear(widths[-1], latent_dim))
        dec: list[nn.Module] = []
        back = [latent_dim, *reversed(hidden)]
        for a, b in pairwise(back):
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

    As in scikit-learn, ``__init__`` only stores the parameters; :meth:`fit` checks them all
    first and raises :class:`~scae.errors.ScaeInputError` (a ``ValueError``) naming the first
    bad one, its value and what was expected. Methods that need a fitted model raise
    scikit-learn's ``NotFittedError`` before :meth:`fit`.

    Parameters
    ----------
    latent_dim
        Size of the latent (bottleneck) layer: an integer in [1, 100000].
    hidden
        Widths of the hidden layers between input and latent (each in [1, 100000]); the
        decoder mirrors them. The whole network may have at most 10⁹ parameters.
    activation
        Activation of the hidden layers: one of ``relu``, ``elu``, ``gelu``, ``tanh``,
        ``sigmoid``, ``leaky_relu``.
    loss
        ``"mse"`` or ``"nonzero_mse"`` (MSE over the nonzero input entries of each batch).
    epochs, batch_size, learning_rate
        Adam training schedule: epochs in [1, 10⁶], batch size in [1, 10⁷], learning rate a
        finite number in (0, 10] (larger steps only diverge). Training stops with
        :class:`~scae.training.TrainingDivergedError` when the loss becomes NaN or infinite.
    random_state
        Seeds weight initialisation and batch order: an integer in [0, 2³² − 1].
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

    def _check_params(self) -> dict:
        """Every parameter checked, as the values training uses (the attributes stay as given)."""
        checked = {
            "latent_dim": rules.check("latent_dim", self.latent_dim, rules.WIDTH),
            "hidden": rules.check("hidden", self.hidden, rules.HIDDEN),
            "activation": rules.check("activation", self.activation, rules.ACTIVATION),
            "loss": rules.check("loss", self.loss, rules.LOSS),
            "epochs": rules.check("epochs", self.epochs, rules.EPOCHS),
            "batch_size": rules.check("batch_size", self.batch_size, rules.BATCH_SIZE),
            "learning_rate": rules.check("learning_rate", self.learning_rate, rules.LEARNING_RATE),
            "random_state": rules.check("random_state", self.random_state, rules.SEED),
            "device": rules.check("device", self.device, rules.DEVICE),
            "progress": rules.check("progress", self.progress, rules.BOOLEAN),
        }
        return checked

    def _build(self, n_features: int) -> AutoencoderNet:
        latent_dim, hidden = int(self.latent_dim), tuple(int(h) for h in self.hidden)
        rules.check_parameter_count(n_features, latent_dim, hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.random_state))
            return AutoencoderNet(n_features, latent_dim, hidden, self.activation)

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
        checked = self._check_params()
        train = _as_source(X, "training matrix")
        test = None
        if eval_X is not None:
            test = _as_source(eval_X, "evaluation matrix")
            if test.n_cols != train.n_cols:
                raise ScaeInputError(
                    f"eval_X has {test.n_cols} genes (columns); the training matrix has {train.n_cols}"
                )
        device = resolve_device(checked["device"], 0 if distributed is None else distributed.local_rank)
        net = self._build(int(train.n_cols)).to(device)
        started = time.perf_counter()
        run = train_network(
            net,
            train,
            test,
            loss=checked["loss"],
            epochs=checked["epochs"],
            batch_size=checked["batch_size"],
            learning_rate=checked["learning_rate"],
            seed=checked["random_state"],
            device=device,
            distributed=distributed,
            progress=checked["progress"],
            description=description,
        )
        self.n_features_in_ = int(train.n_cols)
        self.net_ = net
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
        check_is_fitted(self, "net_")
        source = _as_source(X)
        self._check_n_features(source)
        return source

    def _check_n_features(self, source: RowSource) -> None:
        if source.n_cols != self.n_features_in_:
            raise ScaeInputError(f"X has {source.n_cols} genes (columns); the model expects {self.n_features_in_}")

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
        check_is_fitted(self, "net_")
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
        """Load a model written by :meth:`save` (weights-only loading: no code is executed).

        Any file that is not such a model — missing, empty, truncated, not a PyTorch file,
        another kind of PyTorch file, unknown entries or parameters, weights that do not fit the
        stored architecture, a newer format version — raises
        :class:`~scae.errors.ScaeInputError` naming the file and the problem.
        """
        state = _read_model_file(Path(path))
        params = _model_params(path, state["params"])
        try:
            model = cls(**params)
            checked = model._check_params()
        except ScaeInputError as err:
            raise ScaeInputError(f"{path}: stored parameter {err}") from None
        model.hidden = checked["hidden"]
        n_features = state["n_features_in"]
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ScaeInputError(f"{path}: n_features_in must be a positive integer; got {n_features!r}")
        try:
            net = model._build(n_features)
        except ScaeInputError as err:
            raise ScaeInputError(f"{path}: {err}") from None
        _load_weights(path, net, state["state_dict"], params, n_features)
        net.eval()
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
            raise ScaeInputError(f"{path}: history must be a list of per-epoch records; got {type(history).__name__}")
        metadata = state.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ScaeInputError(f"{path}: metadata must be a dict; got {type(metadata).__name__}")
        timings = {key: state.get(key, float("nan")) for key in ("fit_seconds", "train_seconds", "train_cells_per_second")}
        for key, value in timings.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ScaeInputError(f"{path}: {key} must be a number; got {value!r}")
        model.n_features_in_ = n_features
        model.net_ = net
        model.history_ = list(history)
        model.fit_seconds_ = float(timings["fit_seconds"])
        model.train_seconds_ = float(timings["train_seconds"])
        model.train_cells_per_second_ = float(timings["train_cells_per_second"])
        model.metadata_ = dict(metadata)
        return model


def _read_model_file(path: Path) -> dict:
    """The dict a model file holds, read weights-only, with its format and entries checked."""
    expected = f"expected a model file written by scae's Autoencoder.save (format {MODEL_FORMAT})"
    if path.is_dir():
        raise ScaeInputError(f"{path}: is a directory; {expected}")
    try:
        with path.open("rb") as handle:
            empty = not handle.read(1)
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be read ({err.strerror or err}); {expected}") from None
    if empty:
        raise ScaeInputError(f"{path}: is empty; {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the file holds, the answer is one line
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        if blocked:
            raise ScaeInputError(
                f"{path}: holds a Python object ({blocked.group(1)}) besides tensors and plain data; "
                f"refused, since loading it could run code; {expected}"
            ) from None
        raise ScaeInputError(
            f"{path}: not a readable PyTorch file (truncated, corrupted or another kind of file); {expected}"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), str):
        raise ScaeInputError(f"{path}: a PyTorch file but not an scae model ({type(state).__name__} without "
                             f"a format entry); {expected}")
    name, _, version = state["format"].partition("/")
    if name != MODEL_FORMAT_NAME or not version.isdigit():
        raise ScaeInputError(f"{path}: not an scae model file (format {state['format']!r}); {expected}")
    if int(version) > MODEL_FORMAT_VERSION:
        raise ScaeInputError(
            f"{path}: written in model format version {int(version)} by a newer scae; this scae reads "
            f"version {MODEL_FORMAT_VERSION}: upgrade scae to load it"
        )
    if int(version) < MODEL_FORMAT_VERSION:  # no older version exists yet
        raise ScaeInputError(f"{path}: unknown model format version {int(version)}; {expected}")
    missing = [key for key in REQUIRED_MODEL_KEYS if key not in state]
    if missing:
        raise ScaeInputError(f"{path}: incomplete scae model file: no {', '.join(map(repr, missing))} entry")
    unknown = sorted(str(key) for key in state if key not in MODEL_KEYS)
    if unknown:
        raise ScaeInputError(f"{path}: unexpected entries {', '.join(map(repr, unknown))} in an scae model file; {expected}")
    return state


def _model_params(path: str | Path, params) -> dict:
    """The stored estimator parameters, their names checked (values are checked by the estimator)."""
    if not isinstance(params, dict):
        raise ScaeInputError(f"{path}: params must be a dict of Autoencoder parameters; got {type(params).__name__}")
    known = Autoencoder._get_param_names()
    unknown = sorted(str(key) for key in params if key not in known)
    if unknown:
        raise ScaeInputError(
            f"{path}: unknown Autoencoder parameter(s) {', '.join(map(repr, unknown))}; "
            f"expected some of: {', '.join(known)}"
        )
    missing = [key for key in ARCHITECTURE_PARAMS if key not in params]
    if missing:
        raise ScaeInputError(f"{path}: the stored parameters lack {', '.join(map(repr, missing))}")
    params = dict(params)
    if isinstance(params["hidden"], list):
        params["hidden"] = tuple(params["hidden"])
    return params


def _load_weights(path: str | Path, net: AutoencoderNet, weights, params: dict, n_features: int) -> None:
    """Copy the stored weights into ``net``, refusing any that do not fit its architecture."""
    architecture = (f"n_features_in={n_features}, latent_dim={params['latent_dim']}, "
                    f"hidden={tuple(params['hidden'])}")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ScaeInputError(f"{path}: state_dict must map parameter names to tensors")
    expected = net.state_dict()
    missing = [key for key in expected if key not in weights]
    unknown = [str(key) for key in weights if key not in expected]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(unknown)}"] if unknown else [])
        raise ScaeInputError(
            f"{path}: the weights do not match the stored architecture ({architecture}): {'; '.join(parts)}"
        )
    for key, tensor in expected.items():
        given = weights[key]
        if tuple(given.shape) != tuple(tensor.shape):
            raise ScaeInputError(
                f"{path}: the weights do not match the stored architecture ({architecture}): {key} has shape "
                f"{tuple(given.shape)}, expected {tuple(tensor.shape)}"
            )
        if not given.is_floating_point():
            raise ScaeInputError(f"{path}: weight {key} has dtype {given.dtype}; expected floating point")
        if not bool(torch.isfinite(given).all()):
            raise ScaeInputError(f"{path}: weight {key} holds NaN or infinite values")
    net.load_state_dict(weights)


def _as_source(X, what: str = "matrix") -> RowSource:
    """``X`` as a row source: a :class:`RowSource` as given, anything else validated into memory."""
    if isinstance(X, RowSource):
        return X
    return ArraySource(dense_if_small(as_matrix(X, what)))
