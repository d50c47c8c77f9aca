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
    os.write(2, f"scae: interrupted ({signal.Signals(signum).name}) while starting; nothing was written\n".encode())
    os._exit(128 + signum)


def console() -> None:
    """Entry point of the ``scae`` console script."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _while_starting)
    from scae.cli import main

    sys.exit(main())


if __name__ == "__main__":
    console()
