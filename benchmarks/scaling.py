"""How scae's time and memory grow with the number of cells (target: usable from 5,000 to 1,000,000).

Usage::

    .venv/bin/python benchmarks/scaling.py [--cells 5000 20000 100000] [--genes 1000]
        [--budget-seconds 600] [--out benchmarks/results/scaling.json]

Each size runs in a fresh subprocess (so its peak resident memory, ``ru_maxrss``, is its own)
and measures, on ``simulate_dataset(n_cells, n_genes, 3, 0)``:

``simulate``
    Wall time of ``simulate_dataset``.
``train_epoch``
    One training epoch of ``Autoencoder(latent_dim=10)`` (the study's architecture and
    schedule) on the study's stratified 80 % of the cells with the held-out 20 % evaluated
    after the epoch, as in the study. Measured as ``fit(epochs=2)`` minus the epoch-0
    evaluation pass ``fit`` makes before training (timed separately with the same losses),
    divided by 2 (after an untimed warm-up fit on 1,024 cells, so one-time PyTorch start-up
costs are not counted). Four variants: the matrix as the study hands it over (dense here, since
    ``dense_if_small`` densifies up to 1 GiB of float32, i.e. up to 268,435 cells at 1,000
    genes) and the sparse CSR path that larger inputs take (forced by replacing
    ``scae.training.dense_if_small`` with the identity in this benchmark process only), each
    with PyTorch's default thread count and with one thread.
``study``
    ``run_study(dataset, out_dir=<tmp>, config=StudyConfig(epochs=1, progress=False))``: its
    stage timings, wall time, the size of ``results.h5ad`` and of all outputs. The study caps
    cluster scores, t-SNE and scatter plots at ``max_embed_cells`` (20,000) cells, so those
    stages should stay flat while training, prediction, PCA and writing grow with the cells.

Memory: ``peak_rss_mib`` is the subprocess's ``ru_maxrss`` (high-water mark of the whole
process) after each phase; ``phase_peak_rss_mib`` is the highest RSS sampled (every 20 ms from
``/proc/self/statm``) during that phase alone; ``phase_peak_rss_with_workers_mib`` the highest
sampled sum of this process's and its child processes' RSS (the study's t-SNE workers).
(``RUSAGE_CHILDREN`` is not used: on Linux a spawned child's ``ru_maxrss`` starts from the
parent's high-water mark at fork, so it would not show the workers' own memory.)

The parent prints a table, fits ``seconds = a + b * cells`` through the measured sizes and
extrapolates the training epoch (sparse path, as a 1,000,000-cell input would take), peak
memory and ``results.h5ad`` size to 1,000,000 cells. Those are *extrapolations*, not
measurements. With ``--budget-seconds`` (0: no limit) a size whose predicted time (from the
sizes already measured) does not fit in what is left of the budget runs without the study
stage, or is skipped; the JSON says so. The load average is recorded around every phase: other
work on the machine changes the timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1024 * 1024
EXTRAPOLATE_TO = 1_000_000


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class RSSSampler:
    """Samples resident memory every ``interval`` s: this process alone, and this process plus
    its child processes (the study's t-SNE workers). :meth:`phase` resets both peaks."""

    def __init__(self, interval: float = 0.02) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._interval = interval
        self.phase()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self, pid: str = "self") -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, IndexError, ValueError):  # the child just exited
            return 0

    def _children(self) -> list[str]:
        pids = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    pids += f.read().split()
            except OSError:
                pass
        return pids

    def _sample(self) -> None:
        own = self._rss()
        self._peak = max(self._peak, own)
        self._peak_total = max(self._peak_total, own + sum(self._rss(pid) for pid in self._children()))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def phase(self) -> None:
        self._peak = self._peak_total = 0
        self._sample()

    def peak_mib(self) -> float:
        self._sample()
        return round(self._peak / MIB, 1)

    def peak_with_children_mib(self) -> float:
        self._sample()
        return round(self._peak_total / MIB, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def ru_maxrss_mib(who=resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------
# child: one size


def time_epoch(X_train, X_test, threads: int) -> dict:
    """Seconds of one training epoch (train pass + held-out evaluation), see the module docstring."""
    import torch

    from scae.models import Autoencoder
    from scae.training import RowSource, evaluate_losses

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = Autoencoder(latent_dim=10, epochs=2, random_state=0).fit(X_train, eval_X=X_test)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()  # the epoch-0 record fit() makes before the first update
    evaluate_losses(model.net_, RowSource(X_train), ("mse",))
    evaluate_losses(model.net_, RowSource(X_test), ("mse",))
    initial_eval = time.perf_counter() - started
    per_epoch = max(fit_seconds - initial_eval, 0.0) / 2
    n_train = X_train.shape[0]
    return {
        "torch_threads": threads,
        "fit_2_epochs_seconds": round(fit_seconds, 3),
        "initial_eval_seconds": round(initial_eval, 3),
        "seconds_per_epoch": round(per_epoch, 3),
        "train_cells_per_second": round(n_train / per_epoch) if per_epoch > 0 else None,
    }


def run_child(n_cells: int, n_genes: int, skip_study: bool) -> dict:
    import scipy.sparse as sp
    import torch

    import scae.training
    from scae.data import dense_if_small, stratified_split
    from scae.simulate import simulate_dataset
    from scae.study import StudyConfig, run_study

    default_threads = torch.get_num_threads()
    sampler = RSSSampler()
    out: dict = {"cells": n_cells, "genes": n_genes, "default_torch_threads": default_threads,
                 "start_rss_mib": sampler.peak_mib()}

    load = load_average()
    sampler.phase()
    started = time.perf_counter()
    dataset = simulate_dataset(n_cells, n_genes, 3, 0)
    out["simulate"] = {
        "seconds": round(time.perf_counter() - started, 3),
        "nnz": int(dataset.X.nnz),
        "csr_mib": round((dataset.X.data.nbytes + dataset.X.indices.nbytes + dataset.X.indptr.nbytes) / MIB, 1),
        "phase_peak_rss_mib": sampler.peak_mib(),
        "peak_rss_mib": ru_maxrss_mib(),
        "load_before_after": [load, load_average()],
    }

    load = load_average()
    sampler.phase()
    started = time.perf_counter()
    X = dense_if_small(dataset.X)
    train_idx, test_idx = stratified_split(dataset.labels, 0.2, 0)
    variants = {}
    X_train, X_test = X[train_idx], X[test_idx]
    dense_input = not sp.issparse(X)
    for threads in (default_threads, 1):  # one-time costs (thread pool, first kernels) untimed
        time_epoch(X_train[:1024], X_test[:256], threads)
    variants["as_study_default_threads"] = time_epoch(X_train, X_test, default_threads)
    variants["as_study_1_thread"] = time_epoch(X_train, X_test, 1)
    del X_train, X_test, X
    gc.collect()
    S_train, S_test = dataset.X[train_idx], dataset.X[test_idx]
    real_dense_if_small = scae.training.dense_if_small
    scae.training.dense_if_small = lambda M, *args, **kwargs: M  # force the sparse (>1 GiB) path
    try:
        variants["sparse_path_default_threads"] = time_epoch(S_train, S_test, default_threads)
        variants["sparse_path_1_thread"] = time_epoch(S_train, S_test, 1)
    finally:
        scae.training.dense_if_small = real_dense_if_small
    del S_train, S_test
    gc.collect()
    torch.set_num_threads(default_threads)
    out["train_epoch"] = {
        "n_train": int(train_idx.size),
        "n_test": int(test_idx.size),
        "study_matrix_is_dense": dense_input,
        "variants": variants,
        "seconds": round(time.perf_counter() - started, 2),
        "phase_peak_rss_mib": sampler.peak_mib(),
        "peak_rss_mib": ru_maxrss_mib(),
        "load_before_after": [load, load_average()],
    }

    if skip_study:
        out["study"] = None
    else:
        load = load_average()
        sampler.phase()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="scae-scaling-") as tmp:
            result = run_study(dataset, out_dir=tmp, config=StudyConfig(epochs=1, progress=False))
            wall = time.perf_counter() - started
            files = [p for p in Path(tmp).rglob("*") if p.is_file()]
            h5ad = Path(tmp) / "results.h5ad"
            out["study"] = {
                "seconds": round(wall, 2),
                "stages": {k: round(v, 3) for k, v in result.timings.items()},
                "n_scored_cells": int(result.embed_idx.size),
                "results_h5ad_mib": round(h5ad.stat().st_size / MIB, 1),
                "all_outputs_mib": round(sum(p.stat().st_size for p in files) / MIB, 1),
                "phase_peak_rss_mib": sampler.peak_mib(),
                "peak_rss_mib": ru_maxrss_mib(),
                "phase_peak_rss_with_workers_mib": sampler.peak_with_children_mib(),
                "load_before_after": [load, load_average()],
            }
            del result
    sampler.stop()
    out["peak_rss_mib"] = ru_maxrss_mib()
    return out


# ---------------------------------------------------------------------------------------------
# parent


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares ``(a, b)`` of ``y = a + b x``; ``None`` with fewer than two points."""
    if len(xs) < 2:
        return None
    import numpy as np

    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


CAPPED_STAGES = ("tsne_start", "scores", "tsne_wait", "figures")
"""Study stages that work on the ``max_embed_cells`` sample only; the others use every cell."""
MAX_EMBED_CELLS = 20_000  # StudyConfig().max_embed_cells, checked in main()


def split_stages(stages: dict[str, float]) -> tuple[float, float]:
    """(seconds of the sample-capped stages, seconds of the all-cell stages)."""
    capped = sum(v for k, v in stages.items() if k in CAPPED_STAGES)
    return capped, sum(stages.values()) - capped


def predict_study(studied: list[dict], n: int) -> float | None:
    """Predicted study seconds at ``n`` cells: the sample-capped stages as at the largest
    measured size if that is already capped (else linear), the all-cell stages linear."""
    if not studied:
        return None
    largest = max(studied, key=lambda r: r["cells"])
    capped_pts = [(r["cells"], split_stages(r["study"]["stages"])[0]) for r in studied]
    rest_pts = [(r["cells"], split_stages(r["study"]["stages"])[1]) for r in studied]
    if largest["cells"] >= MAX_EMBED_CELLS:
        capped = split_stages(largest["study"]["stages"])[0]
    else:
        capped = predict(capped_pts, min(n, MAX_EMBED_CELLS))
    overhead = largest["study"]["seconds"] - sum(largest["study"]["stages"].values())
    return capped + predict(rest_pts, n) + max(overhead, 0.0)


def predict(points: list[tuple[int, float]], n: int) -> float | None:
    """Linear prediction at ``n``: through the origin from one point, least squares from more."""
    if not points:
        return None
    if len(points) == 1:
        return points[0][1] * n / points[0][0]
    a, b = linear_fit([p[0] for p in points], [p[1] for p in points])
    return max(a + b * n, 0.0)


def extrapolations(rows: list[dict]) -> dict:
    """Linear extrapolations to :data:`EXTRAPOLATE_TO` cells of the measured sizes (labelled as such)."""
    done = [r for r in rows if r.get("train_epoch")]
    out: dict = {"to_cells": EXTRAPOLATE_TO, "method": "least-squares line seconds = a + b * cells "
                 "through the measured sizes; an EXTRAPOLATION, not a measurement", "values": {}}
    if len(done) < 2:
        out["note"] = "fewer than two sizes measured: nothing extrapolated"
        return out
    cells = [r["cells"] for r in done]
    for variant in done[0]["train_epoch"]["variants"]:
        ys = [r["train_epoch"]["variants"][variant]["seconds_per_epoch"] for r in done]
        a, b = linear_fit(cells, ys)
        out["values"][f"train_epoch_seconds_{variant}"] = round(a + b * EXTRAPOLATE_TO, 1)
    ys = [r["train_epoch"]["phase_peak_rss_mib"] for r in done]
    a, b = linear_fit(cells, ys)
    out["values"]["training_phase_peak_rss_mib"] = round(a + b * EXTRAPOLATE_TO)
    studied = [r for r in done if r.get("study")]
    if len(studied) >= 2:
        cells_s = [r["cells"] for r in studied]
        for key in ("results_h5ad_mib", "phase_peak_rss_mib", "phase_peak_rss_with_workers_mib"):
            a, b = linear_fit(cells_s, [r["study"][key] for r in studied])
            out["values"][f"study_{key}"] = round(a + b * EXTRAPOLATE_TO, 1)
        a, b = linear_fit(cells_s, [split_stages(r["study"]["stages"])[1] for r in studied])
        out["values"]["study_all_cell_stages_seconds_epochs_1"] = round(a + b * EXTRAPOLATE_TO, 1)
        largest = max(studied, key=lambda r: r["cells"])
        if largest["cells"] >= MAX_EMBED_CELLS:
            out["values"]["study_sample_capped_stages_seconds_flat"] = round(
                split_stages(largest["study"]["stages"])[0], 1)
        out["note_memory"] = ("peak-memory lines are fitted on sizes with a dense study matrix; "
                              "above 268,435 cells (1,000 genes) the input stays CSR, but every "
                              "run's reconstruction is still a dense cells x genes float32 array")
    # The study keeps every run's reconstruction (cells x genes float32) in memory and in the h5ad.
    genes = done[0]["genes"]
    out["values"]["one_dense_float32_cells_x_genes_mib_analytic"] = round(EXTRAPOLATE_TO * genes * 4 / MIB)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[5000, 20000, 100000])
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--budget-seconds", type=float, default=600.0,
                        help="skip the study stage (or a whole size) predicted not to fit; 0: no limit")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip-study", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        args.child_out.write_text(json.dumps(run_child(args.child, args.genes, args.skip_study)))
        return

    import torch

    import scae

    began = time.perf_counter()
    rows: list[dict] = []
    from scae.study import StudyConfig

    assert StudyConfig().max_embed_cells == MAX_EMBED_CELLS, "update MAX_EMBED_CELLS"
    part_times: dict[str, list[tuple[int, float]]] = {"base": []}
    for n in sorted(args.cells):
        remaining = args.budget_seconds - (time.perf_counter() - began) if args.budget_seconds else None
        base = predict(part_times["base"], n)
        study = predict_study([r for r in rows if r.get("study")], n)
        skip_study, note = False, None
        if remaining is not None and base is not None:
            if base > remaining:
                rows.append({"cells": n, "skipped": f"predicted {base:.0f} s for simulate + training "
                             f"alone, {remaining:.0f} s of the budget left"})
                print(f"{n} cells: skipped ({rows[-1]['skipped']})", file=sys.stderr, flush=True)
                continue
            if study is not None and base + study > remaining:
                skip_study = True
                note = (f"study stage skipped: predicted {base:.0f} + {study:.0f} s (study), "
                        f"{remaining:.0f} s of the budget left")
        print(f"{n} cells{' (no study)' if skip_study else ''} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            child_out = Path(tmp) / "child.json"
            command = [sys.executable, __file__, "--child", str(n), "--genes", str(args.genes),
                       "--child-out", str(child_out)] + (["--skip-study"] if skip_study else [])
            load = load_average()
            started = time.perf_counter()
            completed = subprocess.run(command)
            wall = time.perf_counter() - started
            if completed.returncode != 0:
                rows.append({"cells": n, "failed": f"subprocess exit status {completed.returncode}",
                             "wall_seconds": round(wall, 1)})
                continue
            row = json.loads(child_out.read_text())
        row["subprocess_wall_seconds"] = round(wall, 1)
        row["load_before_after"] = [load, load_average()]
        if note:
            row["note"] = note
        rows.append(row)
        base_seconds = row["simulate"]["seconds"] + row["train_epoch"]["seconds"]
        part_times["base"].append((n, base_seconds))

    report = {
        "benchmark": "scaling with the number of cells",
        "scae_version": scae.__version__,
        "genes": args.genes,
        "cells_requested": sorted(args.cells),
        "budget_seconds": args.budget_seconds,
        "total_seconds": round(time.perf_counter() - began, 1),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sizes": rows,
        "extrapolation": extrapolations(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, args.out)


def print_table(report: dict, out: Path) -> None:
    done = [r for r in report["sizes"] if r.get("train_epoch")]
    print(f"scaling, {report['genes']} genes, {report['cpu_cores']} cores, total {report['total_seconds']} s -> {out}")
    for r in report["sizes"]:
        if not r.get("train_epoch"):
            print(f"  {r['cells']} cells: {r.get('skipped') or r.get('failed')}")
    if not done:
        return
    col = lambda r: f"{r['cells']:>10d}"  # noqa: E731
    print(f"  {'cells':46s}" + "".join(col(r) for r in done))
    line = lambda label, values: print(f"  {label:46s}" + "".join(f"{v:>10}" for v in values))  # noqa: E731
    line("load average (1 min) before", [r["load_before_after"][0][0] for r in done])
    line("simulate s", [r["simulate"]["seconds"] for r in done])
    line("simulate peak RSS MiB (phase)", [r["simulate"]["phase_peak_rss_mib"] for r in done])
    line("study matrix dense?", ["yes" if r["train_epoch"]["study_matrix_is_dense"] else "no (CSR)" for r in done])
    for variant in done[0]["train_epoch"]["variants"]:
        v = [r["train_epoch"]["variants"][variant] for r in done]
        line(f"epoch s, {variant}", [x["seconds_per_epoch"] for x in v])
        line(f"  train cells/s, {variant}", [x["train_cells_per_second"] for x in v])
    line("training phase peak RSS MiB (phase)", [r["train_epoch"]["phase_peak_rss_mib"] for r in done])
    studied = [r for r in done if r.get("study")]
    if studied:
        print("  run_study(epochs=1) stages (s):")
        print(f"  {'cells':46s}" + "".join(col(r) for r in studied))
        stages = list(dict.fromkeys(k for r in studied for k in r["study"]["stages"]))
        for stage in stages:
            line(f"  {stage}", [r["study"]["stages"].get(stage, "-") for r in studied])
        line("  = sample-capped stages (scores, t-SNE, figs)", [round(split_stages(r["study"]["stages"])[0], 2) for r in studied])
        line("  = all-cell stages (the rest)", [round(split_stages(r["study"]["stages"])[1], 2) for r in studied])
        line("  study wall s", [r["study"]["seconds"] for r in studied])
        line("  results.h5ad MiB", [r["study"]["results_h5ad_mib"] for r in studied])
        line("  all outputs MiB", [r["study"]["all_outputs_mib"] for r in studied])
        line("  study peak RSS MiB (phase)", [r["study"]["phase_peak_rss_mib"] for r in studied])
        line("  study peak RSS MiB incl. t-SNE workers", [r["study"]["phase_peak_rss_with_workers_mib"] for r in studied])
    line("subprocess peak RSS MiB (ru_maxrss)", [r["peak_rss_mib"] for r in done])
    line("subprocess wall s", [r["subprocess_wall_seconds"] for r in done])
    for r in report["sizes"]:
        if r.get("note"):
            print(f"  {r['cells']} cells: {r['note']}")
    ex = report["extrapolation"]
    if ex["values"]:
        print(f"  EXTRAPOLATION (linear fit, not measured) to {ex['to_cells']:,} cells:")
        for key, value in ex["values"].items():
            print(f"    {key:62s} {value}")
    sys.exit(0)


if __name__ == "__main__":
    main()
