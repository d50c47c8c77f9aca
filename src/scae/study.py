"""The autoencoder study: train the four runs, embed, score, and write every output.

Data flows one way: :func:`run_study` takes a :class:`~scae.data.Dataset`, computes a
:class:`StudyResult` and, given an output directory, writes figures, models, ``results.h5ad``,
``metrics.json`` and, last, ``report.html`` (:func:`write_study` writes them for a result
computed without one).
"""

from __future__ import annotations

import functools
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from scae.background import available_cores, background_workers  # noqa: F401 (background_workers re-exported)
from scae.data import Dataset, stratified_split
from scae.embeddings import TSNE_WORKERS_FROM_CELLS, BackgroundTSNE, fit_pca, subsample_indices
from scae.errors import ScaeInputError
from scae.files import OutputDir, path_text
from scae.metrics import convergence_epoch, epochs_to_near_best, representation_scores
from scae.models import Autoencoder
from scae.outputs import import_writers, save_model, study_key, write_outputs, write_study  # noqa: F401 (write_study re-exported)
from scae.parallel import Distributed, broadcast_from_main, resolve_device
from scae.results import (  # noqa: F401 (re-exported)
    DEFAULT_RUNS,
    RunResult,
    RunSpec,
    Stopwatch,
    StudyConfig,
    StudyResult,
)
from scae.sources import ArraySource, RowSource, eval_batch_rows, library_sizes

INPUT_PCS = 50
"""Principal components of the input: coordinates for plots, and the space in which the input
and every reconstruction (projected onto these axes) are scored and embedded by t-SNE."""


def run_study(
    dataset: Dataset,
    out_dir: str | Path | None = None,
    config: StudyConfig | None = None,
    data_seconds: float | None = None,
    distributed: Distributed | None = None,
    jobs: BackgroundTSNE | None = None,
) -> StudyResult | None:
    """Run the full autoencoder study on ``dataset``; write all outputs to ``out_dir`` if given.

    Parameters
    ----------
    dataset
        Validated input (see :mod:`scae.data` readers and :func:`scae.simulate_dataset`); its
        matrix may be in memory or stream from disk.
    out_dir
        Output directory, written all-or-nothing (:class:`~scae.files.OutputDir`): locked
        against a second study, outputs staged and moved into place only when all succeeded.
    config
        Study settings; defaults to :class:`StudyConfig`.
    data_seconds
        Time spent loading ``dataset``, recorded as the ``data`` stage in the timings.
    distributed
        Under ``torchrun``: every process trains the models together
        (``DistributedDataParallel``); the main process (rank 0) alone computes everything else
        and writes the outputs. The other processes return ``None``.
    jobs
        Background workers started by the caller, with the study's seed and t-SNE settings
        (the command line starts them before its heavy imports, so that the workers' imports
        overlap its own); the caller stops them. By default the study starts
        ``config.tsne_workers`` of them itself (none below 2,000 scored cells).
    """
    config = config or StudyConfig()
    _check_config(config, dataset)
    if jobs is not None and (jobs.seed, jobs.config) != (config.seed, config.tsne):
        raise ValueError(f"jobs: background t-SNEs with seed {jobs.seed} and {jobs.config}; the study has seed "
                         f"{config.seed} and {config.tsne}")
    main = distributed is None or distributed.is_main
    output = OutputDir(out_dir).open(keep_models=config.resume) if out_dir is not None and main else None
    with output if output is not None else nullcontext():  # on any failure: staged outputs removed, models kept
        result = _run(dataset, output, config, data_seconds, distributed, jobs)
        if output is not None:
            output.commit()
    return result


