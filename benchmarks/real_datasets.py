"""Write the raw-count benchmark datasets as ``.h5ad`` files that one benchmark can read alike.

Usage::

    .venv/bin/python benchmarks/real_datasets.py [--out benchmarks/results/datasets]
        [--data ../shared/data]

Writes, into ``--out``, one AnnData file per raw-count dataset of the shared data folder, plus
scae's built-in dataset, all in the same form: ``X`` the raw counts as a float32 CSR matrix
(cells × genes), ``obs["cell_type"]`` the labels (categorical strings), ``var_names`` the genes
(``gene0000`` … where the original file stores no names), ``obs_names`` the cells (the
barcodes where the file has them, else ``cell0000`` …) and ``uns["source"]`` a line saying
where the data came from and what was done to it:

``pbmc_10x.h5ad``
    ``scdcc_10x_pbmc/10X_PBMC_top2000.h5``: 4,271 cells × 2,000 genes, labels ``Y`` (8 classes,
    written ``"1"`` … ``"8"``).
``mouse_bladder.h5ad``
    ``scdcc_mouse_bladder/mouse_bladder_cell_top2000.h5``: 2,746 × 2,003, labels ``Y`` (16).
``cellbench_celseq2.h5ad``, ``cellbench_dropseq.h5ad``
    ``cellbench_3celllines/sc_{celseq2,dropseq}.{count,metadata}.csv.gz`` (genes × cells,
    transposed): singlets only (``demuxlet_cls == "SNG"``), labels ``cell_line_demuxlet`` (3),
    ERCC spike-in rows dropped; genes that are zero in every kept cell are kept, as in the file.
``simulated.h5ad``
    ``scae.simulate_counts()`` with its defaults (5,000 × 1,000, 3 populations, seed 0),
    labels ``pop0`` … ``pop2`` -- the counts behind scae's built-in dataset.

A dataset whose files are absent is skipped with a line on stderr. Each file is written to a
temporary name in ``--out`` and renamed when complete; the same inputs give the same files
(content; the HDF5 bytes too, as nothing time-dependent is stored). One JSON summary (per file:
shape, fraction of zeros, number of classes and cells per class, the largest count) goes to
stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

import scae
from scae.files import atomic_path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "datasets"
LABEL_KEY = "cell_type"


def log(message: str) -> None:
    print(f"[real_datasets] {message}", file=sys.stderr, flush=True)


def generic_names(prefix: str, n: int) -> pd.Index:
    """``prefix0000`` … (zero-padded to the width of ``n - 1``)."""
    width = len(str(max(n - 1, 0)))
    return pd.Index([f"{prefix}{i:0{width}d}" for i in range(n)])


def make_anndata(X, labels, var_names: pd.Index, obs_names: pd.Index, source: str) -> ad.AnnData:
    """AnnData with float32 CSR counts and categorical string labels in ``obs[LABEL_KEY]`` (numeric
    codes in numeric order, other names alphabetically)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    X.sort_indices()
    X.eliminate_zeros()
    labels = np.asarray(labels).astype(str)
    categories = sorted(set(labels), key=lambda c: (int(c), c) if c.isdigit() else (float("inf"), c))
    obs = pd.DataFrame({LABEL_KEY: pd.Categorical(labels, categories=categories)},
                       index=obs_names.astype(str))
    var = pd.DataFrame(index=var_names.astype(str))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["source"] = source
    return adata


def load_scdcc(path: Path, what: str) -> ad.AnnData:
    """An scDCC ``.h5`` file: ``X`` cells × genes (float32 counts), ``Y`` integer labels; no names."""
    with h5py.File(path, "r") as f:
        X = f["X"][()]
        labels = f["Y"][()].astype(int)
    if not np.all(X == np.floor(X)) or X.min() < 0:
        raise ValueError(f"{path}: X is not raw counts")
    n_cells, n_genes = X.shape
    return make_anndata(X, labels, generic_names("gene", n_genes), generic_names("cell", n_cells),
                        f"{what}: {path.name} (X raw counts, labels Y; no gene or cell names in the file)")


