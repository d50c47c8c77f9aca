"""The autoencoder: a PyTorch network and a scikit-learn style estimator around it."""

from __future__ import annotations

import functools
import io
import os
import re
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from scae import params as rules
from scae.data import as_matrix, dense_if_small, not_counts
from scae.errors import ScaeInputError
from scae.files import atomic_path, irregular_kind
from scae.likelihoods import LOG_EPS, Output, get_likelihood
from scae.parallel import Distributed, resolve_device
from scae.presets import preset
from scae.sources import TARGET_SUM, ArraySource, RowSource, normalize_counts_tensor, on_device
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
MODEL_FORMAT_VERSION = 2
"""Version 2 added the count, variational and regularisation parameters and ``best_epoch``;
version 1 files load with those parameters at their defaults."""
MODEL_FORMAT = f"{MODEL_FORMAT_NAME}/{MODEL_FORMAT_VERSION}"
MODEL_KEYS = frozenset({
    "format", "params", "n_features_in", "state_dict", "history", "fit_seconds", "train_seconds",
    "train_cells_per_second", "metadata", "best_epoch",
})
"""Entries of a model file; the first six are required."""
REQUIRED_MODEL_KEYS = ("format", "params", "n_features_in", "state_dict", "history", "fit_seconds")
ARCHITECTURE_PARAMS = ("latent_dim", "hidden", "activation", "loss")
"""Parameters a model file must store (the others fall back to their defaults)."""


NORMS = ("none", "batch", "layer")
VAR_EPS = 1e-4
"""Added to a variational network's latent variances (as scvi-tools does), so none reaches zero."""


def _hidden_block(width_in: int, width_out: int, activation: str, norm: str, dropout: float) -> list[nn.Module]:
    """``Linear → [BatchNorm | LayerNorm] → activation → [Dropout]``."""
    layers: list[nn.Module] = [nn.Linear(width_in, width_out)]
    if norm == "batch":
        layers.append(nn.BatchNorm1d(width_out))
    elif norm == "layer":
        layers.append(nn.LayerNorm(width_out))
    layers.append(ACTIVATIONS[activation]())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