def _run(dataset, output, config, data_seconds, distributed, jobs) -> StudyResult | None:
    """:func:`run_study` with the output folder opened (or ``None``).

    The main process computes the input's PCA first and hands each t-SNE and each
    representation's cluster scores to the background workers as soon as its matrix exists:
    the input's at once, each run's right after that run is trained (runs with t-SNEs train
    first). On the CPU, training leaves the workers their cores. The denoising measure runs
    while the last jobs finish.
    """
    main = distributed is None or distributed.is_main
    watch = Stopwatch(config.progress and main)
    if data_seconds is not None:
        watch.timings["data"] = data_seconds
    labels, seed = dataset.labels, config.seed

    with watch.stage("split"):
        train_idx, test_idx = stratified_split(labels, config.test_fraction, seed)
        embed_idx = subsample_indices(dataset.n_cells, config.max_embed_cells, seed)
    all_genes = dataset
    dataset, genes = _select_genes(dataset, config, train_idx, watch)
    source = dataset.source()
    runs_to_train, skipped = _trainable_runs(dataset, config)
    reusable = _resumable(dataset, config, output, distributed)
    if not main:
        _train_runs(dataset, runs_to_train, train_idx, test_idx, config, None, distributed, watch, reusable)
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

    n_tsne = 1 + sum(spec.tsne_latent + spec.tsne_reconstruction for spec in runs_to_train)
    with ExitStack() as stack:
        with watch.stage("tsne_start", f"t-SNE of {n_tsne} representations ({embed_idx.size} cells) and cluster "
                                       "scores, in the background"):
            if jobs is None:  # worker processes started now pay off only when a t-SNE takes longer than starting one
                workers = min(config.tsne_workers, n_tsne) if embed_idx.size >= TSNE_WORKERS_FROM_CELLS else 0
                jobs = stack.enter_context(BackgroundTSNE(None, seed, config.tsne, workers, config.progress))
            jobs.submit_tsne("X_tsne", X_pca[embed_idx])
            scoring = _Scoring(jobs, dataset, train_idx, test_idx, embed_idx, config)
            scoring.add_input(X_pca)
        runs: dict[str, RunResult] = {}
        libraries = functools.cache(lambda: _full_libraries(all_genes))  # counts over all genes, once, when needed

        def trained(spec: RunSpec, model: Autoencoder, resumed: bool) -> None:
            run_source = dataset.count_source() if spec.counts else source
            with watch.stage(f"predict_{spec.name}"):
                full_library = libraries() if spec.counts and genes is not None else None
                latent, recon, recon_pca, sample, errors = _predict_pass(
                    model, run_source, is_test, pca, keep_all, sample_rows, full_library)
            runs[spec.name] = run = RunResult(
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
            for key, matrix in _tsne_inputs(run):
                jobs.submit_tsne(key, matrix[embed_idx])
            scoring.add_run(run)

        with _training_threads(config.device, jobs.workers):
            _train_runs(dataset, runs_to_train, train_idx, test_idx, config, output, distributed, watch, reusable, trained)
        runs = {spec.name: runs[spec.name] for spec in runs_to_train}  # the order of the report

        with watch.stage("pca"):
            for name, run in runs.items():
                views[f"X_{name}_reconstruction_pca"] = run.reconstruction_pca
                if run.spec.latent_dim > 2:
                    views[f"X_{name}_pca"] = fit_pca(run.latent, 50, seed).transform(run.latent).astype(np.float32)
        with threadpool_limits(1), watch.stage("denoising", "imputation of hidden entries"):
            denoising = _denoising(dataset, runs, train_idx, test_idx, config, all_genes)
        with watch.stage("tsne_wait", "waiting for t-SNE and cluster scores"):
            if output is not None:
                import_writers()  # while the workers finish
            done = jobs.results()
        representations = scoring.collect(done, runs)
        views.update({key: value for key, value in done.items() if not key.startswith(_Scoring.PREFIX)})
        # Each job's own time, in its worker or, for score jobs behind a backlog, in this process while
        # it waits (overlapping training, "denoising" and "tsne_wait"); the names stay "…_worker_…"
        watch.timings.update({
            (f"scores_worker_{key[len(_Scoring.PREFIX):]}" if key.startswith(_Scoring.PREFIX) else f"tsne_worker_{key}"): value
            for key, value in jobs.seconds.items()
        })

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
            skipped_runs=skipped,
            denoising=denoising,
            genes=genes,
        )
        if output is not None:
            # models staged as trained or reused; the workers draw half the figures
            write_outputs(result, output, watch, models_saved=True, jobs=jobs)
    return result


@contextmanager
def _training_threads(device: str, busy_cores: int):
    """On the CPU, train with the cores the background t-SNE workers leave (at least one)."""
    if resolve_device(device).type != "cpu" or busy_cores == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, available_cores() - busy_cores)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _training_order(runs: tuple[RunSpec, ...]) -> list[RunSpec]:
    """Runs whose t-SNEs the report shows first, so the workers get them early."""
    return sorted(runs, key=lambda spec: not (spec.tsne_latent or spec.tsne_reconstruction))


