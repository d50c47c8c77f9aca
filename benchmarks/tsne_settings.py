"""Compare scae's t-SNE settings with openTSNE's defaults: time, KL divergence, neighbourhoods.

Usage::

    .venv/bin/python benchmarks/tsne_settings.py [--cells 5000] [--out benchmarks/results/tsne_settings.json]

On the built-in dataset (``simulate_dataset`` with ``--cells`` cells), an
``Autoencoder(latent_dim=10, epochs=50, random_state=0)`` is fitted on all cells (with one
PyTorch thread, which only affects how long the preparation takes). For three
matrices -- the original (log-normalized) matrix, the autoencoder's 10-D latent and its
reconstruction -- the t-SNE input ``tsne_input(M)`` (top 50 PCs above 50 columns, else ``M``)
is computed once, and two t-SNE runs on it are compared, both single-threaded
(``threadpool_limits(1)``, ``n_jobs=1``) and seeded 0:

``opentsne_default``
    ``openTSNE.TSNE(n_jobs=1, random_state=0).fit(Z)``: 250 early-exaggeration + 500
    iterations with openTSNE's default neighbour search ("auto": Annoy at >= 1000 cells) and
    gradient method ("auto": Barnes-Hut with theta 0.5 below 10,000 cells, FFT above),
    momentum 0.8 in both phases.
``scae``
    ``scae.embeddings.tsne_coordinates(Z, 0, TSNEConfig(), n_jobs=1)`` (250 + 250 iterations,
    see :class:`scae.embeddings.TSNEConfig`). ``tsne_input`` of an at most 50-column matrix is
    the matrix itself, so both runs embed exactly the same ``Z`` and the timing of both covers
    neighbour search, affinities, initialisation and optimisation only.

How the KL divergence is obtained
---------------------------------
``tsne_coordinates`` returns coordinates only. To read openTSNE's own KL for scae's settings
the embedding is computed once more with ``scae.embeddings.tsne_embedding`` (which
``tsne_coordinates`` wraps, and which returns the ``TSNEEmbedding``); its coordinates are checked to be
identical to those ``tsne_coordinates`` returned (``scae_replica_identical`` in the JSON), so
its ``.kl_divergence`` belongs to the embedding that was timed. Three KL numbers are reported:

``kl_reported``
    ``TSNEEmbedding.kl_divergence`` after the last iteration: openTSNE's value, evaluated with
    the final phase's *approximate* normalisation (Barnes-Hut with that run's theta, or FFT).
    The two runs use different approximations (theta 0.5 vs 0.8), so small differences in this
    number are partly approximation error.
``kl_exact``
    The exact KL(P || Q) of the final coordinates against the run's own affinities ``P``
    (``embedding.affinities.P``, symmetric, summing to 1): ``sum p_ij log(p_ij / q_ij)`` over
    the nonzero ``p_ij``, with ``q_ij = w_ij / Z``, ``w_ij = 1 / (1 + |y_i - y_j|^2)`` and
    ``Z = sum_{i != j} w_ij`` summed exactly over all pairs (in blocks of rows).
``kl_exact_common_p``
    The same exact KL but against one common ``P`` for both runs: the perplexity-30 affinities
    from *exact* nearest neighbours (scae's ``P`` below 10,000 cells; openTSNE's default run
    uses Annoy neighbours, i.e. a slightly different ``P``). This is the like-for-like number.

Neighbourhoods
--------------
``knn_preservation``: for each cell, the fraction of its 15 nearest neighbours in the t-SNE
input ``Z`` (Euclidean, the cell itself excluded) that are also among its 15 nearest neighbours
in the 2-D embedding; mean over cells. ``knn_accuracy``: 5-fold stratified (shuffled, seed 0)
cross-validated accuracy of a 10-nearest-neighbour classifier of the population labels in 2-D
(``input_knn_accuracy``: the same classifier on ``Z`` itself, for reference).

Nothing is asserted; the numbers are measured and written to a JSON file. The machine's load
average is recorded before and after every run, since other work on the machine changes the
timings.
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
import openTSNE
import torch
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from threadpoolctl import threadpool_limits

import scae
from scae.data import dense_if_small
from scae.embeddings import TSNEConfig, tsne_coordinates, tsne_embedding, tsne_input
from scae.models import Autoencoder
from scae.simulate import simulate_dataset

N_NEIGHBORS_PRESERVED = 15
N_NEIGHBORS_CLASSIFIER = 10


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def exact_kl(P, Y: np.ndarray, block: int = 1000) -> float:
    """Exact KL(P || Q) of embedding ``Y`` (t-SNE's Cauchy kernel) for sparse affinities ``P``."""
    Y = np.asarray(Y, dtype=np.float64)
    P = P.tocoo()
    p = P.data / P.data.sum()
    mask = p > 0
    rows, cols, p = P.row[mask], P.col[mask], p[mask]
    sq_norms = (Y**2).sum(axis=1)
    Z = 0.0
    for start in range(0, Y.shape[0], block):
        Yb = Y[start : start + block]
        d2 = sq_norms[start : start + block, None] + sq_norms[None, :] - 2.0 * Yb @ Y.T
        np.maximum(d2, 0.0, out=d2)
        Z += (1.0 / (1.0 + d2)).sum() - Yb.shape[0]  # minus the diagonal (w_ii = 1)
    d2_pairs = ((Y[rows] - Y[cols]) ** 2).sum(axis=1)
    log_q = -np.log1p(d2_pairs) - np.log(Z)
    return float(np.sum(p * (np.log(p) - log_q)))


def neighbour_sets(X: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's ``k`` nearest neighbours (exact, Euclidean, the row itself excluded)."""
    return NearestNeighbors(n_neighbors=k).fit(X).kneighbors(return_distance=False)


def knn_preservation(high: np.ndarray, Y: np.ndarray, k: int = N_NEIGHBORS_PRESERVED) -> float:
    """Mean fraction of each cell's ``k`` nearest neighbours in ``high`` kept among its ``k`` in ``Y``."""
    a = neighbour_sets(high, k)
    b = neighbour_sets(Y, k)
    shared = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(shared / k))


def knn_accuracy(X: np.ndarray, labels: np.ndarray, k: int = N_NEIGHBORS_CLASSIFIER) -> float:
    """5-fold stratified CV accuracy of a ``k``-NN classifier of ``labels`` on ``X``."""
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(np.mean(cross_val_score(KNeighborsClassifier(n_neighbors=k), X, labels, cv=cv)))


def evaluate(embedding, Z: np.ndarray, labels: np.ndarray, common_P) -> dict:
    Y = np.asarray(embedding, dtype=np.float64)
    return {
        "kl_reported": round(float(embedding.kl_divergence), 5),
        "kl_exact": round(exact_kl(embedding.affinities.P, Y), 5),
        "kl_exact_common_p": round(exact_kl(common_P, Y), 5),
        "knn_preservation": round(knn_preservation(Z, Y), 4),
        "knn_accuracy": round(knn_accuracy(Y, labels), 4),
    }


def compare(name: str, M, labels: np.ndarray) -> dict:
    """Both t-SNE runs on ``tsne_input(M)``, timed, then scored (scoring is not timed)."""
    with threadpool_limits(1):
        Z = tsne_input(M, 0)
        n = Z.shape[0]
        common = openTSNE.affinity.PerplexityBasedNN(
            Z, perplexity=min(30.0, max(1.0, (n - 1) / 3.0)), method="exact", n_jobs=1, random_state=0
        )
        out: dict = {"input_dims": int(M.shape[1]), "tsne_input_dims": int(Z.shape[1])}

        load_before = load_average()
        started = time.perf_counter()
        default = openTSNE.TSNE(n_jobs=1, random_state=0).fit(Z)
        default_seconds = time.perf_counter() - started
        load_after = load_average()
        out["opentsne_default"] = {
            "seconds": round(default_seconds, 2),
            "load_before_after": [load_before, load_after],
            **evaluate(default, Z, labels, common.P),
        }
        print(f"  {name}: openTSNE default {default_seconds:.1f} s", file=sys.stderr, flush=True)

        load_before = load_average()
        started = time.perf_counter()
        coords = tsne_coordinates(Z, 0, TSNEConfig(), n_jobs=1)
        scae_seconds = time.perf_counter() - started
        load_mid = load_average()
        started = time.perf_counter()
        replica = tsne_embedding(Z, 0, TSNEConfig(), n_jobs=1)
        replica_seconds = time.perf_counter() - started
        load_after = load_average()
        out["scae"] = {
            "seconds": round(scae_seconds, 2),
            "seconds_replica_run": round(replica_seconds, 2),
            "load_before_mid_after": [load_before, load_mid, load_after],
            "scae_replica_identical": bool(np.array_equal(coords, np.asarray(replica, dtype=np.float32))),
            **evaluate(replica, Z, labels, common.P),
        }
        print(f"  {name}: scae {scae_seconds:.1f} s (replica {replica_seconds:.1f} s)", file=sys.stderr, flush=True)
        out["input_knn_accuracy"] = round(knn_accuracy(Z, labels), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tsne_settings.json"))
    args = parser.parse_args()

    load_start = load_average()
    dataset = simulate_dataset(args.cells)
    X = dense_if_small(dataset.X)
    labels = dataset.labels
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # only to prepare the inputs: 1 thread is far faster on a busy machine
    started = time.perf_counter()
    model = Autoencoder(latent_dim=10, epochs=50, random_state=0).fit(X)
    train_seconds = time.perf_counter() - started
    latent, reconstruction = model.transform_and_reconstruct(X)
    torch.set_num_threads(default_threads)
    print(f"autoencoder trained in {train_seconds:.1f} s", file=sys.stderr, flush=True)

    inputs = {"original": X, "ae10_latent": latent, "ae10_reconstruction": reconstruction}
    results = {name: compare(name, M, labels) for name, M in inputs.items()}

    config = TSNEConfig()
    report = {
        "benchmark": "t-SNE: openTSNE defaults vs scae's TSNEConfig, single-threaded",
        "scae_version": scae.__version__,
        "dataset": dataset.name,
        "cells": args.cells,
        "autoencoder": {"latent_dim": 10, "epochs": 50, "random_state": 0, "fit_on": "all cells",
                        "torch_threads": 1, "train_seconds": round(train_seconds, 2)},
        "scae_tsne_config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "opentsne_default_settings": "TSNE(n_jobs=1, random_state=0): perplexity 30, 250 iterations at "
                                     "exaggeration 12 + 500 at 1, momentum 0.8/0.8, neighbors 'auto', "
                                     "negative_gradient_method 'auto', theta 0.5, PCA init",
        "knn_preservation_k": N_NEIGHBORS_PRESERVED,
        "knn_classifier_k": N_NEIGHBORS_CLASSIFIER,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "load_average_start_end": [load_start, load_average()],
        "python": platform.python_version(),
        "opentsne": openTSNE.__version__,
        "torch": torch.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"t-SNE settings on {args.cells} cells, single-threaded "
          f"(load {report['load_average_start_end'][0]} -> {report['load_average_start_end'][1]}) -> {args.out}")
    header = (f"  {'input':20s} {'settings':17s} {'seconds':>8s} {'KL rep.':>8s} {'KL exact':>9s} "
              f"{'KL commonP':>10s} {'15-NN kept':>10s} {'10-NN acc':>9s}")
    print(header)
    for name, row in results.items():
        for key in ("opentsne_default", "scae"):
            r = row[key]
            print(f"  {name:20s} {key:17s} {r['seconds']:8.2f} {r['kl_reported']:8.4f} {r['kl_exact']:9.4f} "
                  f"{r['kl_exact_common_p']:10.4f} {r['knn_preservation']:10.3f} {r['knn_accuracy']:9.3f}")
        print(f"  {'':20s} {'(t-SNE input)':17s} {'':8s} {'':8s} {'':9s} {'':10s} {'':10s} "
              f"{row['input_knn_accuracy']:9.3f}")
    sys.exit(0)


if __name__ == "__main__":
    main()
