"""Background jobs: the same named results in this process and in a worker process."""

from __future__ import annotations

import operator

import numpy as np
import pytest

from scae.background import BackgroundJobs


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
