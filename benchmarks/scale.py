"""Scale benchmark ("from 5,000 to 1,000,000 cells"): ``scae study`` on a large ``.h5ad`` of raw
counts, as a user runs it, next to scvi-tools' SCVI on the same file.

Usage::

    .venv/bin/python benchmarks/scale.py [--cells 100000 1000000] [--genes 2000] [--epochs 5]
        [--workdir /tmp/scae-scale] [--scae-args "--batch-size 256"] [--skip-study]
        [--scvi-python /path/to/venv-with-scvi/bin/python] [--scvi-epochs 1]
        [--seed 0] [--chunk-cells 10000] [--timeout-seconds 0] [--dense]

For each size N in ``--cells``:

``input``
    A simulated AnnData file ``<workdir>/sim_<N>x<G>_seed<S>.h5ad`` of raw integer counts
    (about 90 % zeros, CSR, or dense with ``--dense``, labels in ``obs["cell_type"]``), written chunk by chunk with h5py in
    AnnData's on-disk format, never dense and in memory proportional to ``--chunk-cells`` (plus
    the cell names and labels, ~70 bytes a cell). Eight populations with differential expression
    on 10 % of the genes each, gamma-distributed gene means, log-normal library sizes and
    negative-binomial counts with gene-wise dispersion (sampled exactly, by drawing which entries
    are non-zero first and inverting the CDF for those only). The file is reused when its side
    file ``<name>.json`` records the same parameters; ``generate_seconds`` is then the time
    recorded when it was made. The data lives in ``--workdir`` (default ``/tmp/scae-scale``),
    never in the repository.
``study``
    ``scae study --h5ad FILE --label-key cell_type --out <workdir>/study_<N> --epochs E --quiet``
    (plus ``--scae-args``) in a subprocess: wall time, exit status, and the peak resident memory
    of the whole process tree (the study and its t-SNE workers: VmRSS summed over the process
    and all its descendants, found through ``/proc/<pid>/task/*/children``, sampled every 0.2 s;
    pages shared between processes count once per process). From ``metrics.json``: each run's
    ``runs[name]["train_cells_per_second"]`` and ``runs[name]["timings"]["fit_seconds"]`` (either
    may be absent; the throughput is looked up in ``runs[name]`` and in ``runs[name]["timings"]``),
    the stage timings, and the size of every output file. ae10's
    ``train_cells_per_second`` is the training throughput from disk at this size.
``h5ad_outputs``
    Whether ``results.h5ad`` (and any other ``.h5ad`` the study wrote) opens with
    ``anndata.read_h5ad(path, backed="r")`` (and scanpy's, if installed), in a subprocess with
    the same memory sampling. Backed mode still loads
    ``layers``, ``obsm`` etc. into memory, so the check is skipped (and says why) when those
    need more than half the available memory.
``scvi``
    If ``--scvi-python`` (default: this interpreter) can import scvi-tools: in a subprocess,
    ``anndata.read_h5ad(FILE)``, ``SCVI.setup_anndata`` (counts in X), ``SCVI(adata,
    n_latent=10)``, ``train(max_epochs=K, accelerator="cpu")`` (scvi's defaults otherwise: batch
    128, 90 % training split, no validation pass). ``cells_per_second`` = cells in scvi's
    training split x K / wall seconds of ``train()`` (includes its set-up);
    ``epoch_cells_per_second`` uses the epochs' own time (a Lightning callback) instead.
    ``ae10_over_scvi`` = scae ae10 ``train_cells_per_second`` / SCVI ``cells_per_second``.

Progress goes to stderr; one JSON object goes to stdout and to ``benchmarks/results/scale.json``.
Other work on the machine changes the timings (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "scale.json"
DEFAULT_WORKDIR = Path("/tmp/scae-scale")
LABEL_KEY = "cell_type"
H5_CHUNK = 1 << 16  # elements per HDF5 chunk of X/data and X/indices (256 KiB)
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# subprocesses with process-tree memory sampling


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):  # exited meanwhile
        return 0


def _pss_bytes(pid: int) -> int:
    """Proportional set size: resident pages, each shared page divided among the processes that
    map it (shared libraries counted once over a process tree, unlike summed RSS)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):  # exited meanwhile, or no smaps_rollup (Linux < 4.14)
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (as far as /proc shows them right now)."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        queue += _children(pid)
    return pids


