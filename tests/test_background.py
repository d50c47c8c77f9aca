"""Background jobs: the same named results in this process and in a worker process."""

from __future__ import annotations

import operator
import time

import numpy as np
import pytest

from scae.background import BackgroundJobs, WorkerDiedError


@pytest.mark.parametrize("workers", [0, 1])
def test_jobs_return_results_by_name_in_submission_order(workers):
    with BackgroundJobs(workers=workers) as jobs:
        jobs.submit("sum", np.sum, np.arange(10))
        jobs.submit("power", pow, 2, 10)
        jobs.submit("product", operator.mul, 6, 7)
        results = jobs.results()
    assert list(results) == ["sum", "power", "product"]
    assert results == {"sum": 45, "power": 1024, "product": 42}
    assert set(jobs.seconds) == set(results) and all(s >= 0 for s in jobs.seconds.values())


def test_jobs_refuse_a_repeated_name_and_a_non_function():
    with BackgroundJobs(workers=0) as jobs:
        jobs.submit("a", pow, 2, 3)
        with pytest.raises(ValueError, match="'a' was submitted twice"):
            jobs.submit("a", pow, 2, 3)
        with pytest.raises(TypeError, match="'b': expected a function, got ndarray"):
            jobs.submit("b", np.zeros(3))  # the old BackgroundTSNE.submit(key, X) call
        assert jobs.results() == {"a": 8}


def test_a_failing_job_raises_its_error_from_results():
    with pytest.raises(ZeroDivisionError), BackgroundJobs(workers=1) as jobs:
        jobs.submit("bad", operator.truediv, 1, 0)
        jobs.results()


def _kill_this_process() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_a_job_that_kills_its_worker_every_time_is_never_run_here(capsys):
    """The pool restarts once; a job that kills the fresh worker too ends in WorkerDiedError
    (one clean line in the command line), not in a crash of this process."""
    with pytest.raises(WorkerDiedError, match=r"died again \(killed by SIGKILL, out of memory\?\)"):
        with BackgroundJobs(workers=1) as jobs:
            jobs.submit("dies", _kill_this_process)
            jobs.results()
    assert capsys.readouterr().err.count("stopped unexpectedly (killed by SIGKILL, out of memory?); restarting it") == 1


def _kill_worker(jobs: BackgroundJobs) -> None:
    import os
    import signal

    worker = next(iter(jobs._pool._processes.values()))
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)


def test_jobs_of_a_killed_worker_are_taken_over_by_a_fresh_one(capsys):
    """A worker killed from outside (the out-of-memory killer): fresh workers compute the jobs
    whose results did not come back and the later ones; same results, in submission order."""
    with BackgroundJobs(workers=1) as jobs:
        jobs.submit("first", pow, 3, 2)
        assert jobs.results() == {"first": 9}
        _kill_worker(jobs)
        jobs.submit("a", operator.mul, 6, 7)
        jobs.submit("b", np.sum, np.arange(4))
        results = jobs.results()
        jobs.submit("c", pow, 2, 3)
        assert jobs.results() == {"c": 8}
    assert list(results) == ["a", "b"] and results == {"a": 42, "b": 6}
    assert capsys.readouterr().err.count("stopped unexpectedly") == 1


def test_a_second_dead_worker_raises():
    with pytest.raises(WorkerDiedError, match="died again"), BackgroundJobs(workers=1) as jobs:
        jobs.submit("a", pow, 2, 2)
        _kill_worker(jobs)
        assert jobs.results() == {"a": 4}
        _kill_worker(jobs)
        jobs.submit("b", pow, 2, 3)
        jobs.results()


class _DeadWorker:
    """A worker process as the pool's thread may fail to report it: gone, killed by SIGKILL."""

    exitcode = -9

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass


def _slow_the_first_time(marker: str) -> str:
    import os
    import time

    if os.path.exists(marker):
        os.remove(marker)
        time.sleep(30)
        return "slow"
    return "done"


def test_a_dead_worker_the_pool_never_reports_is_noticed_while_waiting(tmp_path, capsys, monkeypatch):
    """On Python 3.11 a worker killed while sending a result can leave the pool's thread waiting for
    the rest of it forever, its futures never failed: results() checks its workers itself."""
    from scae import background

    monkeypatch.setattr(background, "DEAD_WORKER_GRACE_SECONDS", 0.5)
    marker = tmp_path / "first"
    marker.write_text("")
    with BackgroundJobs(workers=1) as jobs:
        jobs.submit("job", _slow_the_first_time, str(marker))
        deadline = time.monotonic() + 60
        while marker.exists() and time.monotonic() < deadline:  # the worker has started the slow run
            time.sleep(0.02)
        jobs._processes = [_DeadWorker(), *jobs._processes]  # the real one is killed with the pool
        assert jobs.results() == {"job": "done"}  # rerun by a fresh worker, not the 30 s first run
    assert "stopped unexpectedly (killed by SIGKILL, out of memory?); restarting it" in capsys.readouterr().err


def _pid_after(seconds: float) -> int:
    import os

    time.sleep(seconds)
    return os.getpid()