def _resumable(dataset, config, output, distributed) -> dict:
    """With ``--resume``, ``{run: (model, path)}`` of reusable models (on the main process; names
    elsewhere); every process learns the same names, or the same reason to stop."""
    main = distributed is None or distributed.is_main
    reusable, problem = {}, None
    if main:
        try:
            reusable = _reusable_models(dataset, config, output)
        except ScaeInputError as err:
            problem = str(err)
    names, problem = broadcast_from_main((sorted(reusable), problem), distributed)
    if problem is not None:
        raise ScaeInputError(problem)
    return reusable if main else dict.fromkeys(names)


def _train_runs(dataset, specs, train_idx, test_idx, config, output, distributed, watch, reusable, trained=None) -> None:
    """Train (or reuse, from ``reusable``) every run's model in ``specs``, t-SNE runs first.

    Count runs train on the raw counts (:meth:`~scae.data.Dataset.count_source`), the others on
    the input; a run with a preset takes its parameters (at most the study's epochs). On the
    main process each model is staged in ``output.models`` as soon as it is trained or reused,
    tagged with a key of the input and settings (so an interrupted study can resume from it),
    and handed to ``trained(spec, model, resumed)``.
    """
    main = distributed is None or distributed.is_main
    for spec in _training_order(specs):
        if spec.name in reusable:
            if main:
                model, found_at = reusable[spec.name]  # loaded onto the study's device
                if output is not None and found_at.parent != output.models:
                    save_model(model, dataset, config, spec, output.models)
                if config.progress:
                    if sys.stderr is not None:  # None: print would write to stdout
                        print(f"scae: reusing {spec.name} from {path_text(found_at)} (--resume)", file=sys.stderr,
                              flush=True)
                trained(spec, model, True)
            continue
        source = dataset.count_source() if spec.counts else dataset.source()
        train, test = source.subset(train_idx), source.subset(test_idx)
        with watch.stage(f"train_{spec.name}", f"training {spec.name} (latent {spec.latent_dim}, {spec.loss})"):
            model = run_model(spec, config, progress=config.progress and main).fit(
                train, eval_X=test, description=spec.name, distributed=distributed
            )
        if main:
            if output is not None:
                save_model(model, dataset, config, spec, output.models)
            trained(spec, model, False)


def run_model(spec: RunSpec, config: StudyConfig, progress: bool = False) -> Autoencoder:
    """The unfitted autoencoder of one run: the study's network and schedule, or the run's preset
    (stopping after at most the study's epochs)."""
    common = {"random_state": config.seed, "device": config.device, "progress": progress}
    if spec.preset is not None:
        model = Autoencoder.from_preset(spec.preset, **common)
        return model.set_params(epochs=min(model.epochs, config.epochs))
    return Autoencoder(
        latent_dim=spec.latent_dim,
        hidden=tuple(config.hidden),
        activation=config.activation,
        loss=spec.loss,
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        **common,
    )


def _trainable_runs(dataset: Dataset, config: StudyConfig) -> tuple[tuple[RunSpec, ...], dict[str, str]]:
    """The runs that can train on ``dataset``, and the others with the reason they are skipped."""
    skipped = {
        spec.name: (f"it models raw counts (loss {spec.loss}) and the input has none: give an .h5ad whose X or "
                    "--counts-layer holds integer counts, --counts-raw, or --raw-counts beside --counts")
        for spec in config.runs
        if spec.counts and not dataset.has_counts
    }
    return tuple(spec for spec in config.runs if spec.name not in skipped), skipped


def _select_genes(dataset: Dataset, config: StudyConfig, train_idx: np.ndarray, watch) -> tuple[Dataset, dict | None]:
    """With ``config.top_genes``: the dataset restricted to its most variable genes on the
    training cells, and a description of the selection for the report."""
    if config.top_genes is None or config.top_genes >= dataset.n_genes:
        return dataset, None
    from scae.genes import highly_variable_genes, hvg_flavor

    with watch.stage("genes", f"selecting the {config.top_genes} most variable genes"):
        genes = highly_variable_genes(dataset, config.top_genes, train_idx)
        selected = dataset.select_genes(genes)
    return selected, {"rule": hvg_flavor(dataset), "n_selected": int(genes.size), "n_genes": dataset.n_genes,
                      "cells": "training cells"}