class TreeMemorySampler:
    """Samples the summed RSS and PSS of a process tree every ``interval`` seconds in a thread."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.peak_tree = self.peak_root = self.peak_pss_tree = self._samples = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._interval = interval
        self._thread.start()

    def _sample(self) -> None:
        pids = process_tree(self.root)
        sizes = [_rss_bytes(pid) for pid in pids]
        self.peak_root = max(self.peak_root, sizes[0])
        self.peak_tree = max(self.peak_tree, sum(sizes))
        self._samples += 1
        if self._samples % 10 == 1:  # reading smaps_rollup walks the page tables: 10× rarer than RSS
            self.peak_pss_tree = max(self.peak_pss_tree, sum(_pss_bytes(pid) for pid in pids))
        self.max_processes = max(self.max_processes, len(pids))

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self._interval):
                return

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_tree_mib": round(self.peak_tree / MIB, 1),
            "peak_rss_main_mib": round(self.peak_root / MIB, 1),
            "peak_pss_tree_mib": round(self.peak_pss_tree / MIB, 1),
            "max_processes": self.max_processes,
        }


def tail(path: Path, lines: int = 20) -> list[str]:
    with open(path, errors="replace") as f:
        return list(deque((line.rstrip("\n") for line in f), maxlen=lines))


def run_monitored(command: list[str], log_stem: Path, timeout: float | None = None) -> dict:
    """Run ``command`` with stdout/stderr to ``<log_stem>.out/.err``; wall time, exit status and
    peak memory of its process tree (plus the last stderr lines when it fails)."""
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    load = load_average()
    started = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True)
        sampler = TreeMemorySampler(proc.pid)
        timed_out = False
        try:
            proc.wait(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # the session this benchmark started for the command
            proc.wait()
        memory = sampler.stop()
    result = {
        "command": shlex.join(command),
        "returncode": proc.returncode,
        "wall_seconds": round(time.perf_counter() - started, 2),
        **memory,
        "load_before_after": [load, load_average()],
        "stdout_log": str(out_path),
        "stderr_log": str(err_path),
    }
    if timed_out:
        result["timed_out_after_seconds"] = timeout
    if proc.returncode != 0:
        result["stderr_tail"] = tail(err_path)
    return result


# ---------------------------------------------------------------------------------------------
# simulated counts


@dataclass(frozen=True)
class SimParams:
    """Everything that determines the simulated file (its cache key)."""

    cells: int
    genes: int = 2000
    populations: int = 8
    seed: int = 0
    chunk_cells: int = 10_000
    mean_count: float = 0.16
    """Mean of the gamma-distributed baseline gene means (counts at library size factor 1)."""
    gene_mean_shape: float = 0.15
    de_fraction: float = 0.1
    """Fraction of the genes differentially expressed in each population."""
    de_log_fold: float = 1.5
    library_sigma: float = 0.4
    dispersion: float = 0.3
    """Median negative-binomial dispersion (variance = mu + dispersion * mu^2)."""
    version: int = 1
    """Bump when the generator changes, so cached files are remade."""
    dense: bool = False
    """Store X as a dense 2-D array (as anndata writes a dense X) instead of CSR: the same counts."""

    @property
    def name(self) -> str:
        return f"sim_{self.cells}x{self.genes}_seed{self.seed}" + ("_dense" if self.dense else "")


@dataclass
class Population:
    proportions: np.ndarray  # (K,)
    means: np.ndarray  # (K, G) float32
    dispersion: np.ndarray  # (G,) float32


def make_populations(rng: np.random.Generator, p: SimParams) -> Population:
    """Baseline gene means, per-population differential expression, gene-wise dispersion."""
    base = rng.gamma(p.gene_mean_shape, p.mean_count / p.gene_mean_shape, size=p.genes)
    means = np.tile(base, (p.populations, 1))
    n_de = max(1, int(round(p.de_fraction * p.genes)))
    for k in range(p.populations):
        genes = rng.choice(p.genes, size=n_de, replace=False)
        direction = rng.choice([-1.0, 1.0], size=n_de)
        means[k, genes] *= np.exp(direction * p.de_log_fold + rng.normal(0, 0.5, size=n_de))
    proportions = rng.dirichlet(np.full(p.populations, 5.0))
    dispersion = p.dispersion * np.exp(rng.normal(0, 0.5, size=p.genes))
    return Population(proportions, means.astype(np.float32), dispersion.astype(np.float32))


def nb_nonzero_values(mu: np.ndarray, e: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Negative-binomial counts (mean ``mu``, size ``r``) of entries known to be non-zero.

    The uniform draw of each entry is ``u = exp(-e)`` (``e`` standard exponential, with
    ``u > P(0)``); the count is the smallest k with ``CDF(k) >= u``, found by walking the
    pmf recursion for all entries at once and dropping the finished ones.
    """
    u = np.exp(-e)
    q = mu / (mu + r)
    pmf = np.exp(-r * np.log1p(mu / r))  # P(0)
    cdf = pmf.copy()
    values = np.zeros(mu.size, np.float32)
    todo = np.arange(mu.size)
    k = 0
    while todo.size:
        k += 1
        pmf *= (k - 1 + r) / k * q
        cdf += pmf
        # the second test ends the float32 walk where the CDF can no longer grow
        done = (u <= cdf) | ((pmf <= cdf * 1e-7) & (k > mu))
        values[todo[done]] = k
        keep = ~done
        todo, pmf, cdf, u, q, mu, r = (a[keep] for a in (todo, pmf, cdf, u, q, mu, r))
    return values


