"""The autoencoder study: train the four runs, embed, score, and write every output.

Data flows one way: :func:`run_study` takes a :class:`~scae.data.Dataset`, computes a
:class:`StudyResult` and, given an output directory, writes figures, models, ``results.h5ad``,
``metrics.json`` and, last, ``report.html`` (:func:`write_study` writes them for a result
computed without one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from scae import __version__
from scae.data import Dataset, dense_if_small, stratified_split
from scae.embeddings import BackgroundTSNE, TSNEConfig, fit_pca, subsample_indices
from scae.errors import ScaeInputError
from scae.files import atomic_path, check_writable, write_bytes, write_text
from scae.metrics import (
    cluster_scores,
    convergence_epoch,
    epochs_to_near_best,
    linear_separability,
    pca_reconstruction_errors,
    reconstruction_errors,
)
from scae.models import Autoencoder
from scae.plots import Panel, loss_curves, png_bytes, scatter_panels


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


DEFAULT_RUNS = (
    RunSpec("ae10", 10, "mse", tsne_latent=True, tsne_reconstruction=True),
    RunSpec("ae50", 50, "mse"),
    RunSpec("ae2", 2, "mse"),
    RunSpec("ae10_nonzero", 10, "nonzero_mse", tsne_latent=True, tsne_reconstruction=True),
)


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
    kmeans_seeds: int = 5
    max_embed_cells: int = 20_000
    """Cluster scores, t-SNE and scatter plots use a seeded sample of at most this many cells."""
    tsne: TSNEConfig = field(default_factory=TSNEConfig)
    runs: tuple[RunSpec, ...] = DEFAULT_RUNS
    progress: bool = True
    tsne_workers: int = 1
    """Processes computing t-SNEs side by side (results do not depend on it). The command line
    uses every available core; from a Python script, more than 1 needs the script's top-level
    code under ``if __name__ == "__main__":`` (worker processes are spawned)."""

    def to_dict(self) -> dict:
        """JSON-ready settings (without ``progress`` and ``tsne_workers``, which do not change results)."""
        out = asdict(self)
        out.pop("progress")
        out.pop("tsne_workers")
        out["hidden"] = list(self.hidden)
        return out


@dataclass
class RunResult:
    """A trained run: model, all-cell latent and reconstruction, errors and convergence."""

    spec: RunSpec
    model: Autoencoder
    latent: np.ndarray
    reconstruction: np.ndarray
    errors: dict[str, dict[str, float]]
    convergence_epoch: int | None
    """First epoch with 95% of the total test-loss decrease made."""
    near_best_epoch: int
    """First epoch with a test loss within 1% of the lowest one."""


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

    def metrics(self) -> dict:
        """Every number of the study, JSON-ready."""
        runs = {}
        for name, run in self.runs.items():
            runs[name] = {
                "latent_dim": run.spec.latent_dim,
                "loss": run.spec.loss,
                "model_params": _jsonable(run.model.get_params()),
                "history": run.model.history_,
                "errors": run.errors,
                "convergence_epoch": run.convergence_epoch,
                "epoch_within_1pct_of_best": run.near_best_epoch,
                "timings": {"fit_seconds": round(run.model.fit_seconds_, 3)},
            }
        return {
            "scae_version": __version__,
            "dataset": self.dataset.summary(),
            "config": self.config.to_dict(),
            "split": {
                "n_train": int(self.train_idx.size),
                "n_test": int(self.test_idx.size),
                "n_scored": int(self.embed_idx.size),
            },
            "runs": runs,
            "pca_baselines": self.pca_baselines,
            "pca_explained_variance": self.explained_variance,
            "representations": self.representations,
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
            adata.layers[f"{name}_reconstruction"] = run.reconstruction
        for key, coords in self.views.items():
            full = np.full((adata.n_obs, coords.shape[1]), np.nan, dtype=np.float32)
            full[self.embed_idx if coords.shape[0] == self.embed_idx.size else slice(None)] = coords
            adata.obsm[key] = full
        adata.uns["scae"] = {
            "config": json.dumps(self.config.to_dict()),
            "version": __version__,
        }
        return adata


def _jsonable(params: dict) -> dict:
    """Estimator parameters for JSON; ``progress`` is left out (it does not change results)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items() if k != "progress"}


