"""Single-threaded jobs run in background worker processes.

The study hands its t-SNEs and cluster scores to :class:`BackgroundJobs` as soon as their
inputs exist, and trains its models meanwhile on the cores the workers leave. Every job runs
on one thread, so its result does not depend on the number of workers or on what else runs.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Self

from scae.errors import ScaeInputError
from scae.interrupts import init_worker, signals_blocked_in_children, signals_deferred
from scae.progress import progress_bar


POLL_SECONDS = 0.5
"""How often :meth:`BackgroundJobs.results` checks that its workers are alive while it waits."""
DEAD_WORKER_GRACE_SECONDS = 2.0
"""How long a dead worker may go unnoticed by the pool before :meth:`BackgroundJobs.results`
treats the pool as broken itself."""

_worker_died_here = False


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def background_workers() -> int:
    """Worker processes for the study's t-SNEs and scores on this machine: half its cores (the
    other half trains the models), none on a single core.

    Measured on 2 cores (``benchmarks/study.py``): one worker beside one training thread takes
    as long as two workers at idle CPU priority (46.8 s), with 440 MiB less memory; two workers
    at normal priority took 56–58 s, as every process then waits for a core.
    """
    return available_cores() // 2


def worker_died() -> bool:
    """Whether a background worker of this process died: the executor's own threads may then be
    stuck, so the command line leaves without waiting on them at exit."""
    return _worker_died_here


class WorkerDiedError(ScaeInputError):
    """The background worker process died twice (see :class:`BackgroundJobs`); the command line
    prints the message as one line and exits with status 2."""


def _import(modules: Sequence[str]) -> None:
    """Import ``modules`` in a fresh worker (while the caller does other work)."""
    for name in modules:
        importlib.import_module(name)


def run_single_threaded(fn: Callable, *args) -> tuple[Any, float]:
    """``fn(*args)`` with BLAS and OpenMP limited to one thread, and the seconds it took."""
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with threadpool_limits(1):
        result = fn(*args)
    return result, time.perf_counter() - started


def _how(exit_codes: list[int]) -> str:
    """How a dead worker ended, from its exit code (negative: the signal that killed it)."""
    if not exit_codes:
        return "it was gone"
    code = exit_codes[0]
    if code > 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}" + (", out of memory?" if -code == signal.SIGKILL else "")
    except ValueError:
        return f"killed by signal {-code}"


def _exit_codes(processes: list, wait: float = 1.0) -> list[int]:
    """Exit codes of the processes that have ended, once at least one has (the pool's own
    thread may still be reaping the one that died)."""
    deadline = time.monotonic() + wait
    while True:
        codes = [p.exitcode for p in processes if not p.is_alive() and p.exitcode]
        if codes or time.monotonic() > deadline:
            return codes
        time.sleep(0.02)


class BackgroundJobs:
    """Named single-threaded jobs, run in worker processes while the caller does other work.

    Jobs are handed over with :meth:`submit` as soon as their inputs exist; :meth:`results`
    waits for all of them. ``workers`` processes (started with "spawn") run them side by side:
    independent single-threaded jobs use the cores better than one multi-threaded job at a
    time. The workers start at once and import ``warm_up`` modules. With ``workers=0`` the jobs
    run in this process when :meth:`results` is called. Results never depend on ``workers``.

    Give the workers cores of their own: a multi-threaded computation of the caller (PyTorch
    training) that shares its cores with busy processes stalls at every synchronisation point
    (measured on 2 cores: 8.5 s for a model that trains in 2.9 s alone).

    :meth:`results` can be called again for jobs submitted after it. ``seconds`` holds each
    finished job's own computing time. With ``workers >= 1``,
    a Python *script* that uses this must keep its top-level code under
    ``if __name__ == "__main__":``, and job functions must be importable module-level functions.

    A worker that dies (killed by the kernel's out-of-memory killer, or by hand) breaks the pool:
    fresh workers take over the jobs whose results did not come back (one warning line on
    stderr). If they die too, :class:`WorkerDiedError` is raised: a job that crashes its
    process every time is never run in this one.

    Use as a context manager so the worker processes are always shut down (killed at once
    after an exception or an interrupt)::

        with BackgroundJobs(workers=2) as jobs:
            jobs.submit("scores", some_function, matrix, labels)
            ...  # other work, more submissions
            results = jobs.results()
    """

    def __init__(self, workers: int = 0, progress: bool = False, warm_up: Sequence[str] = (),
                 description: str = "background jobs") -> None:
        self._progress, self._description = progress, description
        self._warm_up = tuple(warm_up)
        self._restarted = False
        self.workers = max(0, int(workers))
        self._keys: list[str] = []  # submitted since the last results()
        self._names: set[str] = set()
        # waiting here: every job without workers, the light ones behind a backlog
        self._inline: dict[str, tuple[Callable, tuple]] = {}
        self._pool = None
        self._processes: list = []
        self._results_writer = None  # this process's end of the pool's results pipe
        self._futures: dict = {}
        self._submitted: dict[str, tuple[Callable, tuple]] = {}  # pool jobs, kept until their result is in
        self.seconds: dict[str, float] = {}
        if workers >= 1:
            self._start_workers()

    def _start_workers(self) -> None:
        """Start the pool: ``workers`` spawned processes, each importing ``warm_up`` at once."""
        context = multiprocessing.get_context("spawn")  # no fork after OpenMP/torch threads
        try:
            # workers ignore the group signals (SIGINT, SIGTERM, SIGHUP, …) from their first instruction: a Ctrl-C to the
            # process group reaches only this process, which then stops them. Deferred too: a signal
            # the kernel hands to another thread (NumPy's BLAS threads do not block it) would still
            # raise here, between starting a worker and sending it what it starts from
            with signals_blocked_in_children(), signals_deferred():
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=context,
                    initializer=init_worker, initargs=(os.getpid(),),
                )
                for _ in range(self.workers):  # one task each starts every worker now
                    self._pool.submit(_import, self._warm_up)
            # kept: a broken pool forgets its processes, and their exit codes say what happened;
            # and shutdown() forgets its results pipe, which _kill_workers may have to close
            self._processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._results_writer = getattr(getattr(self._pool, "_result_queue", None), "_writer", None)
        except BaseException:
            self._stop_workers()
            raise

    def submit(self, key: str, fn: Callable, *args, light: bool = False) -> None:
        """Start ``fn(*args)`` (single-threaded) under the name ``key``.

        A ``light`` job (short next to the others: cluster scores beside t-SNEs) goes to the
        workers only while they have no backlog (no more unfinished jobs than workers); otherwise
        it waits here, and :meth:`results` runs it in this process while the workers are busy,
        so that a caller which runs out of its own work first takes some of theirs. Jobs never
        move once handed to the workers.
        """
        if key in self._names:
            raise ValueError(f"background job '{key}' was submitted twice")
        if not callable(fn):
            raise TypeError(f"background job '{key}': expected a function, got {type(fn).__name__}")
        self._names.add(key)
        self._keys.append(key)
        if self._pool is None:
            self._inline[key] = (fn, args)
            return
        self._hand_over_waiting()  # earlier light jobs first, while the workers have room
        if light and self._unfinished() > self.workers:
            self._inline[key] = (fn, args)
            return
        self._submitted[key] = (fn, args)
        self._send_guarded(key)

    def results(self) -> dict[str, Any]:
        """Wait for (or compute) the result of every job submitted since the previous call; keys in
        the order they were submitted (``seconds`` gains their computing times).

        Jobs waiting here (all of them without workers; the light ones the workers had no room
        for) run in this process, one at a time, while every worker is busy; whenever one is idle,
        the next waiting job goes to it instead."""
        bar = progress_bar(self._progress, total=len(self._keys), desc=self._description, unit="job", leave=False)
        out: dict[str, tuple[Any, float]] = {}
        try:
            dead_since = None
            while self._inline:  # each job's arguments are released once it has run or left
                self._collect(out, bar, timeout=0)
                key = next(iter(self._inline))
                fn, args = self._inline.pop(key)
                if self._pool is not None and self._unfinished() < self.workers:
                    self._submitted[key] = (fn, args)
                    self._send_guarded(key)
                else:
                    out[key] = run_single_threaded(fn, *args)
                    bar.update()
            while self._futures:
                if self._collect(out, bar, timeout=POLL_SECONDS):
                    continue
                # a worker killed while sending a result can leave the pool's thread waiting for
                # the rest of it forever, the pool never told broken (Python 3.11)
                if any(not p.is_alive() for p in self._processes):
                    dead_since = dead_since or time.monotonic()
                    if time.monotonic() - dead_since > DEAD_WORKER_GRACE_SECONDS:
                        dead_since = None
                        self._worker_died()
        finally:
            bar.close()
        keys, self._keys, self._futures = self._keys, [], {}
        self.seconds.update({key: out[key][1] for key in keys})
        return {key: out[key][0] for key in keys}

    def _collect(self, out: dict, bar, timeout: float) -> bool:
        """Move the results that are in (waiting up to ``timeout`` s for one) into ``out``;
        whether there was any. A broken pool is restarted (:meth:`_worker_died`)."""
        if not self._futures:
            return False
        done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        try:
            for future in done:
                key = self._futures.pop(future)
                out[key] = future.result()
                self._submitted.pop(key, None)
                bar.update()
        except BrokenProcessPool:
            self._worker_died()  # fresh workers take the rest over, or it raises
        return bool(done)

    def _unfinished(self) -> int:
        """Jobs handed to the workers whose result has not come in."""
        return sum(not future.done() for future in self._futures)

    def _hand_over_waiting(self) -> None:
        """Hand waiting light jobs to the workers, oldest first, while they have room."""
        while self._inline and self._unfinished() <= self.workers:
            key = next(iter(self._inline))
            self._submitted[key] = self._inline.pop(key)
            self._send_guarded(key)

    def _send_guarded(self, key: str) -> None:
        """:meth:`_send`, restarting a broken pool (which sends every job left, this one too)."""
        try:
            self._send(key)
        except BrokenProcessPool:
            self._worker_died()
        except BaseException:
            self._stop_workers()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        """Shut the workers down: idle ones (every result in) and, after an exception (an interrupt
        included), busy ones too are killed at once; otherwise wait for their jobs. A pool that
        replaced a dead worker's is shut down in order: the command line then leaves without
        Python's clean-up at exit, so its queues must be released here."""
        orderly = exc_type is None and self._pool is not None and (self._unfinished() or self._restarted)
        if orderly and all(process.is_alive() for process in self._processes):  # a dead one may have left
            self._pool.shutdown(wait=True, cancel_futures=True)  # the pool's thread waiting for ever
        else:  # an idle worker only waits for work: killing it spares its interpreter's slow exit
            self._stop_workers()

    def _worker_died(self) -> None:
        """The pool broke (a worker process died): the first time, start fresh workers and hand
        them every job whose result did not come back, in the order they were submitted (one
        warning line); the second time, raise :class:`WorkerDiedError`."""
        global _worker_died_here
        _worker_died_here = True
        codes = _exit_codes(self._processes)
        self._kill_workers()
        if self._restarted:
            raise WorkerDiedError(
                f"a background worker process (t-SNE, cluster scores, figures) died again ({_how(codes)}); "
                "stopping. If memory is short, give the study more or a smaller input"
            )
        self._restarted = True
        if sys.stderr is not None:
            from tqdm.auto import tqdm  # its write keeps a progress bar on screen intact

            tqdm.write(f"scae: warning: a background worker process stopped unexpectedly ({_how(codes)}); "
                       "restarting it", file=sys.stderr)
        self._start_workers()
        self._futures = {}
        try:
            for key in self._submitted:
                self._send(key)
        except BrokenProcessPool:
            self._worker_died()

    def _send(self, key: str) -> None:
        """Hand the submitted job ``key`` to the pool."""
        fn, args = self._submitted[key]
        self._futures[self._pool.submit(run_single_threaded, fn, *args)] = key

    def _stop_workers(self) -> None:
        """Shut the pool down without waiting for running jobs, and kill its workers."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._kill_workers()

    def _kill_workers(self, timeout: float = 1.0) -> None:
        """Kill and reap the worker processes, and drop the pool. Alone (without ``shutdown()``)
        for a broken pool: its own thread is shutting it down and may hold the lock that
        ``shutdown()`` takes (a hostile test hung there once, on Python 3.11)."""
        # ProcessPoolExecutor.kill_workers() is public only from Python 3.14
        processes = {*self._processes, *(getattr(self._pool, "_processes", None) or {}).values()}
        for process in processes:
            process.kill()
        for process in processes:
            process.join(timeout)
        # A worker killed while sending a result leaves the pool's thread reading the rest of it
        # for ever, and Python's exit waits for that thread (an interpreter that never ends).
        # The workers held the results pipe's other ends; with this process's closed too, the
        # read ends (EOF), and the thread stops.
        if self._results_writer is not None and all(not process.is_alive() for process in processes):
            self._results_writer.close()
        self._pool, self._processes, self._results_writer = None, [], None
