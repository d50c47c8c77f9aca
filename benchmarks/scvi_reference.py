"""Reference numbers for scvi-tools' SCVI (and PCA-10) on the five raw-count benchmark datasets.

Usage (an interpreter with scvi-tools, scanpy and scikit-misc, and scae installed)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 /work/scvi-venv/bin/python \\
        benchmarks/scvi_reference.py [--datasets benchmarks/results/datasets] [--seeds 0 1 2]
        [--only pbmc_10x ...] [--max-epochs N] [--threads 1] [--resume]
        [--out benchmarks/results/scvi_reference.json] [--latents benchmarks/results/scvi]
        2> scvi_reference.log

The datasets are the ``.h5ad`` files of ``benchmarks/real_datasets.py`` (X raw counts, labels in
``obs["cell_type"]``); a file missing from ``--datasets`` is written there first (and a dataset
whose source files are absent is skipped). For each dataset (smallest first) and seed:

genes
    Every gene when the file has at most 5,000 genes; otherwise the top 2,000 ``seurat_v3``
    highly variable genes of the raw counts of all cells
    (``scanpy.pp.highly_variable_genes(flavor="seurat_v3", n_top_genes=2000)``), kept in file
    order. Chosen once per dataset (nothing random in it); the names go to
    ``<latents>/<dataset>_genes.txt``.
``scvi``
    :func:`scae.peers.fit_scvi` on those genes of all cells: scvi-tools' defaults (``n_latent``
    10, its own epoch rule, 400 epochs below 20,000 cells, unless ``--max-epochs``), seeded
    with the seed. The latent is saved as ``<latents>/<dataset>_seed<k>.npy`` (float32, cells ×
    10, cells in file order).
``pca10``
    ``log1p(counts / library size × 1e4)`` of the same genes, then scikit-learn's ``PCA(10,
    random_state=seed)``; saved as ``<latents>/<dataset>_pca10_seed<k>.npy``.

Each latent is scored on all cells with :func:`scae.metrics.cluster_scores` (k-means with k =
number of labels, seeds ``seed … seed + 4`` as in a study at that seed: ARI and NMI means; the
labels' silhouette) and, where this scae has ``metrics.knn_accuracy``, the 15-NN accuracy
(``knn15``: 5 stratified folds, seeded). ``fit_seconds`` is the wall time of SCVI's set-up and
training (PCA: the normalisation and PCA); ``fit_cpu_seconds`` the CPU time this process spent
on the fit (with one thread, the time it would take on an idle core: the wall time grows with
the other work on the machine, this much less). PyTorch, BLAS, OpenMP and numba use ``--threads`` threads (see
:data:`THREAD_VARIABLES`).

The JSON (``--out``, rewritten atomically after every fit, so a long run can be watched and
``--resume`` d) holds ``results`` (one record per dataset × method × seed: ``dataset``,
``method``, ``seed``, ``ari``, ``nmi``, ``silhouette``, ``ari_std`` and ``nmi_std`` over the
k-means seeds, ``knn15``, ``fit_seconds``, ``fit_cpu_seconds``, ``epochs``, ``n_cells``,
``n_genes``, ``n_classes``, ``latent``, ``load_average``), ``summary``
(per dataset and method: mean and sample sd over seeds), ``datasets`` (gene choice, shape),
``settings`` and ``environment`` (versions, threads, load average). ``--resume`` keeps the
records of an earlier JSON made with the same settings and runs only the missing ones. Progress
goes to stderr; the summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATASETS = RESULTS / "datasets"
DEFAULT_OUT = RESULTS / "scvi_reference.json"
DEFAULT_LATENTS = RESULTS / "scvi"
DATASET_ORDER = ("cellbench_celseq2", "cellbench_dropseq", "mouse_bladder", "pbmc_10x", "simulated")
"""Smallest (fastest for SCVI) first, so the first numbers come early."""
LABEL_KEY = "cell_type"
MAX_ALL_GENES = 5000
N_TOP_GENES = 2000
N_PCS = 10
TARGET_SUM = 1e4
SCORE_KEYS = ("ari", "nmi", "silhouette")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
"""Set to ``--threads`` unless already set. NUMBA_NUM_THREADS matters: scanpy's seurat_v3 runs numba,
whose OpenMP layer otherwise starts a second thread in PyTorch's libgomp (the same library), and
that thread spins beside every later SCVI fit."""

sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(message: str) -> None:
    print(f"[scvi_reference {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_datasets(folder: Path, names: list[str]) -> None:
    """Write the ``.h5ad`` files of ``names`` that ``folder`` lacks (see ``real_datasets.py``)."""
    missing = [n for n in names if not (folder / f"{n}.h5ad").is_file()]
    if not missing:
        return
    import real_datasets

    folder.mkdir(parents=True, exist_ok=True)
    for file_name, needed, load in real_datasets.dataset_plan(real_datasets.DEFAULT_DATA):
        if Path(file_name).stem not in missing:
            continue
        if not all(p.is_file() for p in needed):
            log(f"skipping {file_name}: source files absent ({', '.join(map(str, needed))})")
            continue
        real_datasets.write(load(), folder / file_name)
        log(f"wrote {folder / file_name}")


def choose_genes(adata) -> tuple[np.ndarray, str]:
    """Indices of the genes used (all, or the top seurat_v3 HVGs of the raw counts) and how."""
    if adata.n_vars <= MAX_ALL_GENES:
        return np.arange(adata.n_vars), f"all {adata.n_vars} genes (<= {MAX_ALL_GENES})"
    import scanpy as sc

    table = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N_TOP_GENES, inplace=False)
    chosen = np.flatnonzero(table["highly_variable"].to_numpy())
    return chosen, f"top {N_TOP_GENES} seurat_v3 highly variable genes of {adata.n_vars} (raw counts, all cells)"


def pca10(counts, seed: int) -> np.ndarray:
    """``PCA(10)`` of ``log1p(counts / library × 1e4)`` (dense), seeded."""
    from sklearn.decomposition import PCA

    X = counts.toarray().astype(np.float64)
    X *= TARGET_SUM / X.sum(axis=1, keepdims=True)
    np.log1p(X, out=X)
    return PCA(n_components=N_PCS, random_state=seed).fit_transform(X).astype(np.float32)


def environment(threads: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    packages = ("scvi-tools", "torch", "lightning", "scanpy", "scikit-misc", "scikit-learn", "anndata",
                "numpy", "scipy", "scae")
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {p: installed(p) for p in packages},
        "torch_threads": torch.get_num_threads(),
        "threads": threads,
        **{variable: os.environ.get(variable) for variable in THREAD_VARIABLES},
        "nice": os.nice(0),
    }


def summarise(records: list[dict]) -> list[dict]:
    """Mean and sample sd (ddof 1; 0 for one seed) over seeds, per dataset and method."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    rows = []
    for (dataset, method), group in groups.items():
        row = {"dataset": dataset, "method": method, "seeds": sorted(r["seed"] for r in group)}
        optional = ("knn15",) if all("knn15" in r for r in group) else ()
        optional += ("fit_cpu_seconds",) if all("fit_cpu_seconds" in r for r in group) else ()
        for key in (*SCORE_KEYS, *optional, "fit_seconds"):
            values = np.array([r[key] for r in group], dtype=float)
            row[key] = float(values.mean())
            row[f"{key}_sd"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    keys = (*SCORE_KEYS, "knn15")
    titles = ("ARI", "NMI", "silhouette", "15-NN accuracy")
    lines = [f"{'dataset':<18} {'method':<6} {'seeds':<6} " + " ".join(f"{t:>15}" for t in titles) + f" {'fit s (CPU s)':>26}"]
    for row in rows:
        cells = [f"{row[k]:.3f} ± {row[k + '_sd']:.3f}" if k in row else "-" for k in keys]
        fit = f"{row['fit_seconds']:.1f} ± {row['fit_seconds_sd']:.1f}"
        if "fit_cpu_seconds" in row:
            fit += f" (CPU {row['fit_cpu_seconds']:.1f})"
        lines.append(f"{row['dataset']:<18} {row['method']:<6} {len(row['seeds']):<6} "
                     + " ".join(f"{c:>15}" for c in cells) + f" {fit:>26}")
    return "\n".join(lines)


def score(latent: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """``cluster_scores`` (k-means seeds ``seed … seed + 4``) and, where this scae has
    ``metrics.knn_accuracy``, the 15-NN accuracy (5 stratified folds, seeded) as ``knn15``."""
    from scae import metrics

    scores = metrics.cluster_scores(latent, labels, n_seeds=5, seed=seed)
    result = {k: scores[k] for k in (*SCORE_KEYS, "ari_std", "nmi_std")}
    knn_accuracy = getattr(metrics, "knn_accuracy", None)
    if knn_accuracy is not None:
        result["knn15"] = float(knn_accuracy(latent, labels, k=15, folds=5, seed=seed))
    return result


def save(path: Path, document: dict) -> None:
    from scae.files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(document, indent=1) + "\n")


def save_array(path: Path, array: np.ndarray) -> None:
    from scae.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def scores_text(record: dict) -> str:
    text = f"ARI {record['ari']:.3f} NMI {record['nmi']:.3f} silhouette {record['silhouette']:.3f}"
    return text + (f" 15-NN {record['knn15']:.3f}" if "knn15" in record else "")


def rescore(records: list[dict], name: str, method: str, seed: int, labels: np.ndarray) -> None:
    """Score the record of ``(name, method, seed)`` again from its saved latent (when present)."""
    record = next(r for r in records if (r["dataset"], r["method"], r["seed"]) == (name, method, seed))
    path = Path(record.get("latent", ""))
    if not path.is_file():
        log(f"  {name} {method} seed {seed}: latent {path} absent, kept as it was")
        return
    record.update(score(np.load(path), labels, seed))
    log(f"  {name} {method} seed {seed} rescored: {scores_text(record)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS, help="folder of the .h5ad files")
    parser.add_argument("--only", nargs="+", choices=DATASET_ORDER, default=list(DATASET_ORDER))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=None, help="default: scvi-tools' own rule")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--latents", type=Path, default=DEFAULT_LATENTS)
    parser.add_argument("--resume", action="store_true", help="keep the records of an earlier --out")
    parser.add_argument("--rescore", action="store_true",
                        help="--resume, and score the earlier records again from their saved latents")
    args = parser.parse_args(argv)

    for variable in THREAD_VARIABLES:  # before the libraries start their thread pools
        os.environ.setdefault(variable, str(args.threads))
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    import anndata as ad

    from scae.files import write_text
    from scae.peers import fit_scvi, scvi_available

    if not scvi_available():
        log("scvi-tools is not installed here; only PCA-10 is measured (pip install 'scae[peers]')")
    settings = {
        "seeds": args.seeds, "max_epochs": args.max_epochs, "threads": args.threads,
        "max_all_genes": MAX_ALL_GENES, "n_top_genes": N_TOP_GENES, "kmeans_seeds": "seed … seed + 4",
    }
    records: list[dict] = []
    if (args.resume or args.rescore) and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if earlier.get("settings") == settings:
            records = earlier["results"]
            log(f"resuming: {len(records)} records from {args.out}")
        else:
            log(f"not resuming: {args.out} was made with other settings")
    done = {(r["dataset"], r["method"], r["seed"]) for r in records}
    document = {
        "settings": settings,
        "environment": environment(args.threads),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "datasets": {},
        "results": records,
    }
    names = [n for n in DATASET_ORDER if n in args.only]
    ensure_datasets(args.datasets, names)
    args.latents.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in names:
        path = args.datasets / f"{name}.h5ad"
        if not path.is_file():
            log(f"skipping {name}: {path} absent")
            continue
        adata = ad.read_h5ad(path)
        labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
        genes, how = choose_genes(adata)
        counts = adata.X[:, genes].tocsr()
        write_text(args.latents / f"{name}_genes.txt", "\n".join(adata.var_names[genes]) + "\n")
        document["datasets"][name] = {
            "file": str(path), "n_cells": int(adata.n_obs), "n_genes_in_file": int(adata.n_vars),
            "n_genes": int(genes.size), "genes": how, "n_classes": int(np.unique(labels).size),
        }
        log(f"{name}: {adata.n_obs} cells, {how}")
        for seed in args.seeds:
            for method in ("pca10", "scvi"):
                if (name, method, seed) in done:
                    if args.rescore:
                        rescore(records, name, method, seed, labels)
                        document["summary"] = summarise(records)
                        save(args.out, document)
                    continue
                if method == "scvi" and not scvi_available():
                    continue
                fit_started, cpu_started = time.perf_counter(), time.process_time()
                if method == "scvi":
                    latent, info = fit_scvi(counts, seed=seed, max_epochs=args.max_epochs)
                    fit_seconds, epochs = info["fit_seconds"], info["epochs"]
                    cpu_seconds = time.process_time() - cpu_started  # includes the latent's extraction
                    latent_path = args.latents / f"{name}_seed{seed}.npy"
                else:
                    latent = pca10(counts, seed)
                    fit_seconds, epochs = time.perf_counter() - fit_started, None
                    cpu_seconds = time.process_time() - cpu_started
                    latent_path = args.latents / f"{name}_pca10_seed{seed}.npy"
                save_array(latent_path, latent)
                record = {
                    "dataset": name, "method": method, "seed": seed, **score(latent, labels, seed),
                    "fit_seconds": round(fit_seconds, 3), "fit_cpu_seconds": round(cpu_seconds, 3),
                    "epochs": epochs,
                    "n_cells": int(counts.shape[0]), "n_genes": int(counts.shape[1]),
                    "n_classes": int(np.unique(labels).size), "latent": str(latent_path),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
                records.append(record)
                document["summary"] = summarise(records)
                document["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
                save(args.out, document)
                log(f"  {name} {method} seed {seed}: {scores_text(record)}, fit {fit_seconds:.1f} s"
                    + (f", {epochs} epochs" if epochs else "")
                    + f" ({time.perf_counter() - started:.0f} s so far)")
    document["summary"] = summarise(records)
    save(args.out, document)
    print(table(document["summary"]))
    log(f"done in {time.perf_counter() - started:.0f} s; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
