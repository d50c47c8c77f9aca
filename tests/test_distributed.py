"""Multi-process training through torchrun (gloo on CPU), against one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import scae
from conftest import REPO, free_port, scae_env, write_h5ad
from scae.cli import main


@pytest.fixture(scope="module")
def raw_h5ad(tmp_path_factory):
    counts, labels = scae.simulate_counts(400, 60, 3, seed=2)
    path = tmp_path_factory.mktemp("ddp") / "raw.h5ad"
    write_h5ad(path, counts, np.char.add("t", labels.astype(str)))
    return path


def fit_args(h5ad, out, *extra):
    return ["fit", "--h5ad", str(h5ad), "--label-key", "cell_type", "--stream", "--out", str(out),
            "--epochs", "3", "--batch-size", "64", "--hidden", "32", "--device", "cpu", "--quiet", *extra]


def test_two_gloo_processes_match_one_process(raw_h5ad, tmp_path):
    assert main(fit_args(raw_h5ad, tmp_path / "one.pt")) == 0
    for loss in ("mse", "nonzero_mse", "nb"):  # nb: a count likelihood, on the raw counts
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "scae.cli", *fit_args(raw_h5ad, tmp_path / f"two_{loss}.pt", "--loss", loss)],
            cwd=REPO, env=scae_env(), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("scae: trained") == 1  # only rank 0 reports and writes
        if loss == "mse":
            one = scae.Autoencoder.load(tmp_path / "one.pt")
        else:
            assert main(fit_args(raw_h5ad, tmp_path / f"one_{loss}.pt", "--loss", loss)) == 0
            one = scae.Autoencoder.load(tmp_path / f"one_{loss}.pt")
        two = scae.Autoencoder.load(tmp_path / f"two_{loss}.pt")
        assert len(one.history_) == len(two.history_) == 4
        for a, b in zip(one.history_, two.history_):
            for key in ("train_loss", "test_loss", "test_mse"):
                # the issue asks for 1%; exact sums make it much closer (a mean of shard means
                # instead of the global mean would be off by more than this for nonzero_mse)
                assert b[key] == pytest.approx(a[key], rel=1e-4), (loss, a["epoch"], key)
        assert one.history_[-1]["test_loss"] < one.history_[0]["test_loss"]


def test_cuda_without_gpu_is_one_line(raw_h5ad, tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(fit_args(raw_h5ad, tmp_path / "m.pt")[:-3] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "scae: error: --device cuda: no CUDA GPU is available to PyTorch here; use --device cpu or auto"
    assert not (tmp_path / "m.pt").exists()


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Under torchrun, the process with LOCAL_RANK 3 joins NCCL on GPU 3 (the command line resolves
    --device without being told the rank: it comes from the environment)."""
    import torch
    import torch.distributed as dist

    from scae.parallel import init_distributed, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda") == torch.device("cuda", 0)  # not under torchrun
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 0)  # LOCAL_RANK alone is not torchrun
    for key, value in {"RANK": "7", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    current, joined = [], []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: joined.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 7)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: backend)
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: None)
    monkeypatch.setattr("scae.parallel.gpu_identity", lambda device: ("host", f"GPU-{device.index}", device.index))
    monkeypatch.setattr(dist, "all_gather_object",  # the 8 processes: 2 machines × 4 GPUs
                        lambda out, obj, group: out.__setitem__(slice(None), [(f"h{r // 4}", f"GPU-{r % 4}", r % 4) for r in range(8)]))
    group = init_distributed(resolve_device("cuda"))
    assert current == [torch.device("cuda", 3)] * 2 and joined == ["nccl"]  # in this thread and the rendezvous's
    assert (group.rank, group.world_size, group.local_rank) == (7, 8, 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible to this process
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_processes_sharing_a_gpu_are_named_before_nccl_fails():
    from scae.parallel import shared_gpu

    assert shared_gpu([("a", "GPU-1", 0), ("a", "GPU-2", 1), ("b", "GPU-1", 0)]) is None  # another machine's
    assert shared_gpu([("a", "0:0", 0), ("a", "1:0", 0)]) is None  # CUDA_VISIBLE_DEVICES apart
    message = shared_gpu([("a", "GPU-1", 0), ("a", "GPU-2", 1), ("a", "GPU-1", 0), ("a", "GPU-2", 1)])
    assert message == ("torchrun: processes 0 and 2 both use GPU 0 of a; NCCL needs a GPU per process, and 4 "
                       "processes there have 2 GPU(s): start at most as many processes per machine as it has GPUs "
                       "(--nproc_per_node), or use --device cpu")


def test_torchrun_processes_on_one_gpu_stop_with_one_line_each(monkeypatch):
    """Under torchrun on CUDA the processes compare their GPUs over gloo before any NCCL collective."""
    import torch
    import torch.distributed as dist

    from scae.errors import ScaeInputError
    from scae.parallel import init_distributed

    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: backend)
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: None)
    gathered = []

    def all_gather_object(out, obj, group):
        gathered.append((obj, group))
        out[:] = [obj, obj]  # both processes on the same GPU

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr("scae.parallel.gpu_identity", lambda device: ("host", "GPU-x", 0))
    with pytest.raises(ScaeInputError, match="torchrun: processes 0 and 1 both use GPU 0 of host"):
        init_distributed(torch.device("cuda", 0))
    assert gathered == [(("host", "GPU-x", 0), "gloo")]
    gathered.clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # several machines: gloo may need network set-up there,
    assert init_distributed(torch.device("cuda", 0)).world_size == 2  # so NCCL is left to say it
    assert gathered == []

    def broken(out, obj, group):
        raise RuntimeError("gloo: connection refused")

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "all_gather_object", broken)  # a comparison that fails is skipped
    assert init_distributed(torch.device("cuda", 0)).world_size == 2


@pytest.mark.parametrize("command", ["fit", "study"])
def test_processes_given_different_settings_stop_with_the_same_line(raw_h5ad, tmp_path, command):
    """Two processes of one group, the second given --epochs 4: they would wait for ever in mismatched
    exchanges (or, for a seed or another file, train apart); both stop at once, naming the difference."""
    port = free_port()
    procs = []
    for rank, epochs in ((0, "3"), (1, "4")):
        env = {**scae_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        argv = fit_args(raw_h5ad, tmp_path / "m.pt") if command == "fit" else [
            "study", "--h5ad", str(raw_h5ad), "--label-key", "cell_type", "--out", str(tmp_path / "s"),
            "--hidden", "32", "--device", "cpu", "--quiet", "--epochs", "3"]
        argv[argv.index("--epochs") + 1] = epochs
        procs.append(subprocess.Popen([sys.executable, "-m", "scae.cli", *argv], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1] == (
            "scae: error: the processes of the torchrun group were not given the same job: process 1 differs from "
            "process 0 in epochs; give every process the same command and the same input file")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "s" / "report.html").exists()
