"""``scae benchmark``: fit embedding methods on labelled datasets and score their latents.

Every method is fitted on all cells of a dataset (no labels are used) and its latent is scored
against the known labels: k-means ARI and NMI (k = number of labels, 5 k-means seeds), the
labels' silhouette, and the cross-validated 15-nearest-neighbour label accuracy
(:func:`scae.metrics.knn_accuracy`). Methods:

- ``pca<k>`` — PCA with k components of the log-normalised matrix;
- ``pca<k>_scaled`` — the same after scanpy's standard scaling (each gene to zero mean and unit
  variance, clipped at ±10: ``sc.pp.scale(adata, max_value=10)``, then ``sc.tl.pca``);
- ``ae10``, ``ae50``, ``ae2``, ``ae10_nonzero`` — the study's assignment runs (MSE on the
  log-normalised matrix, the study's network and schedule);
- every preset of :mod:`scae.presets` (count models on the raw counts), and ``recommended``;
- ``scvi`` — scvi-tools' SCVI with its defaults, when scvi-tools is installed (the ``peers``
  extra).

Datasets with more genes than ``top_genes`` are first restricted to their most variable genes
(:func:`scae.genes.highly_variable_genes`, on all cells), the same genes for every method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from scae import params as rules
from scae.data import Dataset
from scae.embeddings import fit_pca, subsample_indices
from scae.errors import ScaeInputError
from scae.metrics import cluster_scores, knn_accuracy
from scae.presets import BENCHMARK_METHODS, PRESETS, RECOMMENDED, preset
from scae.results import DEFAULT_RUNS, StudyConfig

SCORE_MAX_CELLS = 20_000
"""Latents of larger datasets are scored on a seeded sample of this many cells."""
DEFAULT_METHODS = BENCHMARK_METHODS
SCALE_CLIP = 10.0
"""``pca<k>_scaled`` clips the standardised values at ± this (scanpy's usual ``max_value``)."""
ASSIGNMENT_RUNS = {spec.name: spec for spec in DEFAULT_RUNS}

FitFunction = Callable[[Dataset, int], np.ndarray]
"""``(dataset, seed) -> latent`` (cells × dims)."""


@dataclass(frozen=True)
class Method:
    """One way to embed a dataset."""

    name: str
    fit: FitFunction
    needs_counts: bool = False
    """Whether the method models raw counts (it is skipped on datasets without them)."""
    peer: bool = False
    """An external tool (skipped with a note when it is not installed)."""
    components: int | None = None
    """PCA: the number of principal components (skipped on datasets with fewer genes or cells)."""


def _pca_method(name: str, k: int, scaled: bool = False) -> Method:
    def fit(dataset: Dataset, seed: int) -> np.ndarray:
        X = dataset.source().matrix()
        if scaled:
            X = scaled_genes(X)
        return fit_pca(X, k, seed).transform(X).astype(np.float32)

    return Method(name, fit, components=k)


def scaled_genes(X) -> np.ndarray:
    """Each gene (column) of ``X`` standardised to zero mean and unit variance over the cells (the
    sample standard deviation) and clipped at ±:data:`SCALE_CLIP`, as
    ``scanpy.pp.scale(adata, max_value=10)`` does (a constant gene becomes 0); dense float32."""
    n, step = X.shape[0], max(1, 2**22 // max(X.shape[1], 1))

    def blocks():  # rows in float64, a few MiB at a time: no full-size float64 copy
        for start in range(0, n, step):
            block = X[start : start + step]
            yield start, np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64)

    total, squares = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for _, block in blocks():
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / max(n, 1)
    variance = np.maximum(squares - n * mean**2, 0.0) / max(n - 1, 1)  # the sample variance
    scale = np.where(variance > 0, 1.0 / np.sqrt(np.where(variance > 0, variance, 1.0)), 0.0)
    out = np.empty(X.shape, dtype=np.float32)  # the one dense copy
    for start, block in blocks():
        out[start : start + step] = np.clip((block - mean) * scale, -SCALE_CLIP, SCALE_CLIP)
    return out


def autoencoder_method(name: str, params: dict, counts: bool, device: str = "auto") -> Method:
    """An :class:`scae.Autoencoder` with ``params`` (its ``random_state`` the seed), fitted on the
    raw counts (``counts``) or the log-normalised matrix, its latent the embedding."""
    from scae.models import Autoencoder

    def fit(dataset: Dataset, seed: int) -> np.ndarray:
        source = dataset.count_source() if counts else dataset.source()
        model = Autoencoder(**{**params, "random_state": seed, "device": device}).fit(source)
        return model.transform(source)

    return Method(name, fit, needs_counts=counts)


def _assignment_params(name: str) -> dict:
    """The parameters a default study trains run ``name`` with (:func:`scae.study.run_model`)."""
    from scae.study import run_model

    params = run_model(ASSIGNMENT_RUNS[name], StudyConfig()).get_params()
    return {k: v for k, v in params.items() if k not in ("random_state", "device", "progress")}


def _scvi_method() -> Method:
    def fit(dataset: Dataset, seed: int) -> np.ndarray:
        from scae.peers import fit_scvi

        return fit_scvi(dataset.count_source().matrix(), seed=seed)[0]

    return Method("scvi", fit, needs_counts=True, peer=True)


PCA_MAX_DIGITS = 7
"""``pca<k>`` takes ``k`` of at most this many digits (a longer one is no matrix's size)."""


def method(name: str, device: str = "auto") -> Method:
    """The method called ``name`` (see the module docstring), or :class:`ScaeInputError`;
    autoencoders train on ``device``."""
    from scae.likelihoods import get_likelihood

    digits, scaled = name[3:].removesuffix("_scaled"), name.endswith("_scaled")
    if name.startswith("pca") and digits.isascii() and digits.isdigit() and len(digits.lstrip("0")) > PCA_MAX_DIGITS:
        raise ScaeInputError(f"method '{name[:20]}…': at most {10 ** PCA_MAX_DIGITS - 1} principal components")
    if name.startswith("pca") and digits.isascii() and digits.isdigit() and int(digits) >= 1:
        k = int(digits)
        canonical = f"pca{k}_scaled" if scaled else f"pca{k}"
        if name != canonical:  # pca010 would be a second name of pca10
            raise ScaeInputError(f"method '{name}': write it {canonical}")
        return _pca_method(name, k, scaled)
    if name in ASSIGNMENT_RUNS:
        return autoencoder_method(name, _assignment_params(name), counts=False, device=device)
    if name == "recommended" or name in PRESETS:
        params = preset(name)
        return autoencoder_method(name, params, counts=get_likelihood(params.get("loss", "mse")).counts, device=device)
    if name == "scvi":
        return _scvi_method()
    known = ["pca<k>", "pca<k>_scaled", *ASSIGNMENT_RUNS, *PRESETS, "recommended", "scvi"]
    raise ScaeInputError(f"unknown method '{name}'; expected one of: {', '.join(known)}")


def method_names() -> list[str]:
    """Every named method (PCA as ``pca10``)."""
    return ["pca10", "pca10_scaled", *ASSIGNMENT_RUNS, *PRESETS, "recommended", "scvi"]


def score_latent(latent: np.ndarray, labels: np.ndarray, seed: int, max_cells: int = SCORE_MAX_CELLS) -> dict[str, float]:
    """ARI, NMI, silhouette and 15-NN accuracy of a latent (on a seeded sample of ``max_cells``)."""
    rows = subsample_indices(latent.shape[0], max_cells, seed)
    Z, y = latent[rows], labels[rows]
    scores = cluster_scores(Z, y, seed=seed)
    return {"ari": scores["ari"], "nmi": scores["nmi"], "silhouette": scores["silhouette"],
            "knn_accuracy": knn_accuracy(Z, y, k=15, folds=5, seed=seed)}


MIN_CELLS = 20
"""Fewest cells a benchmark dataset may have: 15-NN accuracy is cross-validated in 5 folds, so
each fold's training cells must hold 15 neighbours."""


def check_scorable(dataset: Dataset, name: str) -> None:
    """Refuse a dataset whose latents cannot be scored meaningfully: fewer than :data:`MIN_CELLS`
    cells, or a single label (nothing to keep apart)."""
    if dataset.n_cells < MIN_CELLS:
        raise ScaeInputError(f"{name}: {dataset.n_cells} cells; the scores need at least {MIN_CELLS} "
                             "(15-nearest-neighbour accuracy in 5 folds)")
    if len(dataset.classes) < 2:
        raise ScaeInputError(f"{name}: every cell has the label '{dataset.classes[0]}'; the scores need "
                             "at least 2 labels (cell types to keep apart)")


def prepare(dataset: Dataset, top_genes: int | None) -> Dataset:
    """``dataset`` restricted to its ``top_genes`` most variable genes (on all cells) when it has more."""
    if top_genes is None or dataset.n_genes <= top_genes:
        return dataset
    from scae.genes import highly_variable_genes

    return dataset.select_genes(highly_variable_genes(dataset, top_genes))


def run_benchmark(
    datasets: dict[str, Dataset],
    methods: list[str | Method],
    seeds: list[int],
    top_genes: int | None = 2000,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Fit every method on every dataset with every seed and score each latent.

    Returns ``(results, skipped)``: one record per fit, ``{"dataset", "method", "seed", "ari",
    "nmi", "silhouette", "knn_accuracy", "fit_seconds"}``, and one ``{"dataset", "method",
    "reason"}`` per method that could not run on a dataset (count models without raw counts,
    a peer tool that is not installed).
    """
    methods, seeds = _checked_arguments(datasets, methods, seeds, top_genes)
    if log is not None and not callable(log):
        raise ScaeInputError(f"log must be None or a function taking one line of text; got {type(log).__name__}")
    resolved: list[Method] = []
    for given in methods:
        found = given if isinstance(given, Method) else method(given)
        if found.name not in {m.name for m in resolved}:  # a repeated name runs once, where it first came
            resolved.append(found)
    for data_name, dataset in datasets.items():
        check_scorable(dataset, data_name)
    results, skipped = [], []
    for data_name, dataset in datasets.items():
        dataset = prepare(dataset, top_genes)
        for m in resolved:
            reason = _why_not(m, dataset)
            if reason is not None:
                skipped.append({"dataset": data_name, "method": m.name, "reason": reason})
                if log:
                    log(f"{data_name} {m.name}: skipped ({reason})")
                continue
            for seed in seeds:
                started = time.perf_counter()
                latent = _checked_latent(m.fit(dataset, seed), m.name, data_name, dataset.n_cells)
                seconds = time.perf_counter() - started
                record = {"dataset": data_name, "method": m.name, "seed": int(seed),
                          **score_latent(latent, dataset.labels, seed),
                          "fit_seconds": seconds}
                results.append(record)
                if log:
                    log(f"{data_name} {m.name} seed {seed}: ARI {record['ari']:.3f}, 15-NN {record['knn_accuracy']:.3f}, "
                        f"fit {seconds:.1f} s")
    return results, skipped


def _checked_latent(latent, method_name: str, data_name: str, n_cells: int) -> np.ndarray:
    """What a method returned, as a float32 matrix of one finite row per cell, or one line naming the method."""
    where = f"method '{method_name}' on dataset '{data_name}'"
    if latent is None:
        raise ScaeInputError(f"{where}: returned None; expected a latent of shape ({n_cells}, k), one row per cell")
    try:
        values = np.asarray(latent, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ScaeInputError(f"{where}: returned {type(latent).__name__}, not a numeric matrix ({err})") from None
    if values.ndim != 2 or values.shape[0] != n_cells or values.shape[1] < 1:
        raise ScaeInputError(f"{where}: returned a latent of shape {values.shape}; expected ({n_cells}, k) with "
                             "k ≥ 1, one row per cell")
    if not np.isfinite(values).all():
        raise ScaeInputError(f"{where}: returned a latent with NaN or infinite values (or beyond 32-bit floats' range)")
    return values


def _checked_arguments(datasets, methods, seeds, top_genes) -> tuple[list, list[int]]:
    """:func:`run_benchmark`'s arguments checked (``ScaeInputError``, a ``ValueError``, naming the
    one that is wrong); the methods and seeds as lists."""
    if not isinstance(datasets, Mapping) or not datasets:
        got = "an empty dict" if isinstance(datasets, Mapping) else _shown(datasets)
        raise ScaeInputError(f"datasets must be a non-empty dict of name → scae.Dataset; got {got}")
    for name, dataset in datasets.items():
        if not isinstance(name, str):
            raise ScaeInputError(f"datasets must be named by strings (the names in the results); got the key {name!r}")
        if not isinstance(dataset, Dataset):
            raise ScaeInputError(f"datasets[{name!r}] must be a scae.Dataset (scae.read_h5ad, scae.read_counts_labels); "
                                 f"got {_shown(dataset)}")
    if isinstance(methods, (str, Method)) or not isinstance(methods, Iterable):
        raise ScaeInputError(f"methods must be a list of method names or Methods; got {_shown(methods)}")
    methods = list(methods)
    if not methods or not all(isinstance(m, (str, Method)) for m in methods):
        raise ScaeInputError(f"methods must be a non-empty list of method names or Methods; got {methods!r}")
    try:
        if isinstance(seeds, (str, bytes)):
            raise TypeError
        seeds = list(seeds)
    except TypeError:  # not iterable (a 0-D array too)
        raise ScaeInputError(f"seeds must be a list of seeds; got {_shown(seeds)}") from None
    # a repeated seed is fitted once (as a repeated method runs once): repeats would weigh it twice
    seeds = list(dict.fromkeys(rules.check("each seed", seed, rules.study_seed()) for seed in seeds))
    if not seeds:
        raise ScaeInputError("seeds must hold at least one seed; got none")
    if top_genes is not None:
        rules.check("top_genes", top_genes, rules.TOP_GENES)
    return methods, seeds


def _shown(value) -> str:
    return f"{value!r}" if isinstance(value, (str, int, float)) else f"a {type(value).__name__}"


def _why_not(m: Method, dataset: Dataset) -> str | None:
    if m.needs_counts and not dataset.has_counts:
        return "needs raw counts; the dataset has none"
    if m.components is not None and m.components > min(dataset.n_genes, dataset.n_cells):
        return (f"{m.components} principal components of {dataset.n_cells} cells × {dataset.n_genes} genes "
                f"(at most {min(dataset.n_genes, dataset.n_cells)})")
    if m.peer:
        from scae.peers import scvi_available

        if not scvi_available():
            return "scvi-tools is not installed (pip install 'scae[peers]')"
    return None


def summarize(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per dataset and method, in the order first seen."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in results:
        groups.setdefault((record["dataset"], record["method"]), []).append(record)
    rows = []
    for (data_name, name), records in groups.items():
        row = {"dataset": data_name, "method": name, "seeds": len(records)}
        for key in ("ari", "nmi", "silhouette", "knn_accuracy", "fit_seconds"):
            values = np.array([r[key] for r in records], dtype=float)
            row[key], row[f"{key}_sd"] = float(values.mean()), float(values.std())
        rows.append(row)
    return rows


def _table_rows(rows: list[dict]) -> list[tuple[str, list[list[str]]]]:
    """Per dataset: one row of formatted cells per method."""
    def pm(row: dict, key: str, digits: int = 3) -> str:
        return f"{row[key]:.{digits}f} ± {row[key + '_sd']:.{digits}f}"

    tables: dict[str, list[list[str]]] = {}
    for row in rows:
        tables.setdefault(row["dataset"], []).append([
            row["method"], pm(row, "ari"), pm(row, "nmi"), pm(row, "silhouette"), pm(row, "knn_accuracy"),
            pm(row, "fit_seconds", 1), str(row["seeds"]),
        ])
    return list(tables.items())


def write_benchmark(out_dir, results: list[dict], skipped: list[dict], settings: dict,
                    data_notes: dict[str, str] | None = None) -> dict:
    """Write ``benchmark.png``, ``benchmark.html`` and ``benchmark.json`` into ``out_dir``, all
    three or none (:func:`~scae.files.atomic_paths`: a write that fails leaves the previous set);
    returns the JSON content.

    ``benchmark.json`` holds ``"results"`` (one record per fit), ``"summary"`` (mean and sd over
    seeds), ``"skipped"`` and ``"settings"``.
    """
    import base64
    import json
    import os
    import platform
    from pathlib import Path

    from scae import __version__
    from scae.files import atomic_paths
    from scae.plots import benchmark_bars, png_bytes
    from scae.report import render_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    content = {"scae_version": __version__, "settings": settings, "results": results, "summary": rows,
               "skipped": skipped}
    images, files = {}, {}
    if rows:
        png = png_bytes(benchmark_bars(rows, [("ari", "k-means ARI"), ("knn_accuracy", "15-NN accuracy")],
                                       "Latent representations against the known labels"))
        files["benchmark.png"] = png
        images["benchmark"] = base64.b64encode(png).decode("ascii")
    html = render_template("benchmark.html.j2", {
        "version": __version__,
        "n_datasets": len({r["dataset"] for r in results} | {s["dataset"] for s in skipped}),
        "methods": list(dict.fromkeys([r["method"] for r in results] + [s["method"] for s in skipped])),
        "seeds": settings.get("seeds", []),
        "kmeans_seeds": 5, "knn_k": 15, "knn_folds": 5,
        "top_genes": settings.get("top_genes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
        "images": images,
        "tables": _table_rows(rows),
        "data_notes": data_notes or {},
        "skipped": skipped,
    })
    files["benchmark.html"] = html.encode("utf-8")
    files["benchmark.json"] = (json.dumps(content, indent=2, allow_nan=False) + "\n").encode("utf-8")
    with atomic_paths([out / name for name in files]) as temporaries:
        for temporary, data in zip(temporaries, files.values()):
            temporary.write_bytes(data)
    if "benchmark.png" not in files:  # no chart this time: not the previous run's beside this run's page
        (out / "benchmark.png").unlink(missing_ok=True)
    return content


__all__ = ["DEFAULT_METHODS", "Method", "RECOMMENDED", "method", "method_names", "run_benchmark", "score_latent", "summarize",
           "write_benchmark"]
