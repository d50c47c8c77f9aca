"""SIGINT, SIGTERM, SIGHUP (and the other signals of :data:`HANDLED_SIGNALS`) as an exception, and
worker processes that leave only when told to.

The command line turns these signals into :class:`Interrupted`, raised in the main thread, so
every ``finally`` block and context manager on the way out runs (worker processes are killed,
partial outputs removed) and the process exits with ``128 + signal number`` (130, 143, 129, …).
Worker processes are started with the signals blocked, so a Ctrl-C sent to the whole
foreground process group (or the hang-up of a closed terminal) reaches only the main process,
which then stops them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                                            "SIGUSR2", "SIGXCPU") if hasattr(signal, name))
"""Ctrl-C, ``kill``/``timeout``/schedulers, a closed terminal or ssh session, Ctrl-\\, the user
signals batch systems send before they stop a job (Grid Engine's ``-notify``), and a CPU-time limit
reached (``ulimit -S -t``, a queue's soft limit): every one of them would end the process at once,
leaving its workers' resources to the system, so each stops it as SIGTERM does."""
GROUP_SIGNALS = tuple(signum for signum in HANDLED_SIGNALS if signum != getattr(signal, "SIGXCPU", None))
"""The handled signals that may come to a whole process group (a terminal's keys, a batch
system): worker processes ignore them and leave when their parent stops them. SIGXCPU is for the
process over its own CPU-time limit: a worker keeps its default action (it ends as any worker that
dies: its parent starts another for its jobs, and stops with one line if that one dies too)."""
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Interrupted(BaseException):
    """A handled signal (SIGINT, SIGTERM, SIGHUP, …: :data:`HANDLED_SIGNALS`) arrived; a ``BaseException``, so ``except Exception`` does not stop it.

    Parameters
    ----------
    signum
        The signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.outputs_written = False
        """Set when the signal came as the outputs were moved into place (they all were)."""

    @property
    def signal_name(self) -> str:
        """``"SIGINT"``, ``"SIGTERM"`` or ``"SIGHUP"``."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process stopped by a signal: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return self.signal_name


_swallowed: list[int] = []
"""Signals whose :class:`Interrupted` Python swallowed (see :func:`raise_if_interrupted`)."""


_raised = [False]
"""Whether :func:`signals_raise_interrupted`'s handler (or a deferred block) raised already."""
_deferred: list[list[int]] = []
"""While :func:`signals_deferred` runs: the signals that arrived meanwhile (one list per block)."""


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again for a signal whose exception was swallowed.

    A signal handler runs between any two bytecodes, also inside a ``__del__`` method or a
    weakref callback, where Python prints an exception ("Exception ignored in …") and goes on.
    :func:`signals_raise_interrupted` records such a signal instead of printing it, and this
    raises it: called before outputs are moved into place and at every stage and epoch, so a
    run stopped that way still stops, and never as a finished run.
    """
    if _swallowed:
        raise Interrupted(_swallowed.pop())


@contextmanager
def signals_raise_interrupted(restore: bool = True) -> Iterator[None]:
    """Within the block, the handled signals (:data:`HANDLED_SIGNALS`) raise :class:`Interrupted` in the main thread.

    Only the first signal raises: later ones are ignored while the exception unwinds, so a
    second Ctrl-C cannot break off the clean-up (stopping workers, removing partial outputs).
    An :class:`Interrupted` that Python swallowed (raised in a finaliser) is not printed; it is
    raised again by the next :func:`raise_if_interrupted`, and the next signal raises too.
    The previous handlers are restored on leaving (with ``restore=False`` the handlers set last
    in the block stay: a process that exits next can set what a late signal does). Outside the main
    thread this does nothing (Python delivers signals to the main thread only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _raised[0] = False

    def handler(signum: int, frame) -> None:
        if _deferred:
            _deferred[-1].append(signum)
            return
        if _raised[0]:
            return
        if _importing(frame):  # see _resend_later
            _resend_later(signum)
            return
        _raised[0] = True
        raise Interrupted(signum)

    def unraisable(args) -> None:
        if isinstance(args.exc_value, Interrupted):
            _swallowed.append(args.exc_value.signum)
            _raised[0] = False  # nothing is unwinding: a second signal may raise
        else:
            previous_hook(args)

    previous = {signum: signal.signal(signum, handler) for signum in watched_signals()}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    _resending[0] = True
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        _swallowed.clear()
        with _resend_lock:  # no signal sent again once this block is left (its handler may be gone)
            _resending[0] = False
            if restore:
                for signum, old in previous.items():
                    signal.signal(signum, old)


def watched_signals() -> tuple[int, ...]:
    """:data:`HANDLED_SIGNALS` but those this process was started ignoring: ``nohup`` ignores
    SIGHUP, and a shell ignores SIGINT for a command it runs in the background; they keep it."""
    return tuple(signum for signum in HANDLED_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN)


RESEND_SECONDS = 0.05
"""How soon a signal that came during an import is sent again (see :func:`_resend_later`)."""


def _importing(frame) -> bool:
    """Whether ``frame`` (where a signal handler was called) is inside the import of a PyTorch
    module: its compiled parts are C++ (pybind11), which cannot pass a Python exception on
    (other imports can be interrupted as any code can)."""
    importing = in_torch = False
    while frame is not None:
        name = frame.f_code.co_filename
        importing = importing or name.startswith("<frozen importlib._bootstrap")
        in_torch = in_torch or f"{os.sep}torch{os.sep}" in name
        frame = frame.f_back
    return importing and in_torch


def _resend_later(signum: int) -> None:
    """Send ``signum`` to this process again in :data:`RESEND_SECONDS`, from a helper thread.

    An exception raised during PyTorch's import can come out of its compiled initialisation,
    which calls back into Python, where C++ cannot pass it on and aborts the process
    (``terminate called after throwing an instance of 'pybind11::error_already_set'``, status
    134). So a signal that comes then is sent again until that import is over (about a second):
    the import finishes, and the signal stops the command a moment later.
    """
    timer = threading.Timer(RESEND_SECONDS, _resend, (signum,))
    timer.daemon = True
    timer.start()


_resend_lock = threading.Lock()
_resending = [False]
"""Whether a signal may be sent again: only while :func:`signals_raise_interrupted`'s handlers are in place."""


def _resend(signum: int) -> None:
    with _resend_lock:  # a signal sent to this process is taken in by its C handler before kill returns
        if _resending[0]:
            os.kill(os.getpid(), signum)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, the handled signals wait: :func:`signals_raise_interrupted`'s handler
    notes them, and the first is raised as :class:`Interrupted` when the block ends, so the
    block runs whole or not at all (for a few file renames, not for long work)."""
    arrived: list[int] = []
    _deferred.append(arrived)
    try:
        yield
    finally:
        _deferred.remove(arrived)
    if arrived:
        _raised[0] = True  # later signals are ignored while this one unwinds, as the handler does
        raise Interrupted(arrived[0])


@contextmanager
def signals_blocked_in_children() -> Iterator[None]:
    """Processes started within the block begin with the group signals (:data:`GROUP_SIGNALS`) blocked.

    A blocked signal mask is inherited through ``fork`` and ``exec``, so a spawned worker is
    immune from its first instruction (an ignore handler installed by the worker itself would
    leave its start-up exposed to a Ctrl-C). This thread's mask is restored on leaving; a
    signal sent meanwhile is not lost, it is handled once the block ends. The workers are then
    stopped by their parent (``Process.kill``). Without ``pthread_sigmask`` this does nothing.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    # started here, not within the block: starting it unblocks SIGINT and SIGTERM in this thread
    # (and the tracker ignores those two). SIGHUP, to a closed terminal's whole process group,
    # would kill it, and every later clean-up would print a traceback: it starts with SIGHUP
    # blocked, which it keeps
    others = [signum for signum in GROUP_SIGNALS if signum not in (signal.SIGINT, signal.SIGTERM)]
    before = signal.pthread_sigmask(signal.SIG_BLOCK, others)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def init_worker(parent_pid: int) -> None:
    """Initializer of a worker process: ignore the signals a process group gets (:data:`GROUP_SIGNALS`),
    and die with the parent.

    On Linux the worker asks the kernel for SIGKILL when its parent exits (``PR_SET_PDEATHSIG``),
    so not even a killed parent leaves it running; if the parent is already gone it exits.

    Parameters
    ----------
    parent_pid
        Process id of the process that started this worker.
    """
    for signum in GROUP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    import logging

    # matplotlib's warning about an unusable configuration folder is the main process's to give
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no usable libc: the parent still stops its workers
            pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


def kill_child_processes(timeout: float = 1.0) -> None:
    """Kill every live ``multiprocessing`` child of this process and reap it (a last resort
    after an interrupt, for workers whose owner had no chance to stop them)."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout)