def _reusable_models(dataset: Dataset, config: StudyConfig, output: OutputDir | None) -> dict:
    """With ``config.resume``: ``{run: (model, path)}`` for the saved models that match this study.

    Models an interrupted run staged are looked for first, then those of the last finished run
    in ``out/models``. A model file from another input or other settings is refused with one
    clear error.
    """
    if not config.resume or output is None:
        return {}
    resolve_device(config.device)  # a device that is not here is the problem, not the models
    found = {}
    for spec in config.runs:
        for folder in (output.models, output.path / "models"):
            path = folder / f"{spec.name}.pt"
            if path.exists():
                break
        else:
            continue
        try:
            model = Autoencoder.load(path, device=config.device)  # predicts where this study trains
        except ScaeInputError as err:  # a damaged file: say so rather than train over it silently
            raise ScaeInputError(f"{err}; --resume cannot reuse it: remove it to retrain") from None
        if model.metadata_.get("study_key") != study_key(dataset, config, spec):
            raise ScaeInputError(
                f"{path}: was trained on another input or with other settings, so --resume cannot reuse it; "
                "remove it (or the models folder), or drop --resume to retrain"
            )
        found[spec.name] = (model, path)
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
    rows = eval_batch_rows(source.n_cols)
    for start in range(0, source.n_rows, rows):
        x = source.tensor(slice(start, min(start + rows, source.n_rows)))
        X_pca[start : start + x.shape[0]] = project(x).numpy()
        coords = baseline_coords(x)
        for k in ks:
            totals[k].add(start, x, torch.addmm(mean, coords[:, :k], components[:k]))
    return X_pca, {f"pca{k}": totals[k].result() for k in ks}


@torch.inference_mode()
def _predict_pass(model: Autoencoder, source: RowSource, is_test: np.ndarray, pca, keep_all: bool, sample_rows,
                  full_library: np.ndarray | None = None):
    """One streamed pass of a trained model over every cell.

    Errors compare the reconstruction with what the network encoded (for a count model: the
    log-normalised counts, the scale of its reconstruction). With ``full_library`` (a count
    model on selected genes: each cell's library over all genes), both are put on the MSE runs'
    scale, counts per 10⁴ of the whole library (:func:`_on_full_library`). Returns the latent
    codes, the reconstruction (every cell when ``keep_all``, else ``None``), the reconstruction on
    the input's principal axes, the reconstructions of ``sample_rows`` (when not ``keep_all``),
    and the exact MSE / nonzero MSE of the training and test cells.
    """
    net, device = model.net_, model.device_
    net.eval()
    n, g = source.n_rows, source.n_cols
    latent = np.empty((n, int(model.latent_dim)), dtype=np.float32)
    recon = np.empty((n, g), dtype=np.float32) if keep_all else None
    recon_pca = np.empty((n, pca.n_components_), dtype=np.float32)
    sample = None if sample_rows is None else np.empty((sample_rows.size, g), dtype=np.float32)
    project, errors = _projector(pca), _SplitErrors(is_test)
    rows = eval_batch_rows(g)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        batch = source.tensor(slice(start, stop))
        out = net(batch.to(device, non_blocking=True))
        x, x_hat = out.target.float().cpu(), out.reconstruction.float().cpu()  # on the host: outputs, projection
        if full_library is not None:
            subset = batch.sum(dim=1, dtype=torch.float64).numpy()
            x = torch.log1p(batch * torch.from_numpy(_per_10k(full_library[start:stop]))[:, None])
            x_hat = torch.from_numpy(_on_full_library(x_hat.numpy(), subset, full_library[start:stop]))
        latent[start:stop] = out.latent.float().cpu().numpy()
        recon_pca[start:stop] = project(x_hat).numpy()
        if recon is not None:
            recon[start:stop] = x_hat.numpy()
        if sample is not None:
            a, b = np.searchsorted(sample_rows, [start, stop])
            sample[a:b] = x_hat.numpy()[sample_rows[a:b] - start]
        errors.add(start, x, x_hat)  # last: it overwrites a scratch copy, not x_hat
    return latent, recon, recon_pca, sample, errors.result()