def test_light_jobs_run_here_while_the_worker_is_busy_and_go_to_it_when_it_has_room():
    """A light job submitted behind a backlog (more unfinished jobs than workers) waits here and
    runs in this process once results() is called; one submitted when the worker has room, or
    still waiting when the next job is submitted and the backlog is gone, goes to the worker."""
    import os

    here = os.getpid()
    with BackgroundJobs(workers=1) as jobs:
        jobs.submit("free", _pid_after, 0.0, light=True)  # no backlog: to the worker
        assert jobs.results()["free"] != here
        jobs.submit("heavy1", _pid_after, 0.6)
        jobs.submit("heavy2", _pid_after, 0.6)
        jobs.submit("behind", _pid_after, 0.0, light=True)  # backlog of 2 > 1 worker: waits here
        results = jobs.results()
        assert list(results) == ["heavy1", "heavy2", "behind"]
        assert results["heavy1"] == results["heavy2"] != here
        assert results["behind"] == here
        assert set(jobs.seconds) >= {"heavy1", "heavy2", "behind"}

        jobs.submit("heavy3", _pid_after, 0.3)
        jobs.submit("heavy4", _pid_after, 0.3)
        jobs.submit("waiting", _pid_after, 0.0, light=True)  # waits here ...
        time.sleep(1.5)  # ... until the backlog is gone: the next submission hands it over first
        jobs.submit("last", _pid_after, 0.0)
        results = jobs.results()
        assert list(results) == ["heavy3", "heavy4", "waiting", "last"]
        assert results["waiting"] != here and results["last"] != here


def test_light_jobs_without_workers_run_here_in_submission_order():
    import os

    with BackgroundJobs(workers=0) as jobs:
        jobs.submit("a", _pid_after, 0.0, light=True)
        jobs.submit("b", pow, 2, 5)
        assert jobs.results() == {"a": os.getpid(), "b": 32}


def test_idle_workers_are_killed_at_exit_but_a_restarted_pool_is_shut_down_in_order(monkeypatch):
    """An idle worker is killed (its interpreter's exit is slow); after a worker died, the fresh
    pool is shut down in order, since the command line then skips Python's clean-up at exit."""
    stopped = []
    real_stop = BackgroundJobs._stop_workers
    monkeypatch.setattr(BackgroundJobs, "_stop_workers", lambda self: (stopped.append(True), real_stop(self)))
    with BackgroundJobs(workers=1) as jobs:
        jobs.submit("a", pow, 3, 2)
        assert jobs.results() == {"a": 9}
    assert stopped == [True]
    stopped.clear()
    with BackgroundJobs(workers=1) as jobs:
        jobs.submit("a", pow, 3, 2)
        jobs.results()
        _kill_worker(jobs)
        jobs.submit("b", pow, 2, 3)
        assert jobs.results() == {"b": 8} and jobs._restarted
        pool = jobs._pool
    assert stopped == [] and pool._shutdown_thread


HALF_A_RESULT_SCRIPT = '''
import os, struct, sys, threading, time
from scae.background import BackgroundJobs


def half_a_result(marker):
    """Write the start of a result message, as a worker killed while sending one leaves it."""
    frame = sys._getframe()
    while "result_queue" not in frame.f_locals:
        frame = frame.f_back
    os.write(frame.f_locals["result_queue"]._writer.fileno(), struct.pack("!i", 1 << 20) + b"partial")
    open(marker, "w").close()
    time.sleep(120)


def half_a_result_then_die(_):
    import signal

    frame = sys._getframe()
    while "result_queue" not in frame.f_locals:
        frame = frame.f_back
    os.write(frame.f_locals["result_queue"]._writer.fileno(), struct.pack("!i", 1 << 20) + b"partial")
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__" and sys.argv[2:] == ["unfinished"]:
    with BackgroundJobs(workers=1) as jobs:  # left with jobs unfinished and their worker dead
        jobs.submit("dies", half_a_result_then_die, 1)
        jobs.submit("other", time.sleep, 0.1)
        time.sleep(2)
    print("pool left", flush=True)
elif __name__ == "__main__":
    marker = sys.argv[1]
    try:
        with BackgroundJobs(workers=1) as jobs:
            jobs.submit("job", half_a_result, marker)
            while not os.path.exists(marker):
                time.sleep(0.02)
            time.sleep(0.5)  # the pool's thread is now reading the rest of the message
            raise RuntimeError("stop")  # an error in the caller: the busy worker is killed
    except RuntimeError:
        pass
    managers = [t for t in threading.enumerate() if type(t).__name__ == "_ExecutorManagerThread"]
    for thread in managers:
        thread.join(10)
    print("pool thread stopped" if not any(t.is_alive() for t in managers) else "pool thread stuck", flush=True)
'''


def test_a_worker_killed_while_sending_a_result_does_not_hang_the_interpreter_at_exit(tmp_path):
    """The pool's thread, left reading the rest of a half-sent result, is released when the
    workers are killed: Python's exit waits for that thread (a test run once never ended so)."""
    import subprocess
    import sys

    from conftest import REPO, scae_env

    script = tmp_path / "half_a_result.py"
    script.write_text(HALF_A_RESULT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "started")], cwd=REPO, env=scae_env(),
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "pool thread stopped"


def test_a_pool_left_with_unfinished_jobs_and_a_dead_worker_does_not_hang(tmp_path):
    """Leaving the block without results() shuts the pool down in order, except when a worker is
    dead: its half-sent result would keep that shutdown waiting for ever."""
    import subprocess
    import sys

    from conftest import REPO, scae_env

    script = tmp_path / "half_a_result.py"
    script.write_text(HALF_A_RESULT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "unused"), "unfinished"], cwd=REPO,
                          env=scae_env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "pool left"
