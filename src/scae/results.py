"""What a study is and what it measured: run specifications, settings and results.

The study (:mod:`scae.study`) computes a :class:`StudyResult`; the report and the output
writers read it. Keeping these types here lets both sides import them without importing
each other.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from scae import __version__
from scae import params as rules
from scae.data import Dataset, train_only_labels
from scae.embeddings import TSNEConfig
from scae.errors import ScaeInputError
from scae.interrupts import raise_if_interrupted
from scae.models import Autoencoder
from scae.presets import preset
from scae.sources import ArraySource


@dataclass(frozen=True)
class RunSpec:
    """One autoencoder of the study.

    ``tsne_latent`` / ``tsne_reconstruction`` choose which of its representations get a t-SNE
    (t-SNE is the slowest stage, so only those the report shows are computed).
    """

    name: str
    latent_dim: int
    loss: str
    tsne_latent: bool = False
    tsne_reconstruction: bool = False
    preset: str | None = None
    """A named parameter set (:mod:`scae.presets`) the run trains with, instead of the study's
    network and schedule (it still stops after at most the study's epochs)."""

    @property
    def counts(self) -> bool:
        """Whether the run models raw counts (it is skipped on data without them)."""
        from scae.likelihoods import get_likelihood

        return get_likelihood(self.loss).counts


DEFAULT_RUNS = (
    RunSpec("ae10", 10, "mse", tsne_latent=True, tsne_reconstruction=True),
    RunSpec("ae50", 50, "mse"),
    RunSpec("ae2", 2, "mse"),
    RunSpec("ae10_nonzero", 10, "nonzero_mse", tsne_latent=True, tsne_reconstruction=True),
)
"""The assignment's four runs (they answer Q1–Q5)."""
RECOMMENDED_RUN = RunSpec(
    "recommended", preset("recommended")["latent_dim"], preset("recommended")["loss"],
    tsne_latent=True, tsne_reconstruction=True, preset="recommended",
)
"""The fifth run, "Beyond the assignment": the model scae recommends (:data:`scae.presets.RECOMMENDED`)."""
STUDY_RUNS = (*DEFAULT_RUNS, RECOMMENDED_RUN)


@dataclass(frozen=True)
class StudyConfig:
    """Settings of a study; every random choice derives from ``seed``."""

    epochs: int = 50
    seed: int = 0
    hidden: tuple[int, ...] = (100,)
    activation: str = "relu"
    batch_size: int = 128
    learning_rate: float = 1e-3
    test_fraction: float = 0.2
    kmeans_seeds: int = rules.DEFAULT_KMEANS_SEEDS
    max_embed_cells: int = 20_000
    """Cluster scores, t-SNE and scatter plots use a seeded sample of at most this many cells."""
    tsne: TSNEConfig = field(default_factory=TSNEConfig)
    runs: tuple[RunSpec, ...] = STUDY_RUNS
    max_layer_entries: int = 25_000_000
    """Reconstructions of every cell go to ``results.h5ad`` layers while cells × genes is at most
    this (100 MB of float32 per run); above it, ``reconstructions.h5ad`` holds them for the first
    ``sample_layer_entries // genes`` cells of the scored sample."""
    sample_layer_entries: int = 5_000_000
    """Size of each reconstruction in ``reconstructions.h5ad`` (20 MB of float32 per run)."""
    progress: bool = True
    tsne_workers: int = 0
    """Worker processes computing the t-SNEs and cluster scores while the models train on the
    remaining cores (results do not depend on it; 0: in this process, after training). The
    command line uses half the available cores (:func:`~scae.study.background_workers`); from
    a Python script, 1 or more needs the script's top-level code under
    ``if __name__ == "__main__":`` (worker processes are spawned)."""
    device: str = "auto"
    """Where models train and predict: ``auto``, ``cpu``, ``cuda`` or ``mps``."""
    resume: bool = False
    """Reuse models in ``out_dir/models`` trained by an interrupted study on the same input
    with the same settings (others are refused)."""
    top_genes: int | None = None
    """Restrict the input to its most variable genes on the training cells
    (:func:`scae.genes.highly_variable_genes`) before anything else; ``None``: every gene."""
    denoise_cells: int = 2000
    """Test cells (a seeded sample) on which a hidden 10% of the nonzero entries are imputed."""

    def __post_init__(self) -> None:
        """Check every setting (the same rules as :class:`~scae.models.Autoencoder` and the command
        line); a bad one raises :class:`~scae.errors.ScaeInputError` naming the field."""
        kmeans_seeds = rules.check("kmeans_seeds", self.kmeans_seeds, rules.KMEANS_SEEDS)
        rules.check("epochs", self.epochs, rules.EPOCHS)
        rules.check("seed", self.seed, rules.study_seed(kmeans_seeds))
        hidden = rules.check("hidden", self.hidden, rules.HIDDEN)
        object.__setattr__(self, "hidden", hidden)  # a list becomes the tuple the study records
        rules.check("activation", self.activation, rules.ACTIVATION)
        rules.check("batch_size", self.batch_size, rules.BATCH_SIZE)
        rules.check("learning_rate", self.learning_rate, rules.LEARNING_RATE)
        rules.check("test_fraction", self.test_fraction, rules.FRACTION)
        for name in ("max_embed_cells", "max_layer_entries", "sample_layer_entries"):
            rules.check(name, getattr(self, name), rules.AT_LEAST_ONE)
        rules.check("tsne_workers", self.tsne_workers, rules.AT_LEAST_ZERO)
        rules.check("device", self.device, rules.DEVICE)
        rules.check("progress", self.progress, rules.BOOLEAN)
        rules.check("resume", self.resume, rules.BOOLEAN)
        if self.top_genes is not None:
            rules.check("top_genes", self.top_genes, rules.TOP_GENES)
        rules.check("denoise_cells", self.denoise_cells, rules.AT_LEAST_ONE)
        if not isinstance(self.tsne, TSNEConfig):
            raise ScaeInputError(f"tsne must be a TSNEConfig; got {self.tsne!r}")
        self._check_runs()

    def _check_runs(self) -> None:
        runs = self.runs
        if not isinstance(runs, tuple) or not runs or not all(isinstance(run, RunSpec) for run in runs):
            raise ScaeInputError(f"runs must be a non-empty tuple of RunSpec; got {runs!r}")
        names = [run.name for run in runs]
        if len(set(names)) != len(names):
            raise ScaeInputError(f"runs must have distinct names; got {', '.join(names)}")
        for run in runs:
            rules.check(f"runs[{run.name!r}].latent_dim", run.latent_dim, rules.WIDTH)
            rules.check(f"runs[{run.name!r}].loss", run.loss, rules.LOSS)
        problem = rules.network_too_large(max(run.latent_dim for run in runs), self.hidden)
        if problem is not None:
            raise ScaeInputError(f"hidden: {problem}")

    def to_dict(self) -> dict:
        """JSON-ready settings (without the ones that do not change results: progress, workers,
        device, resume)."""
        out = asdict(self)
        for key in ("progress", "tsne_workers", "device", "resume"):
            out.pop(key)
        out["hidden"] = list(self.hidden)
        return out


@dataclass
class RunResult:
    """A trained run: model, latent and reconstruction, errors and convergence."""

    spec: RunSpec
    model: Autoencoder
    latent: np.ndarray
    """Latent codes of every cell."""
    reconstruction: np.ndarray | None
    """Reconstruction of every cell, kept when cells × genes ≤ ``max_layer_entries``."""
    reconstruction_pca: np.ndarray
    """Every cell's reconstruction projected onto the input's principal axes."""
    sample_reconstruction: np.ndarray | None
    """Reconstructions of ``StudyResult.sample_rows`` when the full one is not kept."""
    errors: dict[str, dict[str, float]]
    convergence_epoch: int | None
    """First epoch with 95% of the total test-loss decrease made."""
    near_best_epoch: int
    """First epoch with a test loss within 1% of the lowest one."""
    resumed: bool = False
    """Whether the model was reused from an interrupted study (``--resume``)."""


@dataclass
class StudyResult:
    """Everything the study measured; :meth:`metrics` is the ``metrics.json`` content.

    Wall-clock times sit under keys named ``timings`` only, so two runs with the same input and
    seed give identical metrics once those keys are removed.
    """

    dataset: Dataset
    config: StudyConfig
    train_idx: np.ndarray
    test_idx: np.ndarray
    embed_idx: np.ndarray
    runs: dict[str, RunResult]
    pca_baselines: dict[str, dict[str, dict[str, float]]]
    representations: dict[str, dict]
    views: dict[str, np.ndarray]
    """obsm-style coordinates for the cells in ``embed_idx`` (PCA views also for all cells)."""
    explained_variance: dict[str, float]
    """Cumulative fraction of the input's variance in its top k PCs, for each latent size k."""
    timings: dict[str, float]
    sample_rows: np.ndarray | None = None
    """Cells whose reconstructions go to ``reconstructions.h5ad`` (when not kept for all)."""
    environment: dict = field(default_factory=dict)
    """Device and number of processes the models trained on."""
    skipped_runs: dict[str, str] = field(default_factory=dict)
    """Runs that could not train on this input, with the reason (count models without raw counts)."""
    denoising: dict | None = None
    """Recovery of hidden entries (see :mod:`scae.denoising`): ``{"n_cells", "n_hidden",
    "fraction", "scores": {method: {...}}}``, or ``None`` when not measured."""
    genes: dict | None = None
    """The gene selection (``--top-genes``): rule and number kept of how many, or ``None``."""

    def metrics(self) -> dict:
        """Every number of the study, JSON-ready."""
        runs = {}
        for name, run in self.runs.items():
            runs[name] = {
                "latent_dim": run.spec.latent_dim,
                "loss": run.spec.loss,
                "preset": run.spec.preset,
                "model_input": "raw counts" if run.spec.counts else "the input matrix",
                "best_epoch": run.model.best_epoch_,
                "model_params": _jsonable(run.model.get_params()),
                "history": run.model.history_,
                "errors": run.errors,
                "convergence_epoch": run.convergence_epoch,
                "epoch_within_1pct_of_best": run.near_best_epoch,
                "resumed": run.resumed,
                "timings": {
                    "fit_seconds": round(run.model.fit_seconds_, 3),
                    "train_seconds": round(run.model.train_seconds_, 3),
                    "train_cells_per_second": round(run.model.train_cells_per_second_, 1),
                },
            }
        return {
            "scae_version": __version__,
            "dataset": self.dataset.summary(),
            "config": self.config.to_dict(),
            "split": {
                "n_train": int(self.train_idx.size),
                "n_test": int(self.test_idx.size),
                "n_scored": int(self.embed_idx.size),
                "train_only_labels": train_only_labels(self.dataset.labels, self.config.test_fraction),
            },
            "environment": self.environment,
            "outputs": {
                "reconstructions": "results.h5ad layers (all cells)"
                if self.sample_rows is None
                else f"reconstructions.h5ad ({self.sample_rows.size} scored cells)",
            },
            "runs": runs,
            "skipped_runs": self.skipped_runs,
            "genes": self.genes,
            "pca_baselines": self.pca_baselines,
            "pca_explained_variance": self.explained_variance,
            "representations": self.representations,
            "denoising": self.denoising,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def to_anndata(self):
        """AnnData with labels in ``obs``, latents and coordinates in ``obsm``, reconstructions
        in ``layers``. Coordinates computed only on the scored sample are NaN elsewhere."""
        adata = self.dataset.to_anndata()
        adata.obs["split"] = pd.Categorical(
            np.where(np.isin(np.arange(adata.n_obs), self.test_idx), "test", "train")
        )
        adata.obs["scored"] = np.isin(np.arange(adata.n_obs), self.embed_idx)
        for name, run in self.runs.items():
            adata.obsm[f"X_{name}"] = run.latent
            if run.reconstruction is not None:
                adata.layers[f"{name}_reconstruction"] = run.reconstruction
        for key, coords in self.views.items():
            if coords.shape[0] == adata.n_obs:
                adata.obsm[key] = coords
                continue
            full = np.full((adata.n_obs, coords.shape[1]), np.nan, dtype=np.float32)
            full[self.embed_idx] = coords
            adata.obsm[key] = full
        adata.uns["scae"] = {
            "config": json.dumps(self.config.to_dict()),
            "version": __version__,
            "input": self.dataset.name,
            "model_input": self.dataset.summary()["model_input"],
        }
        return adata

    def sample_anndata(self):
        """AnnData of the cells in ``sample_rows``: the model input in ``X``, reconstructions in
        ``layers`` (``None`` when every reconstruction is kept in :meth:`to_anndata`)."""
        if self.sample_rows is None:
            return None
        import anndata as ad

        rows = self.sample_rows
        data = self.dataset
        source = data.X if data.on_disk else ArraySource(data.X, counts=data.counts)  # no densified copy
        X = source.matrix(rows)
        obs = pd.DataFrame(
            {
                "label": pd.Categorical(self.dataset.labels[rows]),
                "split": pd.Categorical(np.where(np.isin(rows, self.test_idx), "test", "train")),
            },
            index=pd.Index(self.dataset.obs_names[rows].astype(str)),
        )
        var = pd.DataFrame(index=pd.Index(self.dataset.var_names.astype(str)))
        adata = ad.AnnData(X=X, obs=obs, var=var)
        for name, run in self.runs.items():
            adata.layers[f"{name}_reconstruction"] = run.sample_reconstruction
        return adata


def _jsonable(params: dict) -> dict:
    """Estimator parameters for JSON; ``progress`` is left out (it does not change results)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items() if k != "progress"}


class Stopwatch:
    """Collects named stage durations."""

    def __init__(self, verbose: bool) -> None:
        self.timings: dict[str, float] = {}
        self.verbose = verbose

    @contextmanager
    def stage(self, name: str, message: str | None = None):
        raise_if_interrupted()
        if self.verbose and message and sys.stderr is not None:  # None: print would write to stdout
            print(f"scae: {message}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