def _per_10k(library: np.ndarray) -> np.ndarray:
    """``10⁴ / library`` as float32 (0 for a cell without counts)."""
    library = np.asarray(library, dtype=np.float64)
    return np.where(library > 0, 1e4 / np.maximum(library, 1e-30), 0.0).astype(np.float32)


def _on_full_library(reconstruction: np.ndarray, subset_library: np.ndarray, full_library: np.ndarray) -> np.ndarray:
    """A count model's ``log1p(ρ × 10⁴)`` on selected genes, re-expressed per 10⁴ counts of the whole
    library: ``log1p(ρ × subset library / full library × 10⁴)`` (its expected counts over the
    cell's library over all genes, the normalisation of the MSE runs' input)."""
    scale = np.asarray(subset_library, dtype=np.float64) * _per_10k(full_library) / 1e4
    return np.log1p(np.expm1(reconstruction) * scale.astype(np.float32)[:, None]).astype(np.float32)


def _full_libraries(dataset: Dataset) -> np.ndarray:
    """Each cell's total count over all genes (one pass over the raw counts)."""
    source = dataset.count_source()
    rows = eval_batch_rows(source.n_cols)
    return np.concatenate([library_sizes(source.read(np.arange(a, min(a + rows, source.n_rows))))
                           for a in range(0, source.n_rows, rows)])


def _tsne_inputs(run: RunResult):
    """(obsm key, matrix) of each of ``run``'s representations that gets a t-SNE.

    The reconstruction enters through its coordinates on the input's top principal axes (like
    the input itself, ``X_tsne``), the latent as it is.
    """
    if run.spec.tsne_reconstruction:
        yield f"X_{run.spec.name}_reconstruction_tsne", run.reconstruction_pca
    if run.spec.tsne_latent:
        yield f"X_{run.spec.name}_tsne", run.latent


class _Scoring:
    """Scores of every representation (:func:`~scae.metrics.representation_scores`), each computed
    by a background job as soon as the representation exists: the input's top PCs, and each
    run's reconstruction and latent. Linear separability for those up to 50-D.

    High-dimensional representations (the input and the reconstructions) are scored on their
    coordinates on the input's top principal axes (``scored_on`` says so).
    """

    PREFIX = "scores:"

    def __init__(self, jobs: BackgroundTSNE, dataset: Dataset, train_idx, test_idx, embed_idx, config: StudyConfig):
        self._jobs, self._n_genes, self._labels, self._embed_idx, self._config = (
            jobs, dataset.n_genes, dataset.labels, embed_idx, config)
        self._fit_cells = train_idx[subsample_indices(train_idx.size, config.max_embed_cells, config.seed)]
        self._eval_cells = test_idx[subsample_indices(test_idx.size, config.max_embed_cells, config.seed + 1)]
        self._rows: dict[str, dict] = {}  # key -> description, dims, scored_on
        self._input_keys: list[str] = []
        self._on_pcs = ""

    def add_input(self, X_pca: np.ndarray) -> None:
        """The input (on its top PCs) and its top 2, 10 and 50 PCs."""
        self._on_pcs = f"its coordinates on the input's top {X_pca.shape[1]} PCs"
        self._add("original", f"input matrix ({self._n_genes} genes)", self._n_genes, X_pca, self._on_pcs)
        for k in (2, 10, 50):
            if X_pca.shape[1] >= k:
                # the top-k PCs equal "original" when k is all of them: only what "original" lacks
                self._add(f"original_pca{k}", f"top {k} PCs of the input", k, X_pca[:, :k], None,
                          cluster=k != X_pca.shape[1])
        self._input_keys = list(self._rows)

    def add_run(self, run: RunResult) -> None:
        name = run.spec.name
        self._add(f"{name}_reconstruction", f"{name} reconstruction", self._n_genes, run.reconstruction_pca, self._on_pcs)
        self._add(f"{name}_latent", f"{name} latent ({run.spec.latent_dim}-D)", run.spec.latent_dim, run.latent, None)

    def _add(self, key: str, description: str, dims: int, matrix: np.ndarray, scored_on: str | None,
             cluster: bool = True) -> None:
        row = {"description": description, "dims": int(dims)}
        if scored_on is not None and matrix.shape[1] < dims:
            row["scored_on"] = scored_on
        self._rows[key] = row
        labels, fit, evaluate = self._labels, self._fit_cells, self._eval_cells
        linear = (matrix[fit], labels[fit], matrix[evaluate], labels[evaluate]) if dims <= 50 else None
        self._jobs.submit(self.PREFIX + key, representation_scores, matrix[self._embed_idx], labels[self._embed_idx],
                          self._config.kmeans_seeds, self._config.seed, linear, cluster, light=True)

    def collect(self, done: dict, runs: dict[str, RunResult]) -> dict[str, dict]:
        """Every row, in report order: the input's, then each run's (``runs`` order)."""
        order = list(self._input_keys)
        order += [f"{name}_{part}" for name in runs for part in ("reconstruction", "latent")]
        scores: dict[str, dict] = {}
        for key in order:
            row, computed = dict(self._rows[key]), done[self.PREFIX + key]
            if "ari" not in computed:  # the top PCs that are the whole of "original": its cluster scores
                row.update({k: v for k, v in scores["original"].items() if k not in row and k != "scored_on"})
            scores[key] = {**row, **computed}
        return scores