def load_cellbench(folder: Path, protocol: str) -> ad.AnnData:
    """CellBench ``sc_<protocol>``: singlets only, ERCC spike-ins dropped, labels ``cell_line_demuxlet``."""
    counts = pd.read_csv(folder / f"sc_{protocol}.count.csv.gz", index_col=0)  # genes × cells
    meta = pd.read_csv(folder / f"sc_{protocol}.metadata.csv.gz", index_col=0)  # cells × fields
    counts = counts[meta.index]
    singlet = (meta["demuxlet_cls"] == "SNG").to_numpy()
    genes = counts.index.astype(str)
    keep_genes = ~genes.str.startswith("ERCC")
    X = counts.to_numpy().T[singlet][:, keep_genes]
    labels = meta["cell_line_demuxlet"].to_numpy()[singlet]
    source = (f"cellbench_3celllines sc_{protocol}: {int(singlet.sum())} singlets of {singlet.size} cells "
              f"(demuxlet_cls == 'SNG'), {int((~keep_genes).sum())} ERCC spike-ins dropped, "
              "labels cell_line_demuxlet")
    return make_anndata(X, labels, genes[keep_genes], meta.index[singlet], source)


def load_simulated() -> ad.AnnData:
    counts, labels = scae.simulate_counts()
    return make_anndata(counts, np.char.add("pop", labels.astype(str)), generic_names("gene", counts.shape[1]),
                        generic_names("cell", counts.shape[0]),
                        "scae.simulate_counts() with its defaults (the built-in dataset's raw counts)")


def dataset_plan(data: Path) -> list[tuple[str, list[Path], Callable[[], ad.AnnData]]]:
    """``(file name, files it needs, loader)`` for every dataset, in the order they are written."""
    pbmc = data / "scdcc_10x_pbmc" / "10X_PBMC_top2000.h5"
    bladder = data / "scdcc_mouse_bladder" / "mouse_bladder_cell_top2000.h5"
    cellbench = data / "cellbench_3celllines"
    plan = [
        ("pbmc_10x.h5ad", [pbmc], lambda: load_scdcc(pbmc, "scdcc_10x_pbmc")),
        ("mouse_bladder.h5ad", [bladder], lambda: load_scdcc(bladder, "scdcc_mouse_bladder")),
    ]
    for protocol in ("celseq2", "dropseq"):
        files = [cellbench / f"sc_{protocol}.count.csv.gz", cellbench / f"sc_{protocol}.metadata.csv.gz"]
        plan.append((f"cellbench_{protocol}.h5ad", files, lambda p=protocol: load_cellbench(cellbench, p)))
    plan.append(("simulated.h5ad", [], load_simulated))
    return plan


def summary(adata: ad.AnnData) -> dict:
    X = adata.X
    labels = adata.obs[LABEL_KEY]
    return {
        "n_cells": int(X.shape[0]),
        "n_genes": int(X.shape[1]),
        "zero_fraction": round(1.0 - X.nnz / (X.shape[0] * X.shape[1]), 4),
        "max_count": float(X.max()),
        "n_classes": int(labels.cat.categories.size),
        "class_counts": {str(k): int(v) for k, v in labels.value_counts(sort=False).items()},
        "genes_without_counts": int((X.getnnz(axis=0) == 0).sum()),
    }


def write(adata: ad.AnnData, path: Path) -> None:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the .h5ad files")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written, skipped = {}, {}
    for name, needed, load in dataset_plan(args.data):
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            log(f"skipping {name}: missing {', '.join(missing)}")
            skipped[name] = f"missing {', '.join(missing)}"
            continue
        adata = load()
        path = args.out / name
        write(adata, path)
        written[name] = {"path": str(path), **summary(adata), "source": adata.uns["source"]}
        log(f"wrote {path} ({adata.n_obs} cells × {adata.n_vars} genes)")
    print(json.dumps({"out": str(args.out), "datasets": written, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
