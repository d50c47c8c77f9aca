"""The ``scae`` command (and ``python -m scae``), with signals handled from its first instruction.

Until the command line installs its own handlers (:func:`scae.cli.main`), a SIGINT or SIGTERM
ends the process at once with one line: nothing has started, so nothing needs cleaning up, and
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


def console() -> None:
    """Entry point of the ``scae`` console script."""
    open_closed_standard_streams()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _while_starting)
    from scae.cli import main

    sys.exit(main())


if __name__ == "__main__":
    console()