class _Stopwatch:
    """Collects named stage durations."""

    def __init__(self, verbose: bool) -> None:
        self.timings: dict[str, float] = {}
        self.verbose = verbose

    @contextmanager
    def stage(self, name: str, message: str | None = None):
        if self.verbose and message:
            print(f"scae: {message}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_study(
    dataset: Dataset,
    out_dir: str | Path | None = None,
    config: StudyConfig | None = None,
    data_seconds: float | None = None,
) -> StudyResult:
    """Run the full autoencoder study on ``dataset``; write all outputs to ``out_dir`` if given.

    Parameters
    ----------
    dataset
        Validated input (see :mod:`scae.data` readers and :func:`scae.simulate_dataset`).
    out_dir
        Output directory; checked for writability before any training starts.
    config
        Study settings; defaults to :class:`StudyConfig`.
    data_seconds
        Time spent loading ``dataset``, recorded as the ``data`` stage in the timings.
    """
    config = config or StudyConfig()
    _check_config(config, dataset)
    if out_dir is not None:
        out_dir = prepare_output_dir(out_dir)
    watch = _Stopwatch(config.progress)
    if data_seconds is not None:
        watch.timings["data"] = data_seconds
    X, labels, seed = dense_if_small(dataset.X), dataset.labels, config.seed

    with watch.stage("split"):
        train_idx, test_idx = stratified_split(labels, config.test_fraction, seed)
        X_train, X_test = X[train_idx], X[test_idx]
        embed_idx = subsample_indices(dataset.n_cells, config.max_embed_cells, seed)

    runs: dict[str, RunResult] = {}
    for spec in config.runs:
        with watch.stage(f"train_{spec.name}", f"training {spec.name} (latent {spec.latent_dim}, {spec.loss})"):
            model = Autoencoder(
                latent_dim=spec.latent_dim,
                hidden=tuple(config.hidden),
                activation=config.activation,
                loss=spec.loss,
                epochs=config.epochs,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                random_state=seed,
                progress=config.progress,
            ).fit(X_train, eval_X=X_test, description=spec.name)
        with watch.stage(f"predict_{spec.name}"):
            latent, reconstruction = model.transform_and_reconstruct(X)
            errors = {
                "train": reconstruction_errors(X_train, reconstruction[train_idx]),
                "test": reconstruction_errors(X_test, reconstruction[test_idx]),
            }
        runs[spec.name] = RunResult(
            spec=spec,
            model=model,
            latent=latent,
            reconstruction=reconstruction,
            errors=errors,
            convergence_epoch=convergence_epoch([row["test_loss"] for row in model.history_]),
            near_best_epoch=epochs_to_near_best([row["test_loss"] for row in model.history_]),
        )

    with watch.stage("pca", "PCA of original, reconstructions and latents"):
        pca = fit_pca(X, 50, seed)
        views: dict[str, np.ndarray] = {"X_pca": pca.transform(X).astype(np.float32)}
        for name, run in runs.items():
            views[f"X_{name}_reconstruction_pca"] = pca.transform(run.reconstruction).astype(np.float32)
            if run.spec.latent_dim > 2:
                views[f"X_{name}_pca"] = (
                    fit_pca(run.latent, 50, seed).transform(run.latent).astype(np.float32)
                )
        dims = sorted({spec.latent_dim for spec in config.runs})
        cumulative = np.cumsum(pca.explained_variance_ratio_)
        explained = {str(k): float(cumulative[k - 1]) for k in dims if k <= cumulative.size}
        pca_baselines = pca_reconstruction_errors(fit_pca(X_train, max(dims), seed), X_train, X_test, dims)

    # t-SNE runs in worker processes while this process computes the cluster scores
    # (single-threaded, so the two do not fight over the cores).
    tsne_inputs = {key: matrix[embed_idx] for key, matrix in _tsne_inputs(views["X_pca"], runs)}
    # Stage timings stay disjoint: "scores" runs while t-SNE is under way, "tsne_wait" is the rest.
    with watch.stage("tsne_start", f"t-SNE of {len(tsne_inputs)} representations ({embed_idx.size} cells), in the background"):
        tsne_jobs = BackgroundTSNE(tsne_inputs, seed, config.tsne, config.tsne_workers, config.progress)
    with tsne_jobs:
        with threadpool_limits(1):
            representations = _score_representations(
                dataset, X, runs, views, train_idx, test_idx, embed_idx, config, watch
            )
        with watch.stage("tsne_wait", "waiting for t-SNE"):
            views.update(tsne_jobs.results())
    # Each embedding's own time in its worker; these overlap "scores" and "tsne_wait".
    watch.timings.update({f"tsne_worker_{key}": value for key, value in tsne_jobs.seconds.items()})

    result = StudyResult(
        dataset=dataset,
        config=config,
        train_idx=train_idx,
        test_idx=test_idx,
        embed_idx=embed_idx,
        runs=runs,
        pca_baselines=pca_baselines,
        representations=representations,
        views=views,
        explained_variance=explained,
        timings=watch.timings,
    )
    if out_dir is not None:
        _write_outputs(result, out_dir, watch)  # out_dir was prepared before training
    return result


def _tsne_inputs(X_pca: np.ndarray, runs: dict[str, RunResult]):
    """(obsm key, matrix) of every representation that gets a t-SNE (the input via its 50 PCs)."""
    yield "X_tsne", X_pca
    for name, run in runs.items():
        if run.spec.tsne_reconstruction:
            yield f"X_{name}_reconstruction_tsne", run.reconstruction
    for name, run in runs.items():
        if run.spec.tsne_latent:
            yield f"X_{name}_tsne", run.latent