def _through_all_but_last(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for layer in list(layers)[:-1]:
        x = layer(x)
    return x


class AutoencoderNet(nn.Module):
    """Symmetric fully connected autoencoder.

    ``n_genes → hidden[0] → … → latent_dim → … → hidden[0] → n_genes``, with ``activation``
    after every hidden layer (optionally preceded by batch or layer normalisation and followed
    by dropout) and no activation on the input, latent or output layer.

    The ``loss`` decides what the output layer means (:mod:`scae.likelihoods`): for ``mse`` and
    ``nonzero_mse`` it is the reconstruction itself; for count losses (``poisson``, ``nb``,
    ``zinb``) the network is given raw counts, encodes ``log1p(counts / library × 10⁴)``, and
    the output layer gives per-gene logits whose softmax ρ times the cell's library is the
    expected count; ``nb`` adds a learned per-gene inverse dispersion and ``zinb`` a dropout
    head beside the output layer. ``variational=True`` makes the latent Gaussian: a second
    head gives log-variances, training samples ``z`` by the reparameterisation trick, and the
    KL divergence from N(0, I) comes with the output; in evaluation mode ``z`` is the
    posterior mean. Extra parts are created after the default ones, so a default network
    draws the same initial weights as ever.
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int,
        hidden: tuple[int, ...] = (100,),
        activation: str = "relu",
        *,
        loss: str = "mse",
        variational: bool = False,
        norm: str = "none",
        dropout: float = 0.0,
        scale_input: bool = False,
        input_noise: float = 0.0,
    ) -> None:
        super().__init__()
        likelihood = get_likelihood(loss)
        if norm not in NORMS:
            raise ValueError(f"unknown norm '{norm}'; expected one of: {', '.join(NORMS)}")
        widths = [n_genes, *hidden]
        enc: list[nn.Module] = []
        for a, b in pairwise(widths):
            enc += _hidden_block(a, b, activation, norm, dropout)
        enc.append(nn.Linear(widths[-1], latent_dim))
        dec: list[nn.Module] = []
        back = [latent_dim, *reversed(hidden)]
        for a, b in pairwise(back):
            dec += _hidden_block(a, b, activation, norm, dropout)
        dec.append(nn.Linear(back[-1], n_genes))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.counts = likelihood.counts
        self.variational = variational
        self.z_log_var = nn.Linear(widths[-1], latent_dim) if variational else None
        self.log_theta = nn.Parameter(torch.zeros(n_genes)) if "theta" in likelihood.parameters else None
        self.dropout_head = nn.Linear(back[-1], n_genes) if "dropout" in likelihood.parameters else None
        self.input_noise = input_noise
        if scale_input:  # set from the training cells by Autoencoder.fit (set_input_scaling)
            self.register_buffer("input_mean", torch.zeros(n_genes))
            self.register_buffer("input_scale", torch.ones(n_genes))
        else:
            self.input_mean = self.input_scale = None

    def set_input_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise the encoder's input by these per-gene means and standard deviations
        (genes that do not vary keep a scale of 1)."""
        self.input_mean.copy_(mean)
        self.input_scale.copy_(torch.where(std > 0, 1.0 / std.clamp(min=1e-12), torch.ones_like(std)))

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: ``x`` itself, or ``log1p(x / library × 10⁴)`` for a count network."""
        return normalize_counts_tensor(x) if self.counts else x

    def _encoder_input(self, target: torch.Tensor) -> torch.Tensor:
        """The model input, standardised per gene (``scale_input``), with Gaussian noise while
        training (``input_noise``, a denoising autoencoder)."""
        if self.input_mean is not None:
            target = (target - self.input_mean) * self.input_scale
        if self.training and self.input_noise > 0:
            target = target + self.input_noise * torch.randn_like(target)
        return target

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent codes (a variational network's posterior means), without running the decoder."""
        return self.encoder(self._encoder_input(self.model_input(x)))

    def forward(self, x: torch.Tensor) -> Output:
        """The latent, the reconstruction and the likelihood's parameters of a batch."""
        target = self.model_input(x)
        h_in = self._encoder_input(target)
        kl = None
        if self.variational:
            h = _through_all_but_last(self.encoder, h_in)
            z_mean = self.encoder[-1](h)
            var = self.z_log_var(h).exp() + VAR_EPS
            z = z_mean + var.sqrt() * torch.randn_like(z_mean) if self.training else z_mean
            kl = 0.5 * (z_mean.square() + var - var.log() - 1.0).sum(dim=1)
        else:
            z = self.encoder(h_in)
        if not self.counts:
            return Output(z, self.decoder(z), target, kl=kl)
        h = _through_all_but_last(self.decoder, z)
        log_rho = torch.log_softmax(self.decoder[-1](h), dim=1)
        library = x.sum(dim=1, keepdim=True)
        return Output(
            latent=z,
            reconstruction=None if self.training else torch.log1p(log_rho.exp() * TARGET_SUM),
            target=target,
            log_mean=log_rho + torch.log(library + LOG_EPS),
            log_theta=self.log_theta,
            dropout_logit=None if self.dropout_head is None else self.dropout_head(h),
            kl=kl,
        )


def _in_float32_with_grad(method):
    """Run ``method`` with PyTorch's defaults a model needs, whatever the caller set: float32 as the
    default dtype (a network built under ``torch.set_default_dtype(torch.float64)`` met float32
    batches), and gradients on, outside inference mode (``fit`` called within ``torch.no_grad()``).
    The caller's settings are back on return."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return method(*args, **kwargs)
        finally:
            torch.set_default_dtype(previous)

    return wrapped


class Autoencoder(TransformerMixin, BaseEstimator):
    """Autoencoder for cells × genes expression matrices.

    As in scikit-learn, ``__init__`` only stores the parameters; :meth:`fit` checks them all
    first and raises :class:`~scae.errors.ScaeInputError` (a ``ValueError``) naming the first
    bad one, its value and what was expected. Methods that need a fitted model raise
    scikit-learn's ``NotFittedError`` before :meth:`fit`. Named parameter sets:
    :meth:`from_preset` (:mod:`scae.presets`).

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
        ``"mse"`` or ``"nonzero_mse"`` (MSE over the nonzero input entries of each batch) on the
        matrix as given (log-normalised); or a count likelihood on *raw counts* — ``"poisson"``,
        ``"nb"`` (negative binomial, per-gene dispersion) or ``"zinb"`` (zero-inflated) — whose
        network reads ``log1p(counts / library × 10⁴)`` and outputs per-gene proportions of the
        cell's library (see :class:`AutoencoderNet`). A count model needs non-negative whole
        numbers; given a row source that normalises raw counts, it reads them raw.
    epochs, batch_size, learning_rate
        Adam training schedule: epochs in [1, 10⁶], batch size in [1, 10⁷], learning rate a
        finite number in (0, 10] (larger steps only diverge). Training stops with
        :class:`~scae.training.TrainingDivergedError` when the loss becomes NaN or infinite.
    random_state
        Seeds weight initialisation, batch order, dropout, latent samples and the validation
        split: an integer in [0, 2³² − 1].
    device
        ``"auto"`` (a CUDA GPU, else Apple MPS, else the CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``.
    progress
        Show a progress bar while fitting.
    variational
        Gaussian latent (a VAE): sampled by the reparameterisation trick while training, with a
        KL term added to the loss; :meth:`transform` gives the posterior means.
    kl_warmup_epochs
        The KL term's weight rises linearly from 0 to 1 over this many epochs (0: full from the start).
    norm
        ``"none"``, ``"batch"`` or ``"layer"`` normalisation after each hidden linear layer.
    dropout
        Dropout probability after each hidden activation, in [0, 1).
    weight_decay
        Decoupled weight decay (AdamW) ≥ 0; 0 trains with plain Adam.
    lr_schedule
        ``"none"``, ``"plateau"`` (halve the rate when the monitored loss stalls for 4 epochs) or
        ``"cosine"`` (a half cosine down to 1% over ``epochs``).
    early_stopping
        Hold out ``validation_fraction`` of the training cells (seeded), stop after ``patience``
        epochs without a better validation loss, and keep the best epoch's weights.
    patience, validation_fraction
        See ``early_stopping``: an integer ≥ 1, a fraction in (0, 1).
    scale_input
        Standardise each gene of the encoder's input (the log-normalised values) by its mean and
        standard deviation over the training cells (scanpy's ``scale``); the reconstruction
        stays on the unscaled scale.
    input_noise
        Standard deviation (≥ 0) of Gaussian noise added to the encoder's input while training
        (a denoising autoencoder).
    log_mse_weight
        For a count loss: add this weight (≥ 0) × the squared error between the log-normalised
        reconstruction ``log1p(ρ × 10⁴)`` and the log-normalised counts, per entry, to the
        negative log-likelihood (0: the likelihood alone).

    Attributes
    ----------
    net_ : AutoencoderNet
        The trained network.
    history_ : list of dict
        Per-epoch ``train_loss`` (and ``test_loss``, ``test_mse`` when ``eval_X`` was given;
        ``val_loss`` with early stopping).
    best_epoch_ : int or None
        With early stopping, the epoch whose weights were kept.
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
        variational: bool = False,
        kl_warmup_epochs: int = 0,
        norm: str = "none",
        dropout: float = 0.0,
        weight_decay: float = 0.0,
        lr_schedule: str = "none",
        early_stopping: bool = False,
        patience: int = 10,
        validation_fraction: float = 0.1,
        scale_input: bool = False,
        input_noise: float = 0.0,
        log_mse_weight: float = 0.0,
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
        self.variational = variational
        self.kl_warmup_epochs = kl_warmup_epochs
        self.norm = norm
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.early_stopping = early_stopping
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.scale_input = scale_input
        self.input_noise = input_noise
        self.log_mse_weight = log_mse_weight

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Autoencoder:
        """An autoencoder with the parameters of preset ``name`` (:data:`scae.presets.PRESETS`;
        ``"recommended"`` is :data:`scae.presets.RECOMMENDED`), some of them overridden."""
        try:
            params = preset(name)
        except ValueError as err:
            raise ScaeInputError(str(err)) from None
        return cls(**{**params, **overrides})

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
            "variational": rules.check("variational", self.variational, rules.BOOLEAN),
            "kl_warmup_epochs": rules.check("kl_warmup_epochs", self.kl_warmup_epochs, rules.WARMUP_EPOCHS),
            "norm": rules.check("norm", self.norm, rules.NORM),
            "dropout": rules.check("dropout", self.dropout, rules.DROPOUT),
            "weight_decay": rules.check("weight_decay", self.weight_decay, rules.WEIGHT_DECAY),
            "lr_schedule": rules.check("lr_schedule", self.lr_schedule, rules.LR_SCHEDULE),
            "early_stopping": rules.check("early_stopping", self.early_stopping, rules.BOOLEAN),
            "patience": rules.check("patience", self.patience, rules.EPOCHS),
            "validation_fraction": rules.check("validation_fraction", self.validation_fraction, rules.FRACTION),
            "scale_input": rules.check("scale_input", self.scale_input, rules.BOOLEAN),
            "input_noise": rules.check("input_noise", self.input_noise, rules.INPUT_NOISE),
            "log_mse_weight": rules.check("log_mse_weight", self.log_mse_weight, rules.LOG_MSE_WEIGHT),
        }
        if checked["log_mse_weight"] > 0 and not get_likelihood(checked["loss"]).counts:
            raise ScaeInputError(
                f"log_mse_weight must be 0 with loss {checked['loss']!r} (it adds a log-scale squared error to a "
                f"count likelihood: poisson, nb or zinb); got {self.log_mse_weight!r}"
            )
        return checked

    def _build(self, n_features: int) -> AutoencoderNet:
        latent_dim, hidden = int(self.latent_dim), tuple(int(h) for h in self.hidden)
        rules.check_parameter_count(n_features, latent_dim, hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.random_state))
            return AutoencoderNet(
                n_features, latent_dim, hidden, self.activation, loss=self.loss,
                variational=bool(self.variational), norm=self.norm, dropout=float(self.dropout),
                scale_input=bool(self.scale_input), input_noise=float(self.input_noise),
            )

    def _training_source(self, X, what: str) -> RowSource:
        """``X`` as the rows this model trains or predicts on: raw counts for a count loss."""
        if not get_likelihood(self.loss).counts:
            return _as_source(X, what)
        if isinstance(X, RowSource):
            return X.raw() if X.counts else X
        source = _as_source(X, what)
        _check_counts(source, what, self.loss)
        return source

    @_in_float32_with_grad
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
        train = self._training_source(X, "training matrix")
        test = None
        if eval_X is not None:
            test = self._training_source(eval_X, "evaluation matrix")
            if test.n_cols != train.n_cols:
                raise ScaeInputError(
                    f"eval_X has {test.n_cols} genes (columns); the training matrix has {train.n_cols}"
                )
        validation = None
        if checked["early_stopping"]:
            train, validation = _validation_split(train, checked["validation_fraction"], checked["random_state"])
        device = resolve_device(checked["device"], 0 if distributed is None else distributed.local_rank)
        net = self._build(int(train.n_cols)).to(device)
        started = time.perf_counter()
        # into a GPU's memory now when they fit (train_network keeps such copies), so that the
        # input moments are read from there rather than in a pass of their own on the host
        train, test, validation = on_device([train, test, validation], device)
        if checked["scale_input"]:
            net.set_input_scaling(*_input_moments(net, train, device))
        run = train_network(
            net,
            train,
            test,
            loss=checked["loss"],
            epochs=checked["epochs"],
            batch_size=checked["batch_size"],
            learning_rate=checked["learning_rate"],
            weight_decay=checked["weight_decay"],
            lr_schedule=checked["lr_schedule"],
            kl_warmup_epochs=checked["kl_warmup_epochs"] if checked["variational"] else 0,
            log_mse_weight=checked["log_mse_weight"],
            validation=validation,
            patience=checked["patience"] if validation is not None else None,
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
        self.best_epoch_ = run.best_epoch
        self.train_seconds_ = run.train_seconds
        self.train_cells_per_second_ = run.cells_per_second
        return self

    @property
    def device_(self) -> torch.device:
        """The device the fitted network is on (scikit-learn's ``NotFittedError`` before ``fit``)."""
        check_is_fitted(self, "net_")
        return next(self.net_.parameters()).device

    def _source(self, X) -> RowSource:
        check_is_fitted(self, "net_")
        source = self._training_source(X, "matrix")
        self._check_n_features(source)
        return source

    def _check_n_features(self, source: RowSource) -> None:
        if source.n_cols != self.n_features_in_:
            raise ScaeInputError(f"X has {source.n_cols} genes (columns); the model expects {self.n_features_in_}")

    @_in_float32_with_grad
    def transform(self, X) -> np.ndarray:
        """Latent representation, cells × ``latent_dim``."""
        source = self._source(X)
        return encode(self.net_, source, self.device_)

    @_in_float32_with_grad
    def reconstruct(self, X) -> np.ndarray:
        """Reconstructed (denoised) expression, cells × genes; for a count loss on the
        log-normalised scale, ``log1p(ρ × 10⁴)`` with ρ the expected proportions."""
        source = self._source(X)
        return predict(self.net_, source, self.device_)[1]

    @_in_float32_with_grad
    def transform_and_reconstruct(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Latent representation and reconstruction in one pass."""
        source = self._source(X)
        return predict(self.net_, source, self.device_)

    @_in_float32_with_grad
    def reconstruction_error(self, X) -> dict[str, float]:
        """MSE over all entries (``mse``) and over the nonzero entries (``nonzero_mse``) of what
        the network encodes (for a count loss: the log-normalised counts) and its reconstruction."""
        source = self._source(X)
        return evaluate_losses(self.net_, source, device=self.device_)

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Save parameters, weights and history to one file (written atomically).

        ``metadata`` (plain strings and numbers) is stored beside them and comes back as
        ``metadata_`` from :meth:`load`. A named pipe, socket or device at ``path`` is refused
        (:class:`~scae.errors.ScaeInputError`): the atomic write would put a file in its place.
        """
        check_is_fitted(self, "net_")
        metadata = _checked_metadata(metadata if metadata is not None else getattr(self, "metadata_", {}))
        path = Path(path)
        if path.is_dir():
            raise ScaeInputError(f"{path}: is a directory; expected the path of the model file to write")
        if not path.parent.is_dir():
            raise ScaeInputError(f"{path}: its folder {path.parent} does not exist; expected the path of the "
                                 "model file to write in an existing folder")
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
            "metadata": metadata,
            "best_epoch": getattr(self, "best_epoch_", None),
        }
        buffer = io.BytesIO()  # serialised in memory: a failed write to disk is then a plain OSError
        torch.save(state, buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    @classmethod
    @_in_float32_with_grad
    def load(cls, path: str | Path, device: str | None = None) -> Autoencoder:
        """Load a model written by :meth:`save` (weights-only loading: no code is executed).

        ``device`` is where the network goes: ``None`` (default) the model's own ``device``
        parameter as on this machine (``auto``: a GPU when there is one; a GPU that is not here:
        the CPU), else as ``--device`` (``auto``, ``cpu``, ``cuda``, ``mps``; one that is not
        here raises :class:`~scae.errors.ScaeInputError`). A model saved from a GPU then predicts
        on the GPU again where there is one, with the same numbers.

        Any file that is not such a model — missing, empty, truncated, not a PyTorch file,
        another kind of PyTorch file, unknown entries or parameters, weights that do not fit the
        stored architecture, a newer format version — raises
        :class:`~scae.errors.ScaeInputError` naming the file and the problem.
        """
        if not isinstance(path, (str, os.PathLike)) or isinstance(fspath := os.fspath(path), bytes):
            raise ScaeInputError(f"path must be a file name (str or pathlib.Path); got {type(path).__name__}")
        if "\0" in fspath:
            raise ScaeInputError(f"path {fspath!r} holds a NUL character; expected a file name")
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
        best_epoch = state.get("best_epoch")
        if best_epoch is not None and (isinstance(best_epoch, bool) or not isinstance(best_epoch, int)):
            raise ScaeInputError(f"{path}: best_epoch must be an integer or None; got {best_epoch!r}")
        model.metadata_ = dict(metadata)
        model.best_epoch_ = best_epoch
        net.to(_load_device(checked["device"] if device is None else device, strict=device is not None))
        return model


def _load_device(name: str, strict: bool) -> torch.device:
    """Where a loaded network goes: ``name`` resolved (:func:`~scae.parallel.resolve_device`);
    unless ``strict``, the CPU when that device is not on this machine."""
    try:
        return resolve_device(name)
    except ScaeInputError:
        if strict:
            raise
        return torch.device("cpu")


def _read_model_file(path: Path) -> dict:
    """The dict a model file holds, read weights-only, with its format and entries checked."""
    expected = f"expected a model file written by scae's Autoencoder.save (format {MODEL_FORMAT})"
    try:
        directory = path.is_dir()
    except OSError as err:  # a name too long, a loop of links, …
        raise ScaeInputError(f"{str(path)[:120]}: cannot be read ({err.strerror or err}); {expected}") from None
    if directory:
        raise ScaeInputError(f"{path}: is a directory; {expected}")
    kind = irregular_kind(path)  # a named pipe without a writer would block the read below
    if kind is not None:
        raise ScaeInputError(f"{path}: is {kind}; {expected}")
    try:
        with path.open("rb") as handle:
            empty = not handle.read(1)
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be read ({err.strerror or err}); {expected}") from None
    if empty:
        raise ScaeInputError(f"{path}: is empty; {expected}")
    damaged = _damaged_zip_member(path)
    if damaged:
        raise ScaeInputError(f"{path}: damaged: its part {damaged!r} fails its checksum (the file was altered "
                             f"or corrupted after it was written); {expected}")
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
    if name != MODEL_FORMAT_NAME or not re.fullmatch(r"[0-9]{1,9}", version):  # ASCII digits, a sane length
        raise ScaeInputError(f"{path}: not an scae model file (format {state['format'][:80]!r}); {expected}")
    if int(version) > MODEL_FORMAT_VERSION:
        raise ScaeInputError(
            f"{path}: written in model format version {int(version)} by a newer scae; this scae reads "
            f"version {MODEL_FORMAT_VERSION}: upgrade scae to load it"
        )
    if int(version) < 1:
        raise ScaeInputError(f"{path}: unknown model format version {int(version)}; {expected}")
    missing = [key for key in REQUIRED_MODEL_KEYS if key not in state]
    if missing:
        raise ScaeInputError(f"{path}: incomplete scae model file: no {', '.join(map(repr, missing))} entry")
    unknown = sorted(str(key) for key in state if key not in MODEL_KEYS)
    if unknown:
        raise ScaeInputError(f"{path}: unexpected entries {', '.join(map(repr, unknown))} in an scae model file; {expected}")
    return state


def _damaged_zip_member(path: Path) -> str | None:
    """The first part of a PyTorch (zip) file whose CRC-32 does not match, if any: torch.load
    does not check them, so altered weights would load silently. ``None`` for a file that is
    not a zip archive (torch.load then says what it is)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


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


METADATA_TYPES = (str, int, float, bool, type(None))
"""What a model file's metadata values may be: what :meth:`Autoencoder.load` reads back without running code."""


def _checked_metadata(metadata) -> dict:
    """``metadata`` as saved: a dict of string keys to plain strings, numbers, booleans or ``None``."""
    if not isinstance(metadata, dict):
        raise ScaeInputError(f"metadata must be a dict of names to plain strings and numbers; got {type(metadata).__name__}")
    for key, value in metadata.items():
        if type(key) is not str:  # exact types: NumPy's scalars (np.float64, np.str_) load as code, not data
            raise ScaeInputError(f"metadata names must be plain strings; got {type(key).__name__} {str(key)!r}")
        if type(value) not in METADATA_TYPES:
            raise ScaeInputError(f"metadata[{key!r}] must be a plain string, number, boolean or None; "
                                 f"got {type(value).__name__}")
    return dict(metadata)


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
        if given.layout != torch.strided or given.is_meta:  # sparse or storage-less: not weights to copy
            raise ScaeInputError(f"{path}: weight {key} is {'a meta' if given.is_meta else 'a sparse'} tensor; "
                                 "expected dense values")
        if given.is_floating_point() != tensor.is_floating_point():  # weights are floats, counters integers
            raise ScaeInputError(f"{path}: weight {key} has dtype {given.dtype}; expected {tensor.dtype}")
        if not bool(torch.isfinite(given).all()):
            raise ScaeInputError(f"{path}: weight {key} holds NaN or infinite values")
    net.load_state_dict(weights)


def _check_counts(source: RowSource, what: str, loss: str) -> None:
    """Refuse a matrix in memory that is not raw counts (non-negative whole numbers)."""
    X = source.read(slice(None))
    values = X.data if sp.issparse(X) else (X.numpy() if isinstance(X, torch.Tensor) else np.asarray(X))
    bad = not_counts(values)  # the readers' rule for raw counts
    if bad is None:
        return
    first = float(values.ravel()[np.flatnonzero(bad.ravel())[0]])
    raise ScaeInputError(
        f"{what}: loss '{loss}' models raw counts, but the matrix holds {'negative' if first < 0 else 'non-integer'} "
        f"values (e.g. {first:g}); give the raw counts (non-negative whole numbers), or use loss 'mse' for "
        "log-normalised values"
    )


@torch.inference_mode()
def _input_moments(net: AutoencoderNet, source: RowSource, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gene mean and standard deviation of the network's input over ``source`` (one pass,
    sums in float64)."""
    total = torch.zeros(source.n_cols, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    for x in source.batches():
        values = net.model_input(x.to(device, non_blocking=True)).double()
        total += values.sum(dim=0)
        squares += values.square().sum(dim=0)
    n = max(source.n_rows, 1)
    mean = total / n
    std = (squares / n - mean.square()).clamp(min=0.0).sqrt()
    return mean.float(), std.float()


def _validation_split(train: RowSource, fraction: float, seed: int) -> tuple[RowSource, RowSource]:
    """A seeded ``fraction`` of the training rows held out for early stopping, and the rest."""
    n = train.n_rows
    n_val = min(n - 1, max(1, round(fraction * n)))
    if n_val < 1:
        raise ScaeInputError(f"the training matrix has {n} cell{'s' if n != 1 else ''}; early stopping (early_stopping, "
                             "--early-stopping, on in the presets) holds some of them out, so it needs at least 2: "
                             "give more cells, or turn it off (early_stopping=False, --no-early-stopping)")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the batch order is unchanged
    held = np.zeros(n, dtype=bool)
    held[rng.choice(n, n_val, replace=False)] = True
    return train.subset(np.flatnonzero(~held)), train.subset(np.flatnonzero(held))


def _as_source(X, what: str = "matrix") -> RowSource:
    """``X`` as a row source: a :class:`RowSource` as given, anything else validated into memory."""
    if isinstance(X, RowSource):
        return X
    return ArraySource(dense_if_small(as_matrix(X, what)))
