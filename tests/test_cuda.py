"""The CUDA path: training, prediction, streaming, torchrun (NCCL) and the study on a GPU.

Skipped where PyTorch sees no CUDA GPU (CI, the reference machine); ``benchmarks/gpu.py``
runs them on a GPU machine together with the GPU timings. Without a GPU, the same code is
covered by the CPU tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import scae
import scae.sources
import scae.training
from conftest import REPO, scae_env, study_args, write_h5ad
from scae.cli import main
from scae.data import read_h5ad
from scae.parallel import resolve_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

EPOCHS = 3
# deterministic configurations (no dropout, input noise or latent samples): the CPU and the
# GPU start from the same weights (built on the CPU from the seed) and see the same batches
DETERMINISTIC = {
    "mse": {"loss": "mse"},
    "nonzero_mse": {"loss": "nonzero_mse"},
    "poisson": {"loss": "poisson"},
    "nb": {"loss": "nb"},
    "zinb": {"loss": "zinb"},
    "nb_scaled_layernorm": {"loss": "nb", "scale_input": True, "log_mse_weight": 1.0, "norm": "layer"},
    "mse_batchnorm_plateau_decay": {"loss": "mse", "norm": "batch", "lr_schedule": "plateau", "weight_decay": 0.01},
}
# the GPU draws these from its own generator, so only the GPU run's determinism is compared
NOISY = {
    "recommended": scae.Autoencoder.from_preset("recommended", epochs=EPOCHS, patience=2).get_params(),
    "nb_vae": {"loss": "nb", "variational": True, "kl_warmup_epochs": 2, "dropout": 0.1, "norm": "batch"},
}
COUNT_LOSSES = ("poisson", "nb", "zinb")


@pytest.fixture(scope="module")
def counts():
    """Raw counts (CSR) and labels: 300 cells × 80 genes."""
    return scae.simulate_counts(300, 80, 3, seed=4)


def model_input(params: dict, counts, small_dataset):
    return counts[0] if params["loss"] in COUNT_LOSSES else small_dataset.X


def fitted(params: dict, X, device: str) -> scae.Autoencoder:
    base = {"latent_dim": 4, "hidden": (32,), "epochs": EPOCHS, "batch_size": 32, "random_state": 7}
    return scae.Autoencoder(**{**base, **params, "device": device}).fit(X, eval_X=X[:60])


def assert_histories_close(a: list[dict], b: list[dict], rel: float) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=rel), (row_a["epoch"], key)


def assert_arrays_close(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding grown over a few hundred steps (batch normalisation, with its
    batch statistics, grows it most: 0.17% of the scale on average, 0.4% at most, on an H200):
    0.5% of the scale on average, 3% at most."""
    scale = np.abs(expected).max()
    difference = np.abs(got - expected)
    assert difference.mean() <= 5e-3 * scale and difference.max() <= 3e-2 * scale, (difference.mean(), difference.max(), scale)


def test_auto_takes_the_gpu():
    assert resolve_device("auto") == torch.device("cuda", 0)
    model = scae.Autoencoder(latent_dim=2, hidden=(8,), epochs=1).fit(np.random.default_rng(0).random((40, 6)))
    assert model.device_.type == "cuda"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_gpu_training_matches_the_cpu(name, counts, small_dataset):
    """Same weights, same batches: the histories agree to float32 rounding, and so do the latents."""
    params = DETERMINISTIC[name]
    X = model_input(params, counts, small_dataset)
    cpu, gpu = fitted(params, X, "cpu"), fitted(params, X, "cuda")
    assert gpu.device_.type == "cuda" and cpu.device_.type == "cpu"
    assert_histories_close(cpu.history_, gpu.history_, rel=2e-3)
    assert gpu.history_[-1]["test_loss"] < gpu.history_[0]["test_loss"]
    latent_cpu, latent_gpu = cpu.transform(X), gpu.transform(X)
    assert latent_gpu.dtype == np.float32 and latent_gpu.shape == (X.shape[0], 4)
    assert_arrays_close(latent_gpu, latent_cpu)
    assert_arrays_close(gpu.reconstruct(X), cpu.reconstruct(X))
    errors_cpu, errors_gpu = cpu.reconstruction_error(X), gpu.reconstruction_error(X)
    for key in ("mse", "nonzero_mse"):
        assert errors_gpu[key] == pytest.approx(errors_cpu[key], rel=2e-3)


