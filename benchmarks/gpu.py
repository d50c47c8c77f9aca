"""GPU benchmark: training throughput on a CUDA GPU next to the CPU, in memory and streamed from disk.

Usage (on a machine where PyTorch sees a CUDA GPU)::

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--cells 200000] [--genes 2000]
        [--epochs 2] [--batch-sizes 128 1024] [--workdir /tmp/scae-gpu] [--skip-cpu]

Parts, each recorded in one JSON object (stdout and ``--out``):

``in_memory``
    The built-in dataset (5,000 cells × 1,000 genes): ``ae10`` (MSE, 50 epochs, batch 128, the
    study's settings) and the recommended preset (``nb_dae`` on the simulated raw counts, early
    stopping off so both devices run every epoch) fitted on ``cuda`` and on the CPU (all of this
    machine's cores; ``--skip-cpu`` leaves the CPU out): ``fit_seconds``,
    ``train_seconds`` (the optimisation steps only) and ``train_cells_per_second``, and the
    final test MSE (the two devices start from the same weights and see the same batches).
``streamed``
    A simulated raw-count ``.h5ad`` of ``--cells`` × ``--genes`` (CSR, about 90 % zeros;
    ``benchmarks/scale.py``'s generator, cached in ``--workdir``) trained from disk by
    ``scae fit --stream --device cuda`` (``--device``) in a child process, for each of ``--batch-sizes``:
    ``ae10`` (MSE) and the recommended model, ``--epochs`` epochs. Wall time of the command,
    and the model's ``train_cells_per_second`` (the steps alone: reading, densifying, pinning and
    copying run in a background thread while the GPU trains).

The GPU name, PyTorch and CUDA versions and the CPU core count are recorded. The study itself
on a GPU is timed by ``benchmarks/study.py`` (its device is ``auto``) and at scale by
``benchmarks/scale.py --scae-args "--device cuda"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import SimParams, ensure_dataset, log  # noqa: E402  (the scale benchmark's generator)

import scae  # noqa: E402
from scae.simulate import simulate_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu.json"


def child_env() -> dict[str, str]:
    """Environment for ``python -m scae.cli`` importing the package from this checkout's src/."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def fit_in_memory(params: dict, X, test_X, device: str) -> dict:
    model = scae.Autoencoder(**{**params, "device": device})
    started = time.perf_counter()
    model.fit(X, eval_X=test_X)
    wall = time.perf_counter() - started
    return {
        "device": device,
        "wall_seconds": round(wall, 2),
        "fit_seconds": round(model.fit_seconds_, 2),
        "train_seconds": round(model.train_seconds_, 2),
        "train_cells_per_second": round(model.train_cells_per_second_),
        "epochs_run": len(model.history_) - 1,
        "final_test_mse": round(model.history_[-1]["test_mse"], 6),
    }


def in_memory(devices: list[str]) -> dict:
    """ae10 and the recommended model on the built-in dataset, on each device."""
    dataset = simulate_dataset(5000, 1000, 3, 0)
    split = 4000  # the first 4,000 cells train, the rest are the test cells
    X, counts = dataset.X, dataset.raw
    models = {
        "ae10": ({"latent_dim": 10, "hidden": (100,), "loss": "mse", "epochs": 50, "batch_size": 128,
                  "random_state": 0}, X),
        "recommended": ({**scae.Autoencoder.from_preset("recommended").get_params(), "early_stopping": False,
                         "random_state": 0}, counts),
    }
    out = {}
    for name, (params, data) in models.items():
        out[name] = []
        for device in devices:
            log(f"in memory: {name} on {device}")
            out[name].append(fit_in_memory(params, data[:split], data[split:], device))
    return out


def streamed(args: argparse.Namespace) -> dict:
    """``scae fit --stream --device cuda`` on a simulated raw-count file, per batch size."""
    path, info = ensure_dataset(args.workdir, SimParams(cells=args.cells, genes=args.genes))
    rows = []
    for batch in args.batch_sizes:
        for name, extra in (("ae10", ["--loss", "mse", "--latent", "10"]),
                            ("recommended", ["--preset", "recommended", "--no-early-stopping"])):
            model_path = args.workdir / f"{name}_b{batch}.pt"
            command = [sys.executable, "-m", "scae.cli", "fit", "--h5ad", str(path), "--label-key", "cell_type",
                       "--stream", "--device", args.device, "--epochs", str(args.epochs), "--batch-size", str(batch),
                       "--quiet", "--out", str(model_path), *extra]
            log(f"streamed: {name}, batch {batch}")
            started = time.perf_counter()
            proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
            wall = time.perf_counter() - started
            row = {"model": name, "batch_size": batch, "epochs": args.epochs, "exit": proc.returncode,
                   "wall_seconds": round(wall, 1)}
            if proc.returncode == 0:
                model = scae.Autoencoder.load(model_path)
                row.update(fit_seconds=round(model.fit_seconds_, 1), train_seconds=round(model.train_seconds_, 1),
                           train_cells_per_second=round(model.train_cells_per_second_),
                           final_test_loss=round(model.history_[-1]["test_loss"], 5))
            else:
                row["stderr"] = proc.stderr[-2000:]
            rows.append(row)
    return {"input": {k: info[k] for k in ("path", "mib", "zero_fraction", "generate_seconds") if k in info},
            "cells": args.cells, "genes": args.genes, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scae-gpu"))
    parser.add_argument("--skip-cpu", action="store_true", help="in memory: the GPU only")
    parser.add_argument("--skip-streamed", action="store_true")
    parser.add_argument("--device", default="cuda", help="the device measured (cpu: a dry run of this script)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: PyTorch sees no CUDA GPU here")
    args.workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report = {
        "benchmark": "GPU training throughput, in memory and streamed from disk",
        "scae_version": scae.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "in_memory": in_memory([args.device] if args.skip_cpu or args.device == "cpu" else [args.device, "cpu"]),
    }
    if not args.skip_streamed:
        report["streamed"] = streamed(args)
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    log(f"-> {args.out}")


if __name__ == "__main__":
    main()