class ChunkSampler:
    """Draws cells chunk by chunk into reused buffers; returns each chunk as CSR parts."""

    def __init__(self, pops: Population, chunk_cells: int) -> None:
        self.pops = pops
        genes = pops.means.shape[1]
        self.size = pops.dispersion ** -1  # NB size r = 1 / dispersion, per gene
        self.mu = np.empty((chunk_cells, genes), np.float32)
        self.threshold = np.empty_like(self.mu)
        self.exp = np.empty_like(self.mu)
        self.mask = np.empty(self.mu.shape, bool)

    def sample(self, rng: np.random.Generator, n: int, library_sigma: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(labels, counts per row, column indices, values) of ``n`` new cells."""
        labels = rng.choice(len(self.pops.proportions), size=n, p=self.pops.proportions)
        library = rng.lognormal(0.0, library_sigma, size=n).astype(np.float32)
        mu, thr, e, mask = self.mu[:n], self.threshold[:n], self.exp[:n], self.mask[:n]
        np.take(self.pops.means, labels, axis=0, out=mu)
        mu *= library[:, None]
        # entry is non-zero  <=>  u > P(0) = (1 + mu / r)^(-r)  <=>  e < r * log(1 + mu / r)
        np.divide(mu, self.size, out=thr)
        np.log1p(thr, out=thr)
        thr *= self.size
        rng.standard_exponential(out=e, dtype=np.float32)
        np.less(e, thr, out=mask)
        flat = np.flatnonzero(mask)  # row-major: already in CSR order
        genes = mu.shape[1]
        rows, cols = np.divmod(flat, genes)
        values = nb_nonzero_values(mu.ravel()[flat], e.ravel()[flat], self.size[cols])
        return labels, np.bincount(rows, minlength=n), cols.astype(np.int32), values


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize((start + values.size,))
    dataset[start:] = values


def write_counts_h5ad(path: Path, p: SimParams) -> dict:
    """Write the simulated counts to ``path``; returns nnz, zero fraction and the count stats."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(p.seed)
    pops = make_populations(rng, p)
    sampler = ChunkSampler(pops, min(p.chunk_cells, p.cells))
    codes = np.empty(p.cells, np.int8)
    total_counts = 0.0
    max_count = 0.0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        if p.dense:  # one contiguous float32 array, as anndata writes a dense X
            X = f.create_dataset("X", (p.cells, p.genes), np.float32)
            X.attrs["encoding-type"] = "array"
            X.attrs["encoding-version"] = "0.2.0"
        else:
            X = f.create_group("X")
            X.attrs["encoding-type"] = "csr_matrix"
            X.attrs["encoding-version"] = "0.1.0"
            X.attrs["shape"] = np.array([p.cells, p.genes], dtype=np.int64)
            data = X.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(H5_CHUNK,))
            indices = X.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(H5_CHUNK,))
            indptr = X.create_dataset("indptr", (p.cells + 1,), np.int64)
            indptr[0] = 0
        nnz = 0
        for start in range(0, p.cells, p.chunk_cells):
            n = min(p.chunk_cells, p.cells - start)
            labels, row_nnz, cols, values = sampler.sample(rng, n, p.library_sigma)
            codes[start:start + n] = labels
            if p.dense:
                block = np.zeros((n, p.genes), np.float32)
                block[np.repeat(np.arange(n), row_nnz), cols] = values
                X[start:start + n] = block
            else:
                indptr[start + 1:start + n + 1] = nnz + np.cumsum(row_nnz)
                _append(indices, cols)
                _append(data, values)
            nnz += values.size
            total_counts += float(values.sum(dtype=np.float64))
            max_count = max(max_count, float(values.max(initial=0)))
            if (start // p.chunk_cells) % 10 == 9:
                log(f"  {start + n:,} / {p.cells:,} cells")
        categories = [f"population_{k}" for k in range(p.populations)]
        obs = pd.DataFrame(
            {LABEL_KEY: pd.Categorical.from_codes(codes, categories)},
            index=pd.Index([f"cell_{i:07d}" for i in range(p.cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"gene_{j:05d}" for j in range(p.genes)]))
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        ad.io.write_elem(f, "uns", {"scale_simulation": json.dumps(asdict(p))})
    entries = p.cells * p.genes
    return {
        "nnz": nnz,
        "zero_fraction": round(1 - nnz / entries, 4),
        "mean_counts_per_cell": round(total_counts / p.cells, 1),
        "max_count": int(max_count),
        "population_sizes": np.bincount(codes, minlength=p.populations).tolist(),
    }


def ensure_dataset(workdir: Path, p: SimParams) -> tuple[Path, dict]:
    """The simulated file for ``p``, made unless a matching one is cached; and its description."""
    path = workdir / f"{p.name}.h5ad"
    side = workdir / f"{p.name}.json"
    if path.exists() and side.exists():
        info = json.loads(side.read_text())
        if info.get("params") == asdict(p) and info.get("bytes") == path.stat().st_size:
            log(f"reusing {path}")
            return path, {**info, "cached": True}
    log(f"writing {path} ({p.cells:,} cells x {p.genes:,} genes)")
    partial = path.with_suffix(".h5ad.partial")
    sampler = TreeMemorySampler(os.getpid())
    started = time.perf_counter()
    stats = write_counts_h5ad(partial, p)
    seconds = time.perf_counter() - started
    memory = sampler.stop()
    os.replace(partial, path)
    info = {
        "params": asdict(p),
        "path": str(path),
        "bytes": path.stat().st_size,
        "mib": round(path.stat().st_size / MIB, 1),
        "generate_seconds": round(seconds, 2),
        "generate_seconds_per_100k_cells": round(seconds * 100_000 / p.cells, 2),
        "generate_peak_rss_mib": memory["peak_rss_main_mib"],  # this whole process, sampled
        **stats,
    }
    side.write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {info['mib']} MiB in {seconds:.1f} s, {info['zero_fraction']:.1%} zeros")
    return path, {**info, "cached": False}


# ---------------------------------------------------------------------------------------------
# scae study


def scae_executable(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).with_name("scae")
    return str(beside) if beside.exists() else (shutil.which("scae") or "scae")


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def summarize_metrics(metrics: dict, epochs: int) -> dict:
    """Per-run throughput and fit time, the split and stage timings from ``metrics.json``."""
    n_train = metrics.get("split", {}).get("n_train")
    runs = {}
    for name, run in metrics.get("runs", {}).items():
        timings = run.get("timings", {})
        fit = timings.get("fit_seconds")
        runs[name] = {  # the throughput key may sit in the run or in its timings
            "train_cells_per_second": run.get("train_cells_per_second", timings.get("train_cells_per_second")),
            "train_seconds": timings.get("train_seconds"),
            "fit_seconds": fit,
            # n_train x epochs / fit_seconds; fit_seconds also holds the per-epoch evaluations
            "n_train_x_epochs_per_fit_second": round(n_train * epochs / fit) if n_train and fit else None,
        }
    return {"split": metrics.get("split"), "runs": runs, "stage_timings": metrics.get("timings")}


def run_study(exe: str, h5ad: Path, out_dir: Path, epochs: int, extra: list[str],
              timeout: float | None) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    command = [exe, "study", "--h5ad", str(h5ad), "--label-key", LABEL_KEY, "--out", str(out_dir),
               "--epochs", str(epochs), "--quiet", *extra]
    log(f"  {shlex.join(command)}")
    result = run_monitored(command, out_dir.with_name(out_dir.name + "_log"), timeout)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        result.update(summarize_metrics(json.loads(metrics_path.read_text()), epochs))
    if out_dir.exists():
        sizes = file_sizes(out_dir)
        result["output_bytes"] = sizes
        result["output_total_mib"] = round(sum(sizes.values()) / MIB, 1)
    return result


CHECK_H5AD = r"""
import json, sys, time
path, out = sys.argv[1], sys.argv[2]
report = {}
def attempt(name, read):
    started = time.perf_counter()
    try:
        a = read()
        report[name] = {"ok": True, "seconds": round(time.perf_counter() - started, 2),
                        "shape": list(a.shape), "layers": list(a.layers.keys()),
                        "obsm": list(a.obsm.keys()), "obs_columns": list(a.obs.columns)}
        a.file.close()
    except Exception as err:
        report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
import anndata
attempt("anndata_backed_r", lambda: anndata.read_h5ad(path, backed="r"))
try:
    import scanpy
except ImportError:
    report["scanpy_backed_r"] = {"skipped": "scanpy not installed"}
else:
    attempt("scanpy_backed_r", lambda: scanpy.read_h5ad(path, backed="r"))
open(out, "w").write(json.dumps(report))
"""


def in_memory_bytes_when_backed(path: Path) -> int:
    """Bytes of every dataset outside ``X`` (and ``raw/X``): what backed mode reads into memory."""
    total = 0

    def visit(name: str, obj) -> None:
        nonlocal total
        if isinstance(obj, h5py.Dataset) and not (name.startswith("X/") or name.startswith("raw/X/")):
            total += obj.size * obj.dtype.itemsize

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return total


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_h5ad(path: Path, log_stem: Path, timeout: float | None) -> dict:
    """Open ``path`` backed with anndata (and scanpy) in a monitored subprocess."""
    needed = in_memory_bytes_when_backed(path)
    result: dict = {"bytes": path.stat().st_size, "non_X_mib_loaded_by_backed_mode": round(needed / MIB, 1)}
    if needed > available_memory_bytes() / 2:
        result["skipped"] = (f"backed mode would read {needed / MIB:,.0f} MiB (layers, obsm, ...) "
                             "into memory: more than half the available memory")
        return result
    report_path = log_stem.with_suffix(".json")
    report_path.unlink(missing_ok=True)
    run = run_monitored([sys.executable, "-c", CHECK_H5AD, str(path), str(report_path)], log_stem, timeout)
    if report_path.exists():
        result.update(json.loads(report_path.read_text()))
    result.update({k: run[k] for k in ("returncode", "wall_seconds", "peak_rss_tree_mib")})
    if "stderr_tail" in run:
        result["stderr_tail"] = run["stderr_tail"]
    return result


def check_h5ad_outputs(out_dir: Path, timeout: float | None) -> dict[str, dict]:
    """:func:`check_h5ad` for ``results.h5ad`` (noted when missing) and any other ``.h5ad`` output."""
    checks: dict[str, dict] = {"results.h5ad": {"skipped": "not written"}}
    for path in sorted(out_dir.glob("*.h5ad")) if out_dir.exists() else []:
        checks[path.name] = check_h5ad(path, out_dir.with_name(f"{out_dir.name}_check_{path.stem}"), timeout)
    return checks


# ---------------------------------------------------------------------------------------------
# SCVI peer


SCVI_SCRIPT = r"""
import json, math, sys, time
path, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import anndata, scvi, torch
from lightning.pytorch.callbacks import Callback

class EpochTimer(Callback):
    def __init__(self):
        self.seconds = []
    def on_train_epoch_start(self, trainer, module):
        self._started = time.perf_counter()
    def on_train_epoch_end(self, trainer, module):
        self.seconds.append(time.perf_counter() - self._started)

started = time.perf_counter()
adata = anndata.read_h5ad(path)
load_seconds = time.perf_counter() - started
scvi.model.SCVI.setup_anndata(adata)
model = scvi.model.SCVI(adata, n_latent=10)
timer = EpochTimer()
started = time.perf_counter()
model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
            callbacks=[timer])
train_seconds = time.perf_counter() - started
indices = getattr(model, "train_indices", None)
n_train = len(indices) if indices is not None else math.ceil(0.9 * adata.n_obs)
json.dump({
    "scvi_version": scvi.__version__, "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(), "n_cells": adata.n_obs,
    "n_train": n_train, "n_train_source": "model.train_indices" if indices is not None else "ceil(0.9 n)",
    "epochs": epochs, "load_seconds": round(load_seconds, 2),
    "train_seconds": round(train_seconds, 2), "epoch_seconds": [round(s, 2) for s in timer.seconds],
    "cells_per_second": round(n_train * epochs / train_seconds),
    "epoch_cells_per_second": round(n_train * len(timer.seconds) / sum(timer.seconds)) if timer.seconds else None,
}, open(out, "w"))
"""


def scvi_available(python: str) -> str | None:
    """scvi-tools' version under ``python``, or ``None`` when it does not import."""
    try:
        done = subprocess.run([python, "-c", "import scvi; print(scvi.__version__)"],
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def run_scvi(python: str, h5ad: Path, epochs: int, workdir: Path, timeout: float | None) -> dict:
    stem = workdir / f"scvi_{h5ad.stem}"
    out = stem.with_suffix(".json")
    out.unlink(missing_ok=True)
    log(f"  SCVI, {epochs} epoch(s), {python}")
    run = run_monitored([python, "-c", SCVI_SCRIPT, str(h5ad), str(epochs), str(out)], stem, timeout)
    run["command"] = f"{python} -c <SCVI_SCRIPT> {h5ad} {epochs} {out}"
    if out.exists():
        run.update(json.loads(out.read_text()))
    return run


# ---------------------------------------------------------------------------------------------
# main


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def benchmark_size(n: int, args: argparse.Namespace, scvi_version: str | None) -> dict:
    params = SimParams(cells=n, genes=args.genes, seed=args.seed, chunk_cells=args.chunk_cells, dense=args.dense)
    path, info = ensure_dataset(args.workdir, params)
    row: dict = {"cells": n, "input": info}
    timeout = args.timeout_seconds or None
    if not args.skip_study:
        out_dir = args.workdir / f"study_{n}"
        log(f"{n:,} cells: scae study")
        study = run_study(scae_executable(args.scae), path, out_dir, args.epochs,
                          shlex.split(args.scae_args), timeout)
        study["input_bytes"] = info["bytes"]
        study["h5ad_outputs"] = check_h5ad_outputs(out_dir, timeout)
        row["study"] = study
        log(f"  exit {study['returncode']}, {study['wall_seconds']} s, "
            f"peak RSS (tree) {study['peak_rss_tree_mib']} MiB")
    if scvi_version is None:
        row["scvi"] = {"skipped": "scvi-tools not installed", "python": args.scvi_python}
    else:
        row["scvi"] = run_scvi(args.scvi_python, path, args.scvi_epochs, args.workdir, timeout)
        log(f"  SCVI exit {row['scvi']['returncode']}: {row['scvi'].get('cells_per_second')} cells/s")
    ae10 = row.get("study", {}).get("runs", {}).get("ae10", {}).get("train_cells_per_second")
    row["ae10_over_scvi"] = ratio(ae10, row["scvi"].get("cells_per_second"))
    row["ae10_over_scvi_epoch_time"] = ratio(ae10, row["scvi"].get("epoch_cells_per_second"))
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5, help="scae study --epochs")
    parser.add_argument("--scae-args", default="", help="extra arguments for scae study (one string)")
    parser.add_argument("--scae", help="the scae executable (default: the one beside this Python)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="data files and study outputs (keep it outside the repository)")
    parser.add_argument("--scvi-python", default=sys.executable,
                        help="Python interpreter with scvi-tools (default: this one)")
    parser.add_argument("--scvi-epochs", type=int, default=1)
    parser.add_argument("--skip-study", action="store_true", help="only generate data (and run SCVI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-cells", type=int, default=10_000, help="cells generated per chunk")
    parser.add_argument("--dense", action="store_true",
                        help="store X dense (streamed by row ranges) instead of CSR: the same counts")
    parser.add_argument("--timeout-seconds", type=float, default=0, help="per subprocess; 0: none")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    if args.workdir.is_relative_to(REPO):
        parser.error(f"--workdir {args.workdir} is inside the repository; the data files are large")
    return args


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    scvi_version = scvi_available(args.scvi_python)
    log(f"scvi-tools under {args.scvi_python}: {scvi_version or 'not installed'}")
    sizes = [benchmark_size(n, args, scvi_version) for n in args.cells]
    report = {
        "benchmark": "scale: scae study on a large raw-count h5ad, and SCVI on the same file",
        "scae_version": _scae_version(),
        "cells": args.cells,
        "genes": args.genes,
        "epochs": args.epochs,
        "scae_args": args.scae_args,
        "scvi_epochs": args.scvi_epochs,
        "scvi_version": scvi_version,
        "workdir": str(args.workdir),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "total_seconds": round(time.perf_counter() - began, 1),
        "sizes": sizes,
    }
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    log(f"-> {args.out}")


def _scae_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("scae")
    except Exception:
        return None


if __name__ == "__main__":
    main()
