"""Rules for every setting: one set of checks shared by ``Autoencoder``, ``StudyConfig`` and the CLI.

Each rule checks one value and says, in words, what it expects. The API reports a bad value as
:class:`~scae.errors.ScaeInputError` (a ``ValueError``) naming the parameter
(``learning_rate must be a finite number > 0 and <= 10; got nan``); the command line as
``argument --learning-rate: expected a finite number > 0 and <= 10, got nan``. This module
imports neither PyTorch nor scikit-learn, so options are checked before any heavy import.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from scae.errors import ScaeInputError

ACTIVATIONS = ("relu", "elu", "gelu", "tanh", "sigmoid", "leaky_relu")
"""Hidden-layer activations (the keys of :data:`scae.models.ACTIVATIONS`)."""
LOSSES = ("mse", "nonzero_mse", "poisson", "nb", "zinb")
"""Training losses (:data:`scae.likelihoods.LIKELIHOODS`)."""
NORMS = ("none", "batch", "layer")
"""Normalisation of the hidden layers (:data:`scae.models.NORMS`)."""
LR_SCHEDULES = ("none", "plateau", "cosine")
"""Learning-rate schedules (:data:`scae.training.LR_SCHEDULES`)."""
DEVICES = ("auto", "cpu", "cuda", "mps")
"""Devices (:data:`scae.parallel.DEVICES`)."""

MAX_SEED = 2**32 - 1
"""Largest seed NumPy and scikit-learn accept (``numpy.random.RandomState``)."""
MAX_WIDTH = 100_000
"""Largest latent or hidden layer width."""
MAX_PARAMETERS = 1_000_000_000
"""Largest network (weights and biases); training holds about 4 × 4 bytes per parameter
(weights, gradients and Adam's two moments): 16 GB at this bound."""
MAX_LEARNING_RATE = 10.0
"""Adam steps of this size already diverge on any expression matrix; larger values only make NaN."""
MAX_EPOCHS = 1_000_000
MAX_BATCH_SIZE = 10_000_000
MAX_KMEANS_SEEDS = 1000
DEFAULT_KMEANS_SEEDS = 5
"""k-means repeats per representation in a study (seeds ``seed … seed + 4``)."""


class InvalidValue(Exception):
    """A value broke a rule; ``expected`` says what the rule wants."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _parsed(rule, convert, text: str):
    """``text`` converted by ``convert`` (``int``, ``float``) and checked by ``rule``. Only plain
    ASCII numbers: Python's ``int`` and ``float`` would also take ``1_0`` and other scripts' digits."""
    text = text.strip()
    if not text.isascii() or "_" in text:
        raise InvalidValue(rule.expected)
    try:
        value = convert(text)
    except ValueError:
        raise InvalidValue(rule.expected) from None
    return rule(value)


@dataclass(frozen=True)
class Integer:
    """An integer (not a bool, not a float) in ``[low, high]``; ``high=None``: no upper bound."""

    low: int
    high: int | None = None

    @property
    def expected(self) -> str:
        if self.high is None:
            return f"an integer >= {self.low}"
        return f"an integer in [{self.low}, {self.high}]"

    def __call__(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidValue(self.expected)
        if value < self.low or (self.high is not None and value > self.high):
            raise InvalidValue(self.expected)
        return int(value)

    def parse(self, text: str) -> int:
        """The integer written in ``text`` (command-line form), checked."""
        return _parsed(self, int, text)


@dataclass(frozen=True)
class Real:
    """A finite real number in ``(low, high]`` (``low_open``) or ``[low, high]``."""

    low: float
    high: float
    low_open: bool = True
    high_open: bool = False

    @property
    def expected(self) -> str:
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        high = f"< {self.high:g}" if self.high_open else f"<= {self.high:g}"
        return f"a finite number {low} and {high}"

    def __call__(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidValue(self.expected)
        value = float(value)
        if not math.isfinite(value):
            raise InvalidValue(self.expected)
        if value < self.low or (self.low_open and value == self.low):
            raise InvalidValue(self.expected)
        if value > self.high or (self.high_open and value == self.high):
            raise InvalidValue(self.expected)
        return value

    def parse(self, text: str) -> float:
        """The number written in ``text`` (command-line form), checked."""
        return _parsed(self, float, text)


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    options: tuple[str, ...]

    @property
    def expected(self) -> str:
        return "one of: " + ", ".join(self.options)

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise InvalidValue(self.expected)
        return value

    def parse(self, text: str) -> str:
        return self(text)


@dataclass(frozen=True)
class Widths:
    """A sequence of layer widths, each an :class:`Integer` in ``[1, MAX_WIDTH]`` (may be empty)."""

    width: Integer = Integer(1, MAX_WIDTH)

    @property
    def expected(self) -> str:
        return f"a sequence of integers in [{self.width.low}, {self.width.high}], e.g. (100,) or (256, 64)"

    def __call__(self, value: object) -> tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise InvalidValue(self.expected)
        try:
            return tuple(self.width(v) for v in value)
        except InvalidValue:
            raise InvalidValue(self.expected) from None


@dataclass(frozen=True)
class Boolean:
    """``True`` or ``False``."""

    expected: str = "True or False"

    def __call__(self, value: object) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidValue(self.expected)
        return bool(value)


SEED = Integer(0, MAX_SEED)
WIDTH = Integer(1, MAX_WIDTH)
HIDDEN = Widths()
EPOCHS = Integer(1, MAX_EPOCHS)
BATCH_SIZE = Integer(1, MAX_BATCH_SIZE)
LEARNING_RATE = Real(0.0, MAX_LEARNING_RATE)
FRACTION = Real(0.0, 1.0, low_open=True, high_open=True)
AT_LEAST_ONE = Integer(1)
AT_LEAST_ZERO = Integer(0)
TOP_GENES = Integer(2)  # a model needs at least 2 genes
KMEANS_SEEDS = Integer(1, MAX_KMEANS_SEEDS)
ACTIVATION = OneOf(ACTIVATIONS)
LOSS = OneOf(LOSSES)
NORM = OneOf(NORMS)
LR_SCHEDULE = OneOf(LR_SCHEDULES)
WARMUP_EPOCHS = Integer(0, MAX_EPOCHS)
DROPOUT = Real(0.0, 1.0, low_open=False, high_open=True)
WEIGHT_DECAY = Real(0.0, 10.0, low_open=False)
INPUT_NOISE = Real(0.0, 100.0, low_open=False)
LOG_MSE_WEIGHT = Real(0.0, 1000.0, low_open=False)
DEVICE = OneOf(DEVICES)
BOOLEAN = Boolean()


def study_seed(kmeans_seeds: int = DEFAULT_KMEANS_SEEDS) -> Integer:
    """Seeds a study accepts: k-means runs with ``seed … seed + kmeans_seeds - 1``, each a valid seed."""
    return Integer(0, MAX_SEED - (kmeans_seeds - 1))


def check(name: str, value, rule):
    """``value`` as ``rule`` accepts it, else :class:`ScaeInputError` naming ``name``."""
    try:
        return rule(value)
    except InvalidValue as err:
        raise ScaeInputError(f"{name} must be {err.expected}; got {value!r}") from None


def network_parameters(n_genes: int, latent_dim: int, hidden: tuple[int, ...]) -> int:
    """Weights and biases of the symmetric network ``genes → hidden → latent → reversed(hidden) → genes``."""
    widths = [n_genes, *hidden, latent_dim]
    one_way = sum(a * b for a, b in pairwise(widths))
    return 2 * one_way + sum(widths[1:]) + sum(widths[:-1])


def network_too_large(latent_dim: int, hidden: tuple[int, ...]) -> str | None:
    """Why ``hidden`` and ``latent_dim`` are refused whatever the number of genes (the network
    without its gene layers already has more than :data:`MAX_PARAMETERS`), or ``None``."""
    count = network_parameters(0, latent_dim, hidden)
    if count <= MAX_PARAMETERS:
        return None
    return (f"widths {' '.join(map(str, hidden))} with latent size {latent_dim} give the network {count:,} "
            f"parameters before any gene is counted; at most {MAX_PARAMETERS:,} are allowed: choose smaller widths")


def check_parameter_count(n_genes: int, latent_dim: int, hidden: tuple[int, ...]) -> int:
    """:func:`network_parameters`, refused above :data:`MAX_PARAMETERS` with the remedy."""
    count = network_parameters(n_genes, latent_dim, hidden)
    if count > MAX_PARAMETERS:
        layers = [n_genes, *hidden, latent_dim, *reversed(hidden), n_genes]
        raise ScaeInputError(
            f"the network {' → '.join(map(str, layers))} would have {count:,} parameters, more than "
            f"{MAX_PARAMETERS:,} (about {16 * MAX_PARAMETERS / 1e9:.0f} GB to train); "
            "choose smaller hidden or latent widths"
        )
    return count


_WHOLE_NUMBER = re.compile(r"[0-9]+")


def torchrun_world_size() -> int:
    """How many processes ``torchrun`` (or a launcher like it) started this one with: its
    ``WORLD_SIZE`` when that is above 1 and ``RANK`` is set too, else 1. A ``WORLD_SIZE`` that is
    not a whole number is :class:`~scae.errors.ScaeInputError`, and so are ``RANK`` and
    ``LOCAL_RANK`` then (without a ``WORLD_SIZE`` above 1 they are someone else's and ignored)."""
    world = _whole_number_variable("WORLD_SIZE")
    if world is None or world <= 1 or "RANK" not in os.environ:
        return 1
    rank = _whole_number_variable("RANK")
    _whole_number_variable("LOCAL_RANK")
    if rank >= world:
        raise ScaeInputError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}; "
                             "torchrun numbers its processes 0 … WORLD_SIZE − 1")
    return world


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process (a malformed
    ``WORLD_SIZE``, ``RANK`` or ``LOCAL_RANK`` is :class:`~scae.errors.ScaeInputError`); without
    importing PyTorch, so the command line can ask before its heavy imports."""
    return torchrun_world_size() > 1


def _whole_number_variable(name: str) -> int | None:
    """The environment variable ``name`` as a whole number (``None`` when unset)."""
    text = os.environ.get(name)
    if text is None:
        return None
    if not _WHOLE_NUMBER.fullmatch(text.strip()):
        raise ScaeInputError(
            f"environment variable {name}={text!r} is not a whole number; torchrun sets it for each process "
            "it starts: unset WORLD_SIZE, RANK and LOCAL_RANK to run one process, or start scae with torchrun"
        )
    return int(text)
