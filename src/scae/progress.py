"""Progress bars (tqdm) that cost nothing when they are off.

A tqdm bar, even a disabled one, creates a ``multiprocessing`` lock as it is made, which fixes the
process's default start method for the rest of the session (a later
``multiprocessing.set_start_method`` then fails), and starts a monitor thread; it also writes to a
``sys.stderr`` that may be ``None`` (``pythonw``, some services). :func:`progress_bar` makes one only
when it is shown and there is a standard error to show it on.
"""

from __future__ import annotations

import sys


class NoBar:
    """What :func:`progress_bar` gives when nothing is shown: the bar's methods scae calls, doing nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(show: bool, **kwargs):
    """A ``tqdm.auto.tqdm(**kwargs)`` bar when ``show`` and ``sys.stderr`` exists, else a :class:`NoBar`."""
    if not show or sys.stderr is None:
        return NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
