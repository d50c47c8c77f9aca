"""Wall time and peak memory of ``scae study`` commands as a user runs them, start-up included.

Usage::

    .venv/bin/python benchmarks/commands.py [--repeats 3] [--cases default small error]
        [--out benchmarks/results/commands.json]

Each case runs ``scae study`` in a subprocess (``python -m scae.cli``, output to a temporary
folder) ``--repeats`` times, one after the other, and records every wall time (from starting
the process to its exit: interpreter start-up, imports, the study, writing, shutdown), the
median and the minimum, and the peak memory of the process tree (summed RSS of the command and
its background workers, sampled every 0.2 s; the PSS of the tree, which counts shared library
pages once, every 2 s):

``default``
    the default study on the built-in dataset (issue 8: at most 18 s on 2 cores, 700 MiB);
``small``
    300 cells × 40 genes (a seeded file written here, 3 labels) with ``--epochs 1``: the fixed
    costs of a study (issue 8: at most 5 s);
``error``
    a missing input file (issue 8: an input error in at most 1 s; exit status 2).

``benchmarks/study.py`` times the stages of the default study inside one process instead.
The machine's load average is recorded before and after every command: other work on the
machine changes the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import run_monitored  # noqa: E402  (a command's wall time and process-tree memory)

CASES = ("default", "small", "error")


def small_input(folder: Path) -> list[str]:
    """Write the 300 × 40 log-normalised matrix and its labels; the study arguments reading them."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (300, 40)).astype(np.float32)
    counts[:100, :10] += rng.poisson(4.0, (100, 10))
    counts[100:200, 10:20] += rng.poisson(4.0, (100, 10))
    np.save(folder / "counts.npy", np.log1p(counts))
    (folder / "labels.txt").write_text("".join(f"type{i // 100}\n" for i in range(300)))
    return ["--counts", str(folder / "counts.npy"), "--labels", str(folder / "labels.txt"), "--epochs", "1"]


def case_arguments(case: str, folder: Path) -> list[str]:
    if case == "default":
        return []
    if case == "small":
        return small_input(folder)
    return ["--counts", str(folder / "missing.npy"), "--labels", str(folder / "missing.txt")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/commands.json"))
    args = parser.parse_args()

    report = {"benchmark": "scae study commands, wall time from process start to exit",
              "cpu_cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0], "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for case in args.cases:
            arguments = case_arguments(case, folder)
            runs = []
            for repeat in range(args.repeats):
                out = folder / f"{case}_{repeat}"
                command = [sys.executable, "-m", "scae.cli", "study", *arguments, "--out", str(out), "--quiet"]
                runs.append(run_monitored(command, folder / f"{case}_{repeat}"))
                print(f"{case} #{repeat + 1}: {runs[-1]['wall_seconds']} s, exit {runs[-1]['returncode']}, "
                      f"tree peak {runs[-1]['peak_rss_tree_mib']} MiB", flush=True)
            walls = [run["wall_seconds"] for run in runs]
            report["cases"][case] = {
                "arguments": arguments,
                "wall_seconds": walls,
                "median_seconds": round(statistics.median(walls), 2),
                "min_seconds": min(walls),
                "peak_rss_tree_mib": max(run["peak_rss_tree_mib"] for run in runs),
                "peak_rss_main_mib": max(run["peak_rss_main_mib"] for run in runs),
                "peak_pss_tree_mib": max(run["peak_pss_tree_mib"] for run in runs),
                "returncodes": sorted({run["returncode"] for run in runs}),
                "load_before_after": [run["load_before_after"] for run in runs],
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for case, row in report["cases"].items():
        print(f"{case}: median {row['median_seconds']} s (min {row['min_seconds']} s) over {len(row['wall_seconds'])}; "
              f"tree peak {row['peak_rss_tree_mib']} MiB (PSS {row['peak_pss_tree_mib']}), main {row['peak_rss_main_mib']} MiB")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
