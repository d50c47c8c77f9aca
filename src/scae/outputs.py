"""Writing a study's outputs: figures, models, ``results.h5ad``, ``metrics.json``, ``report.html``.

The study (:mod:`scae.study`) computes a :class:`~scae.results.StudyResult`; this module turns
it into files, asking :mod:`scae.report` what each figure shows and how the page reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from scae.background import BackgroundJobs
from scae.data import Dataset
from scae.files import (
    OutputDir,
    OutputWriteError,
    reason,
    write_bytes,
    write_h5ad,
    write_text,
)
from scae.interrupts import raise_if_interrupted
from scae.models import Autoencoder
from scae.presets import preset
from scae.report import build_report, figure_plan
from scae.results import RunSpec, Stopwatch, StudyConfig, StudyResult

TRAINING_SETTINGS = ("epochs", "seed", "hidden", "activation", "batch_size", "learning_rate", "test_fraction",
                     "top_genes")
"""The study settings a trained model depends on (the others only change scoring and outputs)."""
FIGURE_JOB = "figure:"
"""Prefix of the background jobs that draw figures."""


def study_key(dataset: Dataset, config: StudyConfig, spec: RunSpec) -> str:
    """Fingerprint of the input, the training settings and one run: equal keys, same model."""
    settings = {key: value for key, value in config.to_dict().items() if key in TRAINING_SETTINGS}
    settings["run"] = {"latent_dim": spec.latent_dim, "loss": spec.loss}
    if spec.preset is not None:
        settings["run"]["preset"] = {k: list(v) if isinstance(v, tuple) else v for k, v in preset(spec.preset).items()}
    blob = json.dumps({"input": dataset.fingerprint(), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def import_writers() -> None:
    """Import the libraries that writing the outputs needs: matplotlib (figures), Jinja2 (the
    report) and anndata (the ``.h5ad`` files), about 1 s. :func:`~scae.study.run_study` calls
    this just before it waits for its background workers' last jobs, so that the imports overlap
    their work instead of following it."""
    import anndata  # noqa: F401
    import jinja2  # noqa: F401

    import scae.plots  # noqa: F401


def figure_inputs(result: StudyResult) -> dict[str, tuple]:
    """Every figure of the study by file stem, as :func:`~scae.plots.figure_png` arguments."""
    from scae.plots import Panel

    inputs = {}
    labels = result.dataset.labels[result.embed_idx]
    for stem, spec in figure_plan(result).items():
        if spec["kind"] == "loss":
            inputs[stem] = ("loss", spec["histories"], spec["keys"], spec["title"])
        else:
            panels = [Panel(t, _embed_rows(result, key)[:, :2], *axes) for t, key, axes in spec["panels"]]
            inputs[stem] = ("scatter", panels, labels, spec["title"])
    return inputs


def _embed_rows(result: StudyResult, key: str) -> np.ndarray:
    """Coordinates ``key`` (a view, or ``X_<run>`` for a latent) of the scored cells."""
    latents = {f"X_{name}": run.latent for name, run in result.runs.items()}
    coords = result.views[key] if key in result.views else latents[key]
    return coords if coords.shape[0] == result.embed_idx.size else coords[result.embed_idx]


def write_study(result: StudyResult, out_dir: str | Path) -> None:
    """Write every output of ``result`` into ``out_dir`` (all-or-nothing, see :class:`OutputDir`).

    For a result computed without an output directory; :func:`~scae.study.run_study` given one
    writes the same files itself.
    """
    watch = Stopwatch(False)
    watch.timings = result.timings  # writing stages are added to the study's own timings
    with OutputDir(out_dir).open() as output:
        write_outputs(result, output, watch)
        output.commit()


def save_model(model: Autoencoder, dataset: Dataset, config: StudyConfig, spec: RunSpec, models_dir: Path) -> None:
    """Write ``models_dir/<run>.pt``, tagged with the key ``--resume`` checks."""
    path = models_dir / f"{spec.name}.pt"
    try:
        model.save(path, metadata={"study_key": study_key(dataset, config, spec)})
    except OSError as err:
        raise OutputWriteError(f"{path}: cannot write the model ({reason(err)})") from None


def write_outputs(result: StudyResult, output: OutputDir, watch: Stopwatch, models_saved: bool = False,
                  jobs: BackgroundJobs | None = None) -> None:
    """Write every output into ``output``'s staging folder (:meth:`OutputDir.commit` publishes them).

    ``models_saved``: the models are staged already (:func:`~scae.study.run_study` saves each
    one as soon as it is trained or reused). With ``jobs`` that run in worker processes, every
    other figure is drawn there, while this process draws the rest and writes the ``.h5ad`` files.
    """
    from scae.plots import figure_png

    staging = output.staging
    figures = figure_inputs(result)
    elsewhere = list(figures)[1::2] if jobs is not None and jobs.workers > 0 else []
    try:
        with watch.stage("figures", "drawing figures"):
            for stem in elsewhere:
                jobs.submit(FIGURE_JOB + stem, figure_png, *figures[stem])
            images = {}
            for stem, args in figures.items():
                if stem not in elsewhere:
                    raise_if_interrupted()  # a signal swallowed while drawing (see scae.interrupts)
                    images[stem] = figure_png(*args)
        with watch.stage("write_models_h5ad", "writing models and results.h5ad"):
            for run in result.runs.values() if not models_saved else ():
                save_model(run.model, result.dataset, result.config, run.spec, output.models)
            write_h5ad(result.to_anndata(), staging / "results.h5ad")
            sample = result.sample_anndata()
            if sample is not None:
                write_h5ad(sample, staging / "reconstructions.h5ad")
        if elsewhere:
            with watch.stage("figures_wait", "waiting for the figures drawn in the background"):
                drawn = jobs.results()
            images.update({stem: drawn[FIGURE_JOB + stem] for stem in elsewhere})
            watch.timings.update({f"figure_worker_{stem}": jobs.seconds[FIGURE_JOB + stem] for stem in elsewhere})
        images = {stem: images[stem] for stem in figures}  # the plan's order
        for stem, data in images.items():
            write_bytes(staging / "figures" / f"{stem}.png", data)
        with watch.stage("report"):
            metrics = result.metrics()
            html = build_report(result, metrics, images)
        metrics["timings"] = {k: round(v, 3) for k, v in watch.timings.items()}
        write_text(staging / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        write_text(staging / "report.html", html)
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        raise OutputWriteError(f"{output.shown}: cannot write the outputs{where}: {reason(err)}") from None