@pytest.mark.parametrize("name", [*DETERMINISTIC, *NOISY])
def test_same_seed_same_result_on_the_gpu(name, counts, small_dataset):
    params = {**DETERMINISTIC, **NOISY}[name]
    X = model_input(params, counts, small_dataset)
    first, second = fitted(params, X, "cuda"), fitted(params, X, "cuda")
    assert first.history_ == second.history_
    np.testing.assert_array_equal(first.transform(X), second.transform(X))
    assert all(np.isfinite(v) for row in first.history_ for k, v in row.items() if k != "epoch")


@pytest.mark.parametrize("copied", [True, False], ids=["rows_on_the_gpu", "rows_pinned_and_copied"])
@pytest.mark.parametrize("name", ["mse", "nonzero_mse", "zinb", "recommended", "nb_vae"])
def test_training_steps_never_wait_for_the_gpu(name, copied, counts, small_dataset, monkeypatch):
    """No host synchronisation inside an epoch's steps (batches, forward, loss, backward, Adam,
    the running loss total, input noise, latent samples), whether the rows are in the GPU's
    memory or copied there batch by batch: PyTorch's sync debug mode turns any into an error.
    The trainer synchronises just before and just after each epoch's steps, so the mode is
    switched on and off there."""
    if not copied:
        monkeypatch.setattr(scae.sources, "DEVICE_FRACTION", 0.0)
    params = {**DETERMINISTIC, **NOISY}[name]
    X = model_input(params, counts, small_dataset)
    original = scae.training._synchronize
    calls = []

    def switching(device):
        calls.append(device)
        if len(calls) % 2:  # before the steps
            original(device)
            torch.cuda.set_sync_debug_mode("error")
        else:  # after them
            torch.cuda.set_sync_debug_mode("default")
            original(device)

    monkeypatch.setattr(scae.training, "_synchronize", switching)
    try:
        model = fitted({**params, "early_stopping": False}, X, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2 * EPOCHS and all(d.type == "cuda" for d in calls)
    assert len(model.history_) == EPOCHS + 1


def test_training_data_goes_to_the_gpu_once_when_it_fits(small_dataset, monkeypatch):
    made = []
    original = scae.training.on_device

    def recording(sources, device):
        result = original(sources, device)
        made.extend(type(s).__name__ for s in result if s is not None)
        return result

    monkeypatch.setattr(scae.training, "on_device", recording)
    copies = []
    init = scae.sources.DeviceSource.__init__
    monkeypatch.setattr(scae.sources.DeviceSource, "__init__",
                        lambda self, source, device: copies.append(source) or init(self, source, device))
    fitted({"loss": "mse", "early_stopping": True, "scale_input": True}, small_dataset.X, "cuda")
    assert made == ["DeviceSource"] * 3  # training, test and validation cells
    assert len(copies) == 3  # copied once, before the input moments, and kept by the trainer
    made.clear()
    monkeypatch.setattr(scae.sources, "DEVICE_FRACTION", 0.0)  # no room: batches are copied as before
    fitted({"loss": "mse"}, small_dataset.X, "cuda")
    assert len(made) == 2 and "DeviceSource" not in made


def test_a_model_trained_on_the_gpu_loads_on_the_gpu_or_the_cpu(small_dataset, tmp_path):
    X = small_dataset.X
    gpu = fitted({"loss": "mse"}, X, "cuda")
    gpu.save(tmp_path / "m.pt")
    again = scae.Autoencoder.load(tmp_path / "m.pt")  # its device parameter: cuda
    assert again.device_.type == "cuda"
    np.testing.assert_array_equal(again.transform(X), gpu.transform(X))
    cpu = scae.Autoencoder.load(tmp_path / "m.pt", device="cpu")
    assert cpu.device_.type == "cpu" and cpu.history_ == gpu.history_
    assert_arrays_close(cpu.transform(X), gpu.transform(X))


@pytest.fixture(scope="module")
def raw_h5ad(tmp_path_factory, counts):
    path = tmp_path_factory.mktemp("cuda") / "raw.h5ad"
    write_h5ad(path, counts[0], np.char.add("t", counts[1].astype(str)))
    return path


def fit_args(h5ad, out, device, *extra):
    return ["fit", "--h5ad", str(h5ad), "--label-key", "cell_type", "--stream", "--out", str(out),
            "--epochs", "3", "--batch-size", "64", "--hidden", "32", "--device", device, "--quiet", *extra]


@pytest.mark.parametrize("copied", [True, False], ids=["rows_on_the_gpu", "rows_pinned_and_copied"])
@pytest.mark.parametrize("loss", ["mse", "nb"])
def test_streamed_training_on_the_gpu_matches_the_cpu(raw_h5ad, loss, copied, monkeypatch):
    """From disk: copied to the GPU first, or batch by batch (read, densified and pinned in the
    background, copied without blocking, normalised on the GPU)."""
    if not copied:
        monkeypatch.setattr(scae.sources, "DEVICE_FRACTION", 0.0)
    source = read_h5ad(raw_h5ad, "cell_type", stream=True).source()
    if loss == "nb":
        source = source.raw()
    assert source.on_disk
    train, test = source.subset(np.arange(0, 300, 2)), source.subset(np.arange(1, 300, 2))
    params = {"latent_dim": 4, "hidden": (32,), "loss": loss, "epochs": EPOCHS, "batch_size": 32, "random_state": 3}
    cpu, gpu = (scae.Autoencoder(**params, device=d).fit(train, eval_X=test) for d in ("cpu", "cuda"))
    assert_histories_close(cpu.history_, gpu.history_, rel=2e-3)
    assert_arrays_close(gpu.transform(test), cpu.transform(test))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process: two GPUs")
def test_torchrun_on_nccl_matches_one_process(raw_h5ad, tmp_path):
    """One torchrun process per GPU: NCCL, DistributedDataParallel on each process's own GPU
    (two processes each printing would mean two separate trainings, not one process group)."""
    n_gpus = torch.cuda.device_count()
    assert main(fit_args(raw_h5ad, tmp_path / "one.pt", "cuda")) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}",
         "-m", "scae.cli", *fit_args(raw_h5ad, tmp_path / "ddp.pt", "cuda")],
        cwd=REPO, env=scae_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scae: trained") == 1
    one, ddp = (scae.Autoencoder.load(tmp_path / f"{n}.pt") for n in ("one", "ddp"))
    assert_histories_close(one.history_, ddp.history_, rel=1e-3)


def test_the_study_on_the_gpu(sim_dir, tmp_path):
    """The whole study with ``--device cuda``: it completes, says where it trained, and its
    errors agree with the same study on the CPU."""
    metrics = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(study_args(sim_dir, out, "--device", device)) == 0
        metrics[device] = json.loads((out / "metrics.json").read_text())
        assert (out / "report.html").is_file()
    assert metrics["cuda"]["environment"] == {"device": "cuda", "processes": 1}
    assert metrics["cpu"]["environment"]["device"] == "cpu"
    assert metrics["cuda"]["runs"].keys() == metrics["cpu"]["runs"].keys()
    for name, run in metrics["cpu"]["runs"].items():
        if run["model_params"]["input_noise"] or run["model_params"]["variational"]:
            continue  # noise drawn from the GPU's own generator
        for part, errors in run["errors"].items():
            for key, value in errors.items():
                assert metrics["cuda"]["runs"][name]["errors"][part][key] == pytest.approx(value, rel=1e-2), (name, part, key)
