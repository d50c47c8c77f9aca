"""Devices and multi-process training through ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node=N -m scae.cli study …`` (or the ``scae`` entry point under
``torchrun``) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address in their environment. :func:`init_distributed` joins them into one process
group — gloo on CPU, NCCL on CUDA — and the trainer wraps the network in
``DistributedDataParallel``. Nothing here is a home-made communication layer.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from scae.errors import ScaeInputError, first_line
from scae.params import launched_by_torchrun

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
    return int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0  # checked by launched_by_torchrun


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


WAITING_NOTE_SECONDS = 30.0
"""After this long waiting for the other processes of the group, say so on standard error (once)."""


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
        _join_group(backend, timeout_s, device)
    if device.type == "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == dist.get_world_size():
        _check_one_gpu_each(device, timeout_s)
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank(),
    )


def _join_group(backend: str, timeout_s: float, device: torch.device) -> None:
    """``init_process_group``, waited for in slices, so that SIGINT, SIGTERM, SIGHUP (…) still stop this
    process while it waits for the others (Python runs signal handlers only between bytecodes,
    and the rendezvous waits in C++); its failures become one :class:`~scae.errors.ScaeInputError`.

    The rendezvous runs in a helper thread with those signals blocked, so that they reach the
    main thread and do not break off the helper's system calls (each such break printed a C++
    stack). A process stopped while it waits exits without waiting for the helper.
    """
    import sys
    import threading

    import torch.distributed as dist

    from scae.interrupts import HANDLED_SIGNALS

    _check_rendezvous_address()
    failure: list[BaseException] = []

    def rendezvous() -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current GPU is per thread: this one's too
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except BaseException as err:  # handed to the waiting thread
            failure.append(err)

    helper = threading.Thread(target=rendezvous, name="scae-rendezvous", daemon=True)
    helper.start()
    started, noted = time.monotonic(), False
    while helper.is_alive():
        helper.join(0.2)
        if not noted and time.monotonic() - started > WAITING_NOTE_SECONDS and helper.is_alive():
            noted = True
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            print(f"scae: process {os.environ.get('RANK')} is waiting for the other processes of its torchrun group "
                  f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')}) at {where}; start them, or stop this one with Ctrl-C",
                  file=sys.stderr, flush=True)
    if failure:
        err = failure[0]
        first = first_line(err)[:300]
        raise ScaeInputError(
            f"torchrun: process {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} could not join its group "
            f"({first}); start every process with torchrun, or unset WORLD_SIZE and RANK to run one process"
        )


def _check_rendezvous_address() -> None:
    """Refuse a ``MASTER_ADDR`` that does not resolve: PyTorch would retry it until its timeout
    (30 minutes) while saying nothing. (Unset, PyTorch's own error says so.)"""
    import socket

    address = os.environ.get("MASTER_ADDR")
    if not address:
        return
    try:
        socket.getaddrinfo(address, None)
    except (socket.gaierror, UnicodeError) as err:
        raise ScaeInputError(f"torchrun: MASTER_ADDR={address!r} (the address of process 0) does not resolve "
                             f"({err.strerror if isinstance(err, OSError) and err.strerror else err}); "
                             "start the processes with torchrun, which sets it") from None


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
