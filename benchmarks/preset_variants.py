"""Score variants of the recommended preset on the raw-count datasets: how a preset is chosen.

Usage::

    .venv/bin/python benchmarks/preset_variants.py NAME '{"epochs": 30}' [NAME '{...}' ...]
        [--datasets mouse_bladder pbmc_10x simulated] [--seeds 0 1 2]
        [--data benchmarks/results/datasets] [--out benchmarks/results/preset_variants.jsonl]

Each variant is the recommended preset (``scae.presets.preset("recommended")``) with the given
JSON object's parameters replacing its own (``'{}'``: the preset as it is). Every variant is fitted
on every dataset (the ``.h5ad`` files ``benchmarks/real_datasets.py`` writes; their raw counts,
restricted to 2,000 highly variable genes as ``scae benchmark`` does) with every seed, on one
PyTorch thread, exactly as ``scae benchmark`` fits a method (``scae.benchmark``), and its latent is
scored the same way: k-means ARI and cross-validated 15-NN label accuracy. One JSON line per
variant and dataset (means over the seeds, and the mean fit seconds) goes to stdout and is
appended to ``--out``.

This session's search (README, "Count models and the recommended model") ran::

    .venv/bin/python benchmarks/preset_variants.py base '{}' ep30 '{"epochs": 30}' \\
        noise15 '{"input_noise": 1.5}' h256 '{"hidden": [256]}' ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scae.benchmark import autoencoder_method, prepare, score_latent
from scae.data import read_h5ad
from scae.presets import preset

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="pairs: NAME JSON-OBJECT-OF-OVERRIDES")
    parser.add_argument("--datasets", nargs="+", default=["mouse_bladder", "pbmc_10x", "simulated"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", type=Path, default=HERE / "results" / "datasets")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "preset_variants.jsonl")
    args = parser.parse_args()
    if len(args.variants) % 2:
        parser.error("variants come in pairs: NAME '{json overrides}'")
    variants = {name: json.loads(text) for name, text in zip(args.variants[::2], args.variants[1::2])}
    torch.set_num_threads(1)
    datasets = {}
    for name in args.datasets:
        path = args.data / f"{name}.h5ad"
        if not path.exists():
            print(f"skipped {name}: {path} is absent (run benchmarks/real_datasets.py)", file=sys.stderr)
            continue
        datasets[name] = prepare(read_h5ad(path, "cell_type"), 2000)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for variant, overrides in variants.items():
        method = autoencoder_method(variant, {**preset("recommended"), **overrides}, counts=True, device="cpu")
        for data_name, dataset in datasets.items():
            rows = []
            for seed in args.seeds:
                started = time.perf_counter()
                latent = method.fit(dataset, seed)
                seconds = time.perf_counter() - started
                rows.append({**score_latent(np.asarray(latent, dtype=np.float32), dataset.labels, seed),
                             "fit_seconds": seconds})
            line = {"variant": variant, "overrides": overrides, "dataset": data_name, "seeds": args.seeds,
                    **{key: round(float(np.mean([r[key] for r in rows])), 4)
                       for key in ("ari", "knn_accuracy", "fit_seconds")}}
            print(json.dumps(line), flush=True)
            with args.out.open("a") as out:
                out.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
