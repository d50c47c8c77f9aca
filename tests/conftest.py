"""Shared fixtures: small simulated data and the end-to-end study runs (run once per session)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scae
from scae.cli import main

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# The signal tests send SIGINT, SIGTERM and SIGHUP and expect scae to handle them. A test run
# started in the background (`nohup`, `make test &` in a script) inherits some of them ignored,
# and scae rightly keeps a signal it was started ignoring ignored (as Python does with SIGINT),
# in this process and in every command the tests start: give them their usual handling back.
for _name, _handler in (("SIGINT", signal.default_int_handler), ("SIGTERM", signal.SIG_DFL), ("SIGHUP", signal.SIG_DFL)):
    if hasattr(signal, _name) and signal.getsignal(getattr(signal, _name)) is signal.SIG_IGN:
        signal.signal(getattr(signal, _name), _handler)

# Size of the small end-to-end study (kept small so the whole suite stays fast).
STUDY_CELLS = 300
STUDY_GENES = 150
STUDY_EPOCHS = 3
SIM_SEED = 1


def scae_env() -> dict[str, str]:
    """Environment for a child ``python -m scae.cli`` that imports the package from src/."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="session")
def small_dataset() -> scae.Dataset:
    """A small simulated dataset: 300 cells × 120 genes, 3 populations, sparse CSR."""
    return scae.simulate_dataset(300, 120, 3, seed=3)


@pytest.fixture(scope="session")
def small_dense(small_dataset) -> np.ndarray:
    """The small dataset's matrix as a dense float32 array."""
    return small_dataset.X.toarray()


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory) -> Path:
    """counts.npy + labels.txt written by ``scae simulate`` (the CLI, in-process)."""
    out = tmp_path_factory.mktemp("sim")
    rc = main([
        "simulate", "--out", str(out), "--cells", str(STUDY_CELLS), "--genes", str(STUDY_GENES),
        "--populations", "3", "--seed", str(SIM_SEED),
    ])
    assert rc == 0
    return out


def study_args(sim_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
        "--out", str(out), "--epochs", str(STUDY_EPOCHS), "--quiet", "--seed", "0", *extra,
    ]


@pytest.fixture(scope="session")
def study_run(sim_dir, tmp_path_factory):
    """One full study through ``python -m scae.cli`` in a child process.

    Returns ``(out_dir, completed_process)``; every test that inspects the study outputs
    shares this run.
    """
    out = tmp_path_factory.mktemp("study") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "scae.cli", *study_args(sim_dir, out)],
        cwd=REPO, env=scae_env(), capture_output=True, text=True, timeout=600,
    )
    return out, proc


@pytest.fixture(scope="session")
def study_out(study_run) -> Path:
    """Output directory of the shared study run (fails the dependent test if the run failed)."""
    out, proc = study_run
    assert proc.returncode == 0, proc.stderr
    return out


def write_h5ad(path, X, labels, layer: str | None = None) -> None:
    """Write ``X`` (or, with ``layer``, an all-zero X and ``X`` in that layer) with labels in
    ``obs["cell_type"]`` as an ``.h5ad`` file."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    adata = ad.AnnData(
        X=X if layer is None else sp.csr_matrix(X.shape, dtype=np.float32),
        obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(X.shape[0])]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]),
    )
    if layer is not None:
        adata.layers[layer] = X
    adata.write_h5ad(path)


def free_port() -> int:
    """A TCP port free on this machine now (for a torchrun group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
