"""Time the default study stage by stage and record its peak memory.

Usage::

    .venv/bin/python benchmarks/study.py [--out benchmarks/results/study.json] [--repeats 1]
        [--cells 5000] [--genes 1000] [--epochs 50] [--device auto]

Runs the study on the built-in dataset exactly as ``scae study`` does (all outputs written to a
temporary directory) and writes a JSON file with the wall time of each stage, the total, the
peak resident memory (of this process, and over its process tree, t-SNE workers
included, sampled every 50 ms: summed RSS, and PSS, which counts a page shared by several
processes — their common libraries — once) and the machine's core count. Target (issue 8): the default
study in at most 18 s with at most 700 MiB on 2 CPU cores; ``--assignment-only`` times it
without the fifth, recommended run (issue 7: that run adds at most 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import TreeMemorySampler  # noqa: E402  (process-tree RSS sampling, shared with the scale benchmark)

import scae  # noqa: E402
from scae.simulate import simulate_dataset
from scae.results import DEFAULT_RUNS, STUDY_RUNS
from scae.background import background_workers
from scae.study import StudyConfig, run_study


def run_once(cells: int, genes: int, epochs: int, seed: int, runs: tuple, device: str) -> dict:
    started = time.perf_counter()
    dataset = simulate_dataset(cells, genes, 3, 0)
    data_seconds = time.perf_counter() - started
    config = StudyConfig(epochs=epochs, seed=seed, progress=False, tsne_workers=background_workers(), runs=runs,
                         device=device)
    with tempfile.TemporaryDirectory() as out:
        result = run_study(dataset, out, config, data_seconds)
        sizes = {p.name: p.stat().st_size for p in Path(out).iterdir() if p.is_file()}
    total = time.perf_counter() - started
    return {
        "total_seconds": round(total, 2),
        "stages": {k: round(v, 3) for k, v in result.timings.items()},
        "output_bytes": sizes,
        "test_mse": {k: round(r.errors["test"]["mse"], 5) for k, r in result.runs.items()},
        "environment": result.environment,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/study.json"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="where the models train (auto: a GPU when there is one)")
    parser.add_argument("--assignment-only", action="store_true",
                        help="the assignment's four runs only (without the recommended fifth), to measure what it adds")
    args = parser.parse_args()
    runs = DEFAULT_RUNS if args.assignment_only else STUDY_RUNS

    sampler = TreeMemorySampler(os.getpid(), interval=0.05)  # this process and its t-SNE workers
    results = [run_once(args.cells, args.genes, args.epochs, args.seed, runs, args.device) for _ in range(args.repeats)]
    tree = sampler.stop()
    report = {
        "benchmark": "default study, stage by stage",
        "scae_version": scae.__version__,
        "cells": args.cells,
        "genes": args.genes,
        "epochs": args.epochs,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_tree_mib": tree["peak_rss_tree_mib"],
        "peak_pss_tree_mib": tree["peak_pss_tree_mib"],
        "max_processes": tree["max_processes"],
        "study_runs": [spec.name for spec in runs],
        "total_seconds": [r["total_seconds"] for r in results],
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    best = min(report["total_seconds"])
    print(f"default study: {best:.1f} s (best of {args.repeats}), peak RSS {report['peak_rss_mib']} MiB "
          f"(process tree, t-SNE workers included: {report['peak_rss_tree_mib']} MiB summed RSS, "
          f"{report['peak_pss_tree_mib']} MiB PSS) "
          f"on {report['cpu_cores']} cores, training on {results[0]['environment']['device']} -> {args.out}")
    for stage, seconds in sorted(results[0]["stages"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:45s} {seconds:7.2f} s")
    sys.exit(0)


if __name__ == "__main__":
    main()
