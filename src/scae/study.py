"""The autoencoder study: train the four runs, embed, score, and write every output.

Data flows one way: :func:`run_study` takes a :class:`~scae.data.Dataset`, computes a
:class:`StudyResult` and, given an output directory, writes figures, models, ``results.h5ad``,
``metrics.json`` and, last, ``report.html`` (:func:`write_study` writes them for a result
computed without one).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from scae import __version__
from scae.data import Dataset, stratified_split
from scae.embeddings import BackgroundTSNE, TSNEConfig, fit_pca, subsample_indices
from scae.errors import ScaeInputError
from scae.files import atomic_path, check_writable, write_bytes, write_text
from scae.metrics import cluster_scores, convergence_epoch, epochs_to_near_best, linear_separability
from scae.models import Autoencoder
from scae.parallel import Distributed, broadcast_from_main, resolve_device
from scae.plots import Panel, loss_curves, png_bytes, scatter_panels
from scae.sources import EVAL_BATCH_SIZE, ArraySource, RowSource

INPUT_PCS = 50
"""Principal components of the input: coordinates for plots, and the space in which the input
and every reconstruction (projected onto these axes) are scored and embedded by t-SNE."""


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
    max_layer_entries: int = 25_000_000
    """Reconstructions of every cell go to ``results.h5ad`` layers while cells × genes is at most
    this (100 MB of float32 per run); above it, ``reconstructions.h5ad`` holds them for the first
    ``sample_layer_entries // genes`` cells of the scored sample."""
    sample_layer_entries: int = 5_000_000
    """Size of each reconstruction in ``reconstructions.h5ad`` (20 MB of float32 per run)."""
    progress: bool = True
    tsne_workers: int = 1
    """Processes computing t-SNEs side by side (results do not depend on it). The command line
    uses every available core; from a Python script, more than 1 needs the script's top-level
    code under ``if __name__ == "__main__":`` (worker processes are spawned)."""
    device: str = "auto"
    """Where models train and predict: ``auto``, ``cpu``, ``cuda`` or ``mps``."""
    resume: bool = False
    """Reuse models in ``out_dir/models`` trained by an interrupted study on the same input
    with the same settings (others are refused)."""

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
            },
            "environment": self.environment,
            "outputs": {
                "reconstructions": "results.h5ad layers (all cells)"
                if self.sample_rows is None
                else f"reconstructions.h5ad ({self.sample_rows.size} scored cells)",
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
    distributed: Distributed | None = None,
) -> StudyResult | None:
    """Run the full autoencoder study on ``dataset``; write all outputs to ``out_dir`` if given.

    Parameters
    ----------
    dataset
        Validated input (see :mod:`scae.data` readers and :func:`scae.simulate_dataset`); its
        matrix may be in memory or stream from disk.
    out_dir
        Output directory; checked for writability before any training starts.
    config
        Study settings; defaults to :class:`StudyConfig`.
    data_seconds
        Time spent loading ``dataset``, recorded as the ``data`` stage in the timings.
    distributed
        Under ``torchrun``: every process trains the models together
        (``DistributedDataParallel``); the main process (rank 0) alone computes everything else
        and writes the outputs. The other processes return ``None``.
    """
    config = config or StudyConfig()
    _check_config(config, dataset)
    main = distributed is None or distributed.is_main
    if out_dir is not None and main:
        out_dir = prepare_output_dir(out_dir)
    watch = _Stopwatch(config.progress and main)
    if data_seconds is not None:
        watch.timings["data"] = data_seconds
    labels, seed = dataset.labels, config.seed
    source = dataset.source()

    with watch.stage("split"):
        train_idx, test_idx = stratified_split(labels, config.test_fraction, seed)
        embed_idx = subsample_indices(dataset.n_cells, config.max_embed_cells, seed)

    models = _train_runs(dataset, source, train_idx, test_idx, config, out_dir, distributed, watch)
    if not main:
        return None

    with watch.stage("pca", "PCA of the input (scored sample) and its streamed projection"):
        X_embed = source.matrix(embed_idx)
        pca = fit_pca(X_embed, INPUT_PCS, seed)
        dims = sorted({spec.latent_dim for spec in config.runs})
        train_in_embed = np.flatnonzero(np.isin(embed_idx, train_idx))
        baseline_pca = fit_pca(X_embed[train_in_embed], max(dims), seed)
        is_test = np.zeros(dataset.n_cells, dtype=bool)
        is_test[test_idx] = True
        X_pca, pca_baselines = _input_pass(source, pca, baseline_pca, dims, is_test)
        views: dict[str, np.ndarray] = {"X_pca": X_pca}
        cumulative = np.cumsum(pca.explained_variance_ratio_)
        explained = {str(k): float(cumulative[k - 1]) for k in dims if k <= cumulative.size}
        del X_embed

    keep_all = dataset.n_cells * dataset.n_genes <= config.max_layer_entries
    sample_rows = None
    if not keep_all:  # a seeded sample of the scored cells, in file order
        size = min(embed_idx.size, max(1, config.sample_layer_entries // dataset.n_genes))
        sample_rows = np.sort(np.random.default_rng(seed).choice(embed_idx, size, replace=False))
    runs: dict[str, RunResult] = {}
    for spec in config.runs:
        model, resumed = models[spec.name]
        with watch.stage(f"predict_{spec.name}"):
            latent, recon, recon_pca, sample, errors = _predict_pass(model, source, is_test, pca, keep_all, sample_rows)
        runs[spec.name] = RunResult(
            spec=spec,
            model=model,
            latent=latent,
            reconstruction=recon,
            reconstruction_pca=recon_pca,
            sample_reconstruction=sample,
            errors=errors,
            convergence_epoch=convergence_epoch([row["test_loss"] for row in model.history_]),
            near_best_epoch=epochs_to_near_best([row["test_loss"] for row in model.history_]),
            resumed=resumed,
        )

    with watch.stage("pca"):
        for name, run in runs.items():
            views[f"X_{name}_reconstruction_pca"] = run.reconstruction_pca
            if run.spec.latent_dim > 2:
                views[f"X_{name}_pca"] = fit_pca(run.latent, 50, seed).transform(run.latent).astype(np.float32)

    # t-SNE runs in worker processes while this process computes the cluster scores
    # (single-threaded, so the two do not fight over the cores).
    tsne_inputs = {key: matrix[embed_idx] for key, matrix in _tsne_inputs(X_pca, runs)}
    # Stage timings stay disjoint: "scores" runs while t-SNE is under way, "tsne_wait" is the rest.
    with watch.stage("tsne_start", f"t-SNE of {len(tsne_inputs)} representations ({embed_idx.size} cells), in the background"):
        tsne_jobs = BackgroundTSNE(tsne_inputs, seed, config.tsne, config.tsne_workers, config.progress)
    with tsne_jobs:
        with threadpool_limits(1):
            representations = _score_representations(dataset, runs, views, train_idx, test_idx, embed_idx, config, watch)
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
        sample_rows=sample_rows,
        environment={
            "device": resolve_device(config.device).type,
            "processes": 1 if distributed is None else distributed.world_size,
        },
    )
    if out_dir is not None:
        _write_outputs(result, out_dir, watch, models_saved=True)  # out_dir prepared, models saved as trained
    return result


def _train_runs(dataset, source, train_idx, test_idx, config, out_dir, distributed, watch) -> dict:
    """Train (or, with ``config.resume``, reuse) every run's model; ``{name: (model, resumed)}``.

    Each model is saved to ``out_dir/models`` as soon as it is trained, tagged with a key of the
    input and settings, so an interrupted study can resume from it.
    """
    main = distributed is None or distributed.is_main
    train, test = source.subset(train_idx), source.subset(test_idx)
    reusable, problem = {}, None
    if main:
        try:
            reusable = _reusable_models(dataset, config, out_dir)
        except ScaeInputError as err:
            problem = str(err)
    # every process learns which models to skip, or the reason to stop (no process left waiting)
    names, problem = broadcast_from_main((sorted(reusable), problem), distributed)
    if problem is not None:
        raise ScaeInputError(problem)
    models: dict[str, tuple[Autoencoder, bool]] = {}
    for spec in config.runs:
        if spec.name in names:
            if main:
                reusable[spec.name].net_.to(resolve_device(config.device))
                models[spec.name] = (reusable[spec.name], True)
                if config.progress:
                    print(f"scae: reusing {spec.name} from {out_dir}/models (--resume)", file=sys.stderr, flush=True)
            continue
        with watch.stage(f"train_{spec.name}", f"training {spec.name} (latent {spec.latent_dim}, {spec.loss})"):
            model = Autoencoder(
                latent_dim=spec.latent_dim,
                hidden=tuple(config.hidden),
                activation=config.activation,
                loss=spec.loss,
                epochs=config.epochs,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                random_state=config.seed,
                device=config.device,
                progress=config.progress and main,
            ).fit(train, eval_X=test, description=spec.name, distributed=distributed)
        if main:
            if out_dir is not None:
                _save_model(model, dataset, config, spec, Path(out_dir))
            models[spec.name] = (model, False)
    return models


TRAINING_SETTINGS = ("epochs", "seed", "hidden", "activation", "batch_size", "learning_rate", "test_fraction")
"""The study settings a trained model depends on (the others only change scoring and outputs)."""


def _save_model(model: Autoencoder, dataset: Dataset, config: StudyConfig, spec: RunSpec, out_dir: Path) -> None:
    """Write ``out_dir/models/<run>.pt``, tagged with the key ``--resume`` checks."""
    model.save(out_dir / "models" / f"{spec.name}.pt", metadata={"study_key": _study_key(dataset, config, spec)})


def _study_key(dataset: Dataset, config: StudyConfig, spec: RunSpec) -> str:
    """Fingerprint of the input, the training settings and one run: equal keys, same model."""
    settings = {key: value for key, value in config.to_dict().items() if key in TRAINING_SETTINGS}
    settings["run"] = {"latent_dim": spec.latent_dim, "loss": spec.loss}
    blob = json.dumps({"input": dataset.fingerprint(), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _reusable_models(dataset: Dataset, config: StudyConfig, out_dir) -> dict[str, Autoencoder]:
    """With ``config.resume``, the finished models in ``out_dir/models`` that match this study.

    A model file from another input or other settings is refused with one clear error.
    """
    if not config.resume or out_dir is None:
        return {}
    found = {}
    for spec in config.runs:
        path = Path(out_dir) / "models" / f"{spec.name}.pt"
        if not path.exists():
            continue
        try:
            model = Autoencoder.load(path)
        except Exception as err:  # a damaged file: say so rather than train over it silently
            raise ScaeInputError(f"{path}: cannot be reused by --resume ({err}); remove it to retrain") from None
        if model.metadata_.get("study_key") != _study_key(dataset, config, spec):
            raise ScaeInputError(
                f"{path}: was trained on another input or with other settings, so --resume cannot reuse it; "
                "remove it (or the models folder), or drop --resume to retrain"
            )
        found[spec.name] = model
    return found


class _SplitErrors:
    """Exact MSE and nonzero MSE of the training and the test cells, accumulated batch by batch.

    Squared differences are formed in float32 and summed per cell in float64; with
    ``mask = (x != 0)``, a cell's nonzero error is ``sum(mask · (x − x̂)²)``, which equals
    ``sum(mask · (x − x̂ · mask)²)``.
    """

    def __init__(self, is_test: np.ndarray) -> None:
        self.is_test = is_test
        self.sums = np.zeros((2, 4))  # rows: train, test; columns: error, count, nonzero error, nonzero count

    def add(self, start: int, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        squared = (x - x_hat).square_()
        mask = x != 0
        per_cell = torch.stack([
            squared.sum(dim=1, dtype=torch.float64),
            torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64),
            squared.mul_(mask).sum(dim=1, dtype=torch.float64),
            mask.sum(dim=1, dtype=torch.float64),
        ], dim=1).numpy()
        test = self.is_test[start : start + x.shape[0]]
        self.sums[0] += per_cell[~test].sum(axis=0)
        self.sums[1] += per_cell[test].sum(axis=0)

    def result(self) -> dict[str, dict[str, float]]:
        def ratio(err: float, count: float) -> float:
            return float(err / count) if count else 0.0

        return {
            part: {"mse": ratio(row[0], row[1]), "nonzero_mse": ratio(row[2], row[3])}
            for part, row in zip(("train", "test"), self.sums)
        }


def _projector(pca):
    """``x ↦ (x − mean) · componentsᵀ`` of a fitted PCA, on float32 tensors."""
    mean = torch.from_numpy(np.asarray(pca.mean_, dtype=np.float32))
    components_t = torch.from_numpy(np.ascontiguousarray(pca.components_.T, dtype=np.float32))
    return lambda x: (x - mean) @ components_t


@torch.inference_mode()
def _input_pass(source: RowSource, pca, baseline_pca, dims: list[int], is_test: np.ndarray):
    """One streamed pass over the input: its PCA coordinates, and the errors of the PCA baselines.

    The baselines are ``baseline_pca`` (fitted on training cells) truncated to each latent size
    ``k``: a linear reconstruction of the same size as the autoencoders'.
    """
    X_pca = np.empty((source.n_rows, pca.n_components_), dtype=np.float32)
    project, baseline_coords = _projector(pca), _projector(baseline_pca)
    mean = torch.from_numpy(np.asarray(baseline_pca.mean_, dtype=np.float32))
    components = torch.from_numpy(np.asarray(baseline_pca.components_, dtype=np.float32))
    ks = [k for k in dims if k <= baseline_pca.n_components_]
    totals = {k: _SplitErrors(is_test) for k in ks}
    for start in range(0, source.n_rows, EVAL_BATCH_SIZE):
        x = source.tensor(slice(start, min(start + EVAL_BATCH_SIZE, source.n_rows)))
        X_pca[start : start + x.shape[0]] = project(x).numpy()
        coords = baseline_coords(x)
        for k in ks:
            totals[k].add(start, x, torch.addmm(mean, coords[:, :k], components[:k]))
    return X_pca, {f"pca{k}": totals[k].result() for k in ks}


@torch.inference_mode()
def _predict_pass(model: Autoencoder, source: RowSource, is_test: np.ndarray, pca, keep_all: bool, sample_rows):
    """One streamed pass of a trained model over every cell.

    Returns the latent codes, the reconstruction (every cell when ``keep_all``, else ``None``),
    the reconstruction on the input's principal axes, the reconstructions of ``sample_rows``
    (when not ``keep_all``), and the exact MSE / nonzero MSE of the training and test cells.
    """
    net, device = model.net_, model.device_
    net.eval()
    n, g = source.n_rows, source.n_cols
    latent = np.empty((n, int(model.latent_dim)), dtype=np.float32)
    recon = np.empty((n, g), dtype=np.float32) if keep_all else None
    recon_pca = np.empty((n, pca.n_components_), dtype=np.float32)
    sample = None if sample_rows is None else np.empty((sample_rows.size, g), dtype=np.float32)
    project, errors = _projector(pca), _SplitErrors(is_test)
    for start in range(0, n, EVAL_BATCH_SIZE):
        stop = min(start + EVAL_BATCH_SIZE, n)
        x = source.tensor(slice(start, stop))
        z, x_hat = net(x.to(device, non_blocking=True))
        x_hat = x_hat.float().cpu()  # needed on the host: outputs and the PCA projection
        latent[start:stop] = z.float().cpu().numpy()
        recon_pca[start:stop] = project(x_hat).numpy()
        if recon is not None:
            recon[start:stop] = x_hat.numpy()
        if sample is not None:
            a, b = np.searchsorted(sample_rows, [start, stop])
            sample[a:b] = x_hat.numpy()[sample_rows[a:b] - start]
        errors.add(start, x, x_hat)  # last: it overwrites a scratch copy, not x_hat
    return latent, recon, recon_pca, sample, errors.result()


def _tsne_inputs(X_pca: np.ndarray, runs: dict[str, RunResult]):
    """(obsm key, matrix) of every representation that gets a t-SNE.

    The input and the reconstructions enter through their coordinates on the input's top
    principal axes, the latents as they are.
    """
    yield "X_tsne", X_pca
    for name, run in runs.items():
        if run.spec.tsne_reconstruction:
            yield f"X_{name}_reconstruction_tsne", run.reconstruction_pca
    for name, run in runs.items():
        if run.spec.tsne_latent:
            yield f"X_{name}_tsne", run.latent


def _score_representations(dataset, runs, views, train_idx, test_idx, embed_idx, config, watch) -> dict:
    """Cluster scores for every representation; linear separability for those up to 50-D.

    High-dimensional representations (the input and the reconstructions) are scored on their
    coordinates on the input's top principal axes (``scored_on`` says so).
    """
    X_pca = views["X_pca"]
    on_pcs = f"its coordinates on the input's top {X_pca.shape[1]} PCs"
    candidates: list[tuple[str, str, int, np.ndarray, str | None]] = [
        ("original", f"input matrix ({dataset.n_genes} genes)", dataset.n_genes, X_pca, on_pcs),
    ]
    for k in (2, 10, 50):
        if X_pca.shape[1] >= k:
            candidates.append((f"original_pca{k}", f"top {k} PCs of the input", k, X_pca[:, :k], None))
    for name, run in runs.items():
        candidates.append((f"{name}_reconstruction", f"{name} reconstruction", dataset.n_genes, run.reconstruction_pca, on_pcs))
        candidates.append((f"{name}_latent", f"{name} latent ({run.spec.latent_dim}-D)", run.spec.latent_dim, run.latent, None))

    labels = dataset.labels
    rng_train = subsample_indices(train_idx.size, config.max_embed_cells, config.seed)
    rng_test = subsample_indices(test_idx.size, config.max_embed_cells, config.seed + 1)
    fit_cells, eval_cells = train_idx[rng_train], test_idx[rng_test]
    scores = {}
    with watch.stage("scores", f"cluster scores of {len(candidates)} representations"):
        for key, description, dims, matrix, scored_on in candidates:
            row = {"description": description, "dims": int(dims)}
            if scored_on is not None and matrix.shape[1] < dims:
                row["scored_on"] = scored_on
            if key == f"original_pca{X_pca.shape[1]}":  # the same matrix as "original", scored above
                row.update({k: v for k, v in scores["original"].items() if k not in row and k != "scored_on"})
            else:
                row.update(cluster_scores(matrix[embed_idx], labels[embed_idx], config.kmeans_seeds, config.seed))
            if dims <= 50:
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


def _write_outputs(result: StudyResult, out_dir: Path, watch: _Stopwatch, models_saved: bool = False) -> None:
    """Write every output into a prepared ``out_dir``; ``report.html`` comes last.

    ``models_saved``: the models are in ``out_dir/models`` already (:func:`run_study` saves
    each one as soon as it is trained, or reused it from there).
    """
    from scae.report import build_report

    with watch.stage("figures", "drawing figures"):
        images = {stem: png_bytes(fig) for stem, fig in make_figures(result).items()}
        for stem, data in images.items():
            write_bytes(out_dir / "figures" / f"{stem}.png", data)
    with watch.stage("write_models_h5ad", "writing models and results.h5ad"):
        for run in result.runs.values() if not models_saved else ():
            _save_model(run.model, result.dataset, result.config, run.spec, out_dir)
        with atomic_path(out_dir / "results.h5ad") as tmp:
            result.to_anndata().write_h5ad(tmp)
        sample = result.sample_anndata()
        if sample is not None:
            with atomic_path(out_dir / "reconstructions.h5ad") as tmp:
                sample.write_h5ad(tmp)
        else:
            (out_dir / "reconstructions.h5ad").unlink(missing_ok=True)  # a stale one from a larger input
    with watch.stage("report"):
        metrics = result.metrics()
        html = build_report(result, metrics, images)
    metrics["timings"] = {k: round(v, 3) for k, v in watch.timings.items()}
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_text(out_dir / "report.html", html)
