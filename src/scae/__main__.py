"""The ``scae`` command (and ``python -m scae``), with signals handled from its first instruction.

Until the command line installs its own handlers (:func:`scae.cli.main`), a SIGINT, SIGTERM or
SIGHUP ends the process at once with one line: nothing has started, so nothing needs cleaning up, and
an import interrupted half-way would otherwise print a traceback (or a misleading "bad
install" message from NumPy).
"""

from __future__ import annotations

import os
import signal
import sys


def _while_starting(signum: int, frame) -> None:
    try:
        os.write(2, f"scae: interrupted ({signal.Signals(signum).name}) while starting; nothing was written\n".encode())
    except OSError:  # no standard error to say it on
        pass
    os._exit(128 + signum)


def open_closed_standard_streams() -> None:
    """Give a closed standard input, output or error (``2>&-``) the null device.

    Python sets such a stream to ``None``, and the first progress bar or message written to it
    would fail; worse, the first file opened would take its descriptor and receive what C
    libraries print there. Opening the null device takes the lowest free descriptor: the
    closed one.
    """
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # becomes descriptor fd: every lower one is open
            setattr(sys, name, open(fd, mode, closefd=False))


class _ErrorStreamOutlivingItsReader:
    """Standard error that outlives its reader (``scae study … 2>&1 | head -1``, a pager quit
    early) or its room (``2>/dev/full``, ``2>>log`` on a full disk, a terminal gone, ``2<file``):
    when a write fails its descriptor is pointed at the null device and the run goes on silently,
    as with a closed one (:func:`open_closed_standard_streams`). Otherwise the next progress line
    failed, and so did the error message about it: exit 1 and nothing written."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BlockingIOError:  # a non-blocking descriptor, full for the moment: this text is lost, not the stream
            return len(text)
        except OSError:
            self._to_null_device()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BlockingIOError:
            pass
        except OSError:
            self._to_null_device()

    def _to_null_device(self) -> None:
        point_at_null_device(self._stream)
        try:  # what the broken pipe refused now goes to the null device
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def point_at_null_device(stream) -> None:
    """Point ``stream``'s file descriptor at the null device (for a stream whose reader is gone:
    later writes, Python's exit flush included, then succeed and go nowhere)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, stream.fileno())
    finally:
        os.close(null)


def keep_error_stream_when_its_reader_leaves() -> None:
    """Make ``sys.stderr`` survive a broken pipe or a failed write (:class:`_ErrorStreamOutlivingItsReader`)."""
    if sys.stderr is not None and not isinstance(sys.stderr, _ErrorStreamOutlivingItsReader):
        sys.stderr = _ErrorStreamOutlivingItsReader(sys.stderr)


def prepare_environment() -> str | None:
    """Settle what the environment would otherwise make libraries print or fail on; returns a
    problem to report instead of running, or ``None``.

    - A removed current directory: PyTorch cannot even load its libraries there.
    - Standard output that cannot encode a character (``LC_ALL=C``): escaped, not an error after
      the work is done.
    - ``MPLBACKEND``: figures are only ever written to files, so matplotlib's file backend (Agg),
      whatever the variable says (an unknown backend failed after the training).
    - ``OMP_NUM_THREADS`` that is not a positive whole number: dropped (OpenMP would print a
      complaint in every process and ignore it anyway).
    - PyTorch's C++ warnings (a torchrun process retrying to reach the others printed a stack each
      time): errors only, unless ``TORCH_CPP_LOG_LEVEL`` says otherwise.
    - matplotlib's warnings about an unusable configuration or cache folder: it falls back to a
      temporary one by itself.
    - Python run with ``-OO`` (``PYTHONOPTIMIZE=2``): refused, since it strips the docstrings
      anndata builds on while loading (it failed after the training).
    - A tight limit on the process's address space (``ulimit -v``, below
      :data:`OPENBLAS_THREADS_ROOM` and :data:`OPENBLAS_ROOM_PER_CORE` per core): OpenBLAS
      single-threaded (``OPENBLAS_NUM_THREADS=1`` unless set). Its threads' buffers may not fit under the limit,
      and SciPy's OpenBLAS then retried mapping them for ever while loading, deaf to signals;
      single-threaded, a library that does not fit fails to load, which is one line.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        return "the current directory no longer exists (it was removed); cd to an existing directory and run again"
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    os.environ["MPLBACKEND"] = "Agg"
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is not None and not _positive_counts(threads):
        del os.environ["OMP_NUM_THREADS"]
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    limit = address_space_limit()
    if limit is not None and limit < OPENBLAS_THREADS_ROOM + OPENBLAS_ROOM_PER_CORE * (os.cpu_count() or 1):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if sys.flags.optimize >= 2:
        return ("Python runs with -OO (PYTHONOPTIMIZE=2), which strips the docstrings anndata needs to load; "
                "unset PYTHONOPTIMIZE (or set it to 1)")

    import logging

    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    return None


OPENBLAS_THREADS_ROOM = 2 * 2**30
OPENBLAS_ROOM_PER_CORE = 128 * 2**20
"""Below this address space (plus the part per core) OpenBLAS runs single-threaded: each of its
threads maps buffers of its own (SciPy's and NumPy's copies both), and under 1–2 GiB they did not fit."""


def address_space_limit() -> int | None:
    """The process's limit on its address space in bytes (``ulimit -v``), ``None`` when there is none."""
    try:
        import resource
    except ImportError:  # not a Unix system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _positive_counts(text: str) -> bool:
    """Whether ``text`` is OpenMP's thread-count list: positive whole numbers, comma-separated."""
    parts = text.strip().split(",")
    return all(p.strip().isascii() and p.strip().isdigit() and int(p) > 0 for p in parts)


def prepare_process() -> None:
    """What every way of starting the command does first: standard streams that can be written
    whatever became of them, then :func:`prepare_environment` (a problem there is one line, exit 2)."""
    open_closed_standard_streams()
    keep_error_stream_when_its_reader_leaves()
    problem = prepare_environment()
    if problem is not None:
        print(f"scae: error: {problem}", file=sys.stderr)
        sys.exit(2)


def console() -> None:
    """Entry point of the ``scae`` console script."""
    prepare_process()
    from scae.interrupts import watched_signals  # standard library only: as cheap as this module

    for signum in watched_signals():  # nohup's SIGHUP stays ignored
        signal.signal(signum, _while_starting)
    from scae.cli import main

    sys.exit(main())


if __name__ == "__main__":
    console()
