"""Peer methods from other packages, fitted on the same raw counts as scae's models.

scvi-tools' ``SCVI`` (Lopez et al. 2018, a variational autoencoder with a negative-binomial
likelihood) is the reference deep model for single-cell latents. It is optional: install it with
``pip install 'scae[peers]'``. Nothing here imports scvi-tools until a peer is asked for, so
``import scae`` never pays for it (it takes seconds and pulls in Lightning).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from scae.data import as_matrix, value_profile
from scae.errors import ScaeInputError
from scae.params import BOOLEAN, EPOCHS, SEED, WIDTH, check

SCVI_MISSING = (
    "scvi-tools is not installed; pip install 'scae[peers]' (or pip install scvi-tools) "
    "to compare with scvi-tools' SCVI"
)
"""The start of the message :func:`fit_scvi` raises when scvi-tools cannot be imported."""

QUIET_LOGGERS = ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric",
                 "pytorch_lightning")
"""Loggers that print set-up chatter (seeds, accelerators, tips) while SCVI trains."""


def _import_scvi():
    """The ``scvi`` module, or :class:`ScaeInputError` saying how to install it."""
    try:
        return importlib.import_module("scvi")
    except Exception as err:  # a missing package, or a broken install (an incompatible dependency)
        detail = "" if isinstance(err, ModuleNotFoundError) else f" (importing it failed: {type(err).__name__}: {err})"
        raise ScaeInputError(SCVI_MISSING + detail) from None


def scvi_available() -> bool:
    """Whether scvi-tools can be imported (it is imported now, on the first call, not with scae).

    Returns
    -------
    bool
        ``True`` when ``import scvi`` succeeds; ``False`` when it is not installed or its import fails.
    """
    try:
        _import_scvi()
    except ScaeInputError:
        return False
    return True


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence SCVI's and Lightning's log records and warnings for the block (when ``enabled``);
    the loggers' levels are restored afterwards."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _raw_counts(counts) -> np.ndarray | sp.csr_matrix:
    """A float32 copy of ``counts`` (dense stays dense, sparse becomes CSR), checked to be raw counts."""
    X = as_matrix(counts, "counts")
    if X.shape[0] < 2:
        raise ScaeInputError(f"counts: matrix has shape {X.shape}; expected at least 2 cells")
    non_negative, integer_counts = value_profile(X.data if sp.issparse(X) else X)
    if not (non_negative and integer_counts):
        raise ScaeInputError(
            "counts: the matrix is not raw counts (it holds negative or non-integer values, or no "
            "positive value); expected the unnormalised integer counts SCVI models"
        )
    empty = np.flatnonzero(np.asarray(X.sum(axis=1)).ravel() == 0)
    if empty.size:
        raise ScaeInputError(
            f"counts: {empty.size} cell(s) have no counts, first at row {int(empty[0])}; "
            "expected every cell to have at least one count (SCVI's library size is its log)"
        )
    return X.copy()  # AnnData and scvi-tools get their own copy: the caller's matrix is never touched


def fit_scvi(
    counts,
    seed: int = 0,
    n_latent: int = 10,
    max_epochs: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Fit scvi-tools' ``SCVI`` with its defaults on raw counts and return its latent.

    Every setting but ``n_latent`` and ``max_epochs`` is scvi-tools' default (in 1.4: a
    zero-inflated negative-binomial likelihood, one hidden layer of 128 units, dropout 0.1,
    gene-wise dispersion, the observed library size, a 90 % training split, batch size 128, no
    early stopping). The model sees all cells; ``setup_anndata`` registers the counts in ``X``
    with no batch or labels key. Training uses scvi-tools' default accelerator (a GPU when
    PyTorch sees one, else the CPU) and PyTorch's current thread count.

    Parameters
    ----------
    counts
        Cells × genes raw counts: a NumPy array, SciPy sparse matrix or anything ``as_matrix``
        takes, with non-negative integer values (any dtype) and at least one count per cell. The
        genes are used as given (choose highly variable genes before). Never modified.
    seed
        ``scvi.settings.seed``: seeds Python's, NumPy's and PyTorch's global generators (as
        scvi-tools does), hence the training split, initialisation and minibatches. The same
        seed, data and machine give the same latent.
    n_latent
        Latent dimension (scvi-tools' default is 10 as well).
    max_epochs
        Epochs to train; ``None`` leaves it to scvi-tools' own rule (its
        ``get_max_epochs_heuristic``: 400 up to 20,000 cells, ``400 × 20,000 / cells`` above).
    progress
        Show scvi-tools' progress bar and Lightning's messages; by default both are silenced.

    Returns
    -------
    latent
        ``get_latent_representation()`` (the posterior means), cells × ``n_latent``, float32.
    info
        ``fit_seconds``: wall time of ``setup_anndata``, model construction and training;
        ``epochs``: epochs trained; ``max_epochs``: the epochs asked for (when ``None``, the number
        scvi-tools' rule chose); ``scvi_version``; ``n_cells`` and ``n_genes``.

    Raises
    ------
    ScaeInputError
        If scvi-tools is not installed (or fails to import), a parameter is out of range, or
        ``counts`` is not a matrix of raw counts with at least one count per cell.
    """
    seed = check("seed", seed, SEED)
    n_latent = check("n_latent", n_latent, WIDTH)
    if max_epochs is not None:
        max_epochs = check("max_epochs", max_epochs, EPOCHS)
    progress = check("progress", progress, BOOLEAN)
    X = _raw_counts(counts)
    scvi = _import_scvi()
    import anndata

    adata = anndata.AnnData(X)
    with _quiet(not progress):
        scvi.settings.seed = seed
        started = time.perf_counter()
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata, n_latent=n_latent)
        model.train(max_epochs=max_epochs, enable_progress_bar=progress)  # None: scvi-tools' rule
        fit_seconds = time.perf_counter() - started
        latent = np.asarray(model.get_latent_representation(), dtype=np.float32)
    trainer = getattr(model, "trainer", None)
    if max_epochs is None:  # the number scvi-tools' rule chose, as its Lightning trainer holds it
        max_epochs = getattr(trainer, "max_epochs", None)
    history = getattr(model, "history", None) or {}
    epochs = len(history["elbo_train"]) if "elbo_train" in history else getattr(trainer, "current_epoch", max_epochs)
    info = {
        "fit_seconds": fit_seconds,
        "epochs": int(epochs),
        "max_epochs": None if max_epochs is None else int(max_epochs),
        "scvi_version": str(scvi.__version__),
        "n_cells": int(X.shape[0]),
        "n_genes": int(X.shape[1]),
    }
    return latent, info