DENOISE_FRACTION = 0.1
"""Share of the nonzero entries of the evaluated test cells hidden for the imputation measure."""
BASELINE_PCS = 10


def _denoising(dataset: Dataset, runs: dict[str, RunResult], train_idx, test_idx, config: StudyConfig,
               all_genes: Dataset) -> dict:
    """How well each run and two baselines recover a hidden 10% of the nonzero entries of (a
    seeded sample of) the test cells (:mod:`scae.denoising`; on raw counts when the input has them,
    so count models and MSE models see the same corrupted cells). ``all_genes`` is the dataset
    before any gene selection: its libraries scale the log-normalised values, as in training."""
    from scae.denoising import baseline_reconstructions, hide_entries, imputation_scores

    counts = dataset.has_counts
    source = dataset.count_source() if counts else dataset.source()
    seed = config.seed
    cells = test_idx[subsample_indices(test_idx.size, config.denoise_cells, seed)]
    library = None
    if counts and all_genes is not dataset:
        library = library_sizes(all_genes.count_source().matrix(cells))
    original = source.matrix(cells)
    hidden = hide_entries(original, DENOISE_FRACTION, seed, counts=counts, max_cells=cells.size, library=library)
    described = {"fraction": DENOISE_FRACTION, "n_cells": int(cells.size), "n_hidden": hidden.n_hidden,
                 "scale": "log1p(counts / library × 1e4)" if counts else "the input's values"}
    if hidden.n_hidden == 0:  # nothing to recover: no scores rather than NaN ones
        return {**described, "scores": {},
                "not_measured": f"the {cells.size} evaluated test cells have no nonzero entry to hide"}
    if library is not None:  # the corrupted cells' libraries: over the selected genes, and over all of them
        selected_library = library_sizes(hidden.counts)
        corrupted_library = library - (library_sizes(original) - selected_library)
    train_cells = train_idx[subsample_indices(train_idx.size, config.max_embed_cells, seed)]
    train_values = dataset.source().matrix(train_cells)  # log-normalised as the MSE runs saw them
    scores = {}
    for name, run in runs.items():
        # the counts as a counts source: the dataset vouched for them (whole numbers, or taken as counts
        # by --normalize log1p), so the model does not check them again as a plain matrix
        given = ArraySource(hidden.counts, counts=True) if run.spec.counts else hidden.values
        reconstruction = run.model.reconstruct(given)
        if run.spec.counts and library is not None:  # on the MSE runs' scale: per 10⁴ of the whole library
            reconstruction = _on_full_library(reconstruction, selected_library, corrupted_library)
        scores[name] = imputation_scores(hidden, reconstruction)
    baselines = baseline_reconstructions(train_values, hidden, BASELINE_PCS, seed)
    scores.update({name: imputation_scores(hidden, recon) for name, recon in baselines.items()})
    return {**described, "scores": scores}


def _check_config(config: StudyConfig, dataset: Dataset) -> None:
    """Reject settings that cannot work, before any training."""
    n_labels = len(dataset.classes)
    least = max(50, 10 * n_labels)
    if config.max_embed_cells < least:
        raise ScaeInputError(
            f"max_embed_cells (--max-embed-cells) {config.max_embed_cells} is too small for {n_labels} labels; "
            f"expected at least {least} (50, and 10 per label)"
        )