def _score_representations(dataset, X, runs, views, train_idx, test_idx, embed_idx, config, watch) -> dict:
    """Cluster scores for every representation; linear separability for the small ones."""
    candidates: list[tuple[str, str, object]] = [
        ("original", f"input matrix ({dataset.n_genes} genes)", X),
    ]
    for k in (2, 10, 50):
        if views["X_pca"].shape[1] >= k:
            candidates.append((f"original_pca{k}", f"top {k} PCs of the input", views["X_pca"][:, :k]))
    for name, run in runs.items():
        candidates.append((f"{name}_reconstruction", f"{name} reconstruction", run.reconstruction))
        candidates.append((f"{name}_latent", f"{name} latent ({run.spec.latent_dim}-D)", run.latent))

    labels = dataset.labels
    rng_train = subsample_indices(train_idx.size, config.max_embed_cells, config.seed)
    rng_test = subsample_indices(test_idx.size, config.max_embed_cells, config.seed + 1)
    fit_cells, eval_cells = train_idx[rng_train], test_idx[rng_test]
    scores = {}
    with watch.stage("scores", f"cluster scores of {len(candidates)} representations"):
        for key, description, matrix in candidates:
            row = {"description": description, "dims": int(matrix.shape[1])}
            row.update(cluster_scores(matrix[embed_idx], labels[embed_idx], config.kmeans_seeds, config.seed))
            if matrix.shape[1] <= 50:
                row["linear_accuracy"] = linear_separability(
                    matrix[fit_cells], labels[fit_cells], matrix[eval_cells], labels[eval_cells], config.seed
                )
            scores[key] = row
    return scores


def _check_config(config: StudyConfig, dataset: Dataset) -> None:
    """Reject settings that cannot work, before any training."""
    n_labels = len(dataset.classes)
    least = max(50, 10 * n_labels)
    if config.max_embed_cells < least:
        raise ScaeInputError(
            f"max_embed_cells {config.max_embed_cells} is too small for {n_labels} labels; "
            f"expected at least {least} (50, and 10 per label)"
        )
    if config.epochs < 1 or config.batch_size < 1 or config.tsne_workers < 1:
        raise ScaeInputError("epochs, batch size and t-SNE workers must be at least 1")


def prepare_output_dir(out_dir: str | Path, remove_stale: bool = True) -> Path:
    """Create ``out_dir`` and check it is writable; remove a previous run's report and metrics.

    Removing ``report.html`` and ``metrics.json`` first means that, if this run is
    interrupted, no complete-looking report from an earlier run is left beside new files.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "figures").mkdir(exist_ok=True)
        (out_dir / "models").mkdir(exist_ok=True)
        check_writable(out_dir)
        for name in ("report.html", "metrics.json") if remove_stale else ():
            (out_dir / name).unlink(missing_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ScaeInputError(
            f"{out_dir}: cannot write the output directory ({reason}); expected a writable directory"
        ) from None
    return out_dir


def make_figures(result: StudyResult) -> dict[str, object]:
    """All figures of the study by file stem (matplotlib Figures)."""
    from scae.report import figure_plan  # the report decides what each question shows

    figures = {}
    labels = result.dataset.labels[result.embed_idx]
    for stem, spec in figure_plan(result).items():
        if spec["kind"] == "loss":
            figures[stem] = loss_curves(spec["histories"], spec["keys"], spec["title"])
        else:
            panels = [Panel(t, _embed_rows(result, key)[:, :2], *axes) for t, key, axes in spec["panels"]]
            figures[stem] = scatter_panels(panels, labels, spec["title"])
    return figures


def _embed_rows(result: StudyResult, key: str) -> np.ndarray:
    """Coordinates ``key`` (a view, or ``X_<run>`` for a latent) of the scored cells."""
    latents = {f"X_{name}": run.latent for name, run in result.runs.items()}
    coords = result.views[key] if key in result.views else latents[key]
    return coords if coords.shape[0] == result.embed_idx.size else coords[result.embed_idx]


def write_study(result: StudyResult, out_dir: str | Path) -> None:
    """Write figures, models, ``results.h5ad``, ``metrics.json`` and finally ``report.html``.

    For a result computed without an output directory; :func:`run_study` given one writes
    the same files itself.
    """
    watch = _Stopwatch(False)
    watch.timings = result.timings  # writing stages are added to the study's own timings
    _write_outputs(result, prepare_output_dir(out_dir), watch)


def _write_outputs(result: StudyResult, out_dir: Path, watch: _Stopwatch) -> None:
    """Write every output into a prepared ``out_dir``; ``report.html`` comes last."""
    from scae.report import build_report

    with watch.stage("figures", "drawing figures"):
        images = {stem: png_bytes(fig) for stem, fig in make_figures(result).items()}
        for stem, data in images.items():
            write_bytes(out_dir / "figures" / f"{stem}.png", data)
    with watch.stage("write_models_h5ad", "writing models and results.h5ad"):
        for name, run in result.runs.items():
            run.model.save(out_dir / "models" / f"{name}.pt")
        with atomic_path(out_dir / "results.h5ad") as tmp:
            result.to_anndata().write_h5ad(tmp)
    with watch.stage("report"):
        metrics = result.metrics()
        html = build_report(result, metrics, images)
    metrics["timings"] = {k: round(v, 3) for k, v in watch.timings.items()}
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_text(out_dir / "report.html", html)
