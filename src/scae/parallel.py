"""Devices and multi-process training through ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node=N -m scae.cli study …`` (or the ``scae`` entry point under
``torchrun``) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address in their environment. :func:`init_distributed` joins them into one process
group — gloo on CPU, NCCL on CUDA — and the trainer wraps the network in
``DistributedDataParallel``. Nothing here is a home-made communication layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from scae.errors import ScaeInputError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for ``--device``: ``auto`` takes a CUDA GPU, then Apple's MPS, then the CPU.

    A CUDA device is GPU ``local_rank`` (default: this process's ``LOCAL_RANK`` under torchrun,
    else 0) modulo the GPUs PyTorch sees, so that every process of a machine has its own GPU
    (and a process that sees only its own, through ``CUDA_VISIBLE_DEVICES``, takes it). Raises
    :class:`~scae.errors.ScaeInputError` when the device asked for is not available.
    """
    if name not in DEVICES:
        raise ScaeInputError(f"unknown device '{name}'; expected one of: {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda":
        if not cuda:
            raise ScaeInputError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu or auto")
        rank = _local_rank() if local_rank is None else local_rank
        return torch.device("cuda", rank % torch.cuda.device_count())
    if name == "mps" and not mps:
        raise ScaeInputError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    return torch.device(name)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torch.distributed`` process group."""

    rank: int
    world_size: int
    local_rank: int
    group: object = None
    """The process group (``None`` is the default group)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_rank() -> int:
    """This process's index on its machine under ``torchrun`` (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0


_local_rank = local_rank  # resolve_device's parameter has the same name


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact loss sums, except on Apple's MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def broadcast_from_main(value, distributed: Distributed | None):
    """``value`` as rank 0 has it, on every process (a picklable object; itself when not distributed)."""
    if distributed is None:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=distributed.group)
    return box[0]


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> Distributed | None:
    """Join the process group ``torchrun`` set up (``None`` when this is a single process).

    The backend is NCCL for CUDA devices and gloo otherwise; ``timeout_s`` bounds every
    collective, so a rank that dies mid-run makes the others fail instead of hanging.
    """
    if not launched_by_torchrun():
        return None
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # each process owns its GPU; collectives use the current one
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == dist.get_world_size():
        _check_one_gpu_each(device, timeout_s)
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank(),
    )


def _check_one_gpu_each(device: torch.device, timeout_s: float) -> None:
    """On one machine, refuse processes that share a GPU (:func:`shared_gpu`), all alike.

    NCCL refuses them with an error of its own at the first collective; it connects lazily, so
    the processes can first compare their GPUs over a gloo group (on one machine gloo needs no
    network set-up). If that comparison itself fails, it is skipped, and NCCL says what it says.
    """
    import torch.distributed as dist

    try:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        identities: list = [None] * dist.get_world_size()
        dist.all_gather_object(identities, gpu_identity(device), group=group)
        dist.destroy_process_group(group)
    except RuntimeError:
        return
    problem = shared_gpu(identities)
    if problem is not None:
        raise ScaeInputError(problem)


def gpu_identity(device: torch.device) -> tuple[str, str, int]:
    """This process's GPU: its machine's name, the GPU's UUID (or, without one, the visible
    devices and the index among them) and its index in this process."""
    import socket

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    which = str(uuid) if uuid is not None else f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}:{device.index}"
    return socket.gethostname(), which, int(device.index or 0)


def shared_gpu(identities: list[tuple[str, str, int]]) -> str | None:
    """Why the processes of a group (their :func:`gpu_identity`, in rank order) cannot use NCCL:
    two of them share a GPU. ``None`` when each has its own."""
    first: dict[tuple[str, str], int] = {}
    for rank, (host, which, index) in enumerate(identities):
        if (host, which) in first:
            processes = sum(1 for h, _, _ in identities if h == host)
            gpus = len({w for h, w, _ in identities if h == host})
            return (f"torchrun: processes {first[host, which]} and {rank} both use GPU {index} of {host}; NCCL needs "
                    f"a GPU per process, and {processes} processes there have {gpus} GPU(s): start at most as many "
                    "processes per machine as it has GPUs (--nproc_per_node), or use --device cpu")
        first[host, which] = rank
    return None


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], distributed: Distributed | None, device: torch.device) -> list[float]:
    """Sums of ``values`` over all processes (the values themselves when not distributed)."""
    if distributed is None:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=accumulator_dtype(device), device=device)
    dist.all_reduce(tensor, group=distributed.group)
    return tensor.tolist()
