"""Writing a study's outputs: figures, models, ``results.h5ad``, ``metrics.json``, ``report.html``.

The study (:mod:`scae.study`) computes a :class:`~scae.results.StudyResult`; this module turns
it into files, asking :mod:`scae.report` what each figure shows and how the page reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from scae.data import Dataset
from scae.files import (
    OutputDir,
    OutputWriteError,
    atomic_path,
    reason,
    write_bytes,
    write_text,
)
from scae.models import Autoencoder
from scae.plots import Panel, loss_curves, png_bytes, scatter_panels
from scae.presets import preset
from scae.report import build_report, figure_plan
from scae.results import RunSpec, Stopwatch, StudyConfig, StudyResult

TRAINING_SETTINGS = ("epochs", "seed", "hidden", "activation", "batch_size", "learning_rate", "test_fraction",
                     "top_genes")
"""The study settings a trained model depends on (the others only change scoring and outputs)."""


def study_key(dataset: Dataset, config: StudyConfig, spec: RunSpec) -> str:
    """Fingerprint of the input, the training settings and one run: equal keys, same model."""
    settings = {key: value for key, value in config.to_dict().items() if key in TRAINING_SETTINGS}
    settings["run"] = {"latent_dim": spec.latent_dim, "loss": spec.loss}
    if spec.preset is not None:
        settings["run"]["preset"] = {k: list(v) if isinstance(v, tuple) else v for k, v in preset(spec.preset).items()}
    blob = json.dumps({"input": dataset.fingerprint(), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def make_figures(result: StudyResult) -> dict[str, object]:
    """All figures of the study by file stem (matplotlib Figures)."""
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


def write_outputs(result: StudyResult, output: OutputDir, watch: Stopwatch, models_saved: bool = False) -> None:
    """Write every output into ``output``'s staging folder (:meth:`OutputDir.commit` publishes them).

    ``models_saved``: the models are staged already (:func:`~scae.study.run_study` saves each
    one as soon as it is trained or reused).
    """
    staging = output.staging
    try:
        with watch.stage("figures", "drawing figures"):
            images = {stem: png_bytes(fig) for stem, fig in make_figures(result).items()}
            for stem, data in images.items():
                write_bytes(staging / "figures" / f"{stem}.png", data)
        with watch.stage("write_models_h5ad", "writing models and results.h5ad"):
            for run in result.runs.values() if not models_saved else ():
                save_model(run.model, result.dataset, result.config, run.spec, output.models)
            with atomic_path(staging / "results.h5ad") as tmp:
                result.to_anndata().write_h5ad(tmp)
            sample = result.sample_anndata()
            if sample is not None:
                with atomic_path(staging / "reconstructions.h5ad") as tmp:
                    sample.write_h5ad(tmp)
        with watch.stage("report"):
            metrics = result.metrics()
            html = build_report(result, metrics, images)
        metrics["timings"] = {k: round(v, 3) for k, v in watch.timings.items()}
        write_text(staging / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        write_text(staging / "report.html", html)
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        raise OutputWriteError(f"{output.path}: cannot write the outputs{where}: {reason(err)}") from None
