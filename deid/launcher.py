"""The `deid` console script's entry point: Ctrl-C is one line and exit 130 from the first instant.

Importing the command line (torch, PyAV, the networks) takes seconds; a Ctrl-C in that time used to print a raw
KeyboardInterrupt traceback. The handler below is installed before those imports and replaced by Python's own
once they are done, when `deid.cli.main` handles Ctrl-C itself (cleaning up what a command was writing).
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    # Nothing has been written yet, so there is nothing to clean up: leave at once, without unwinding the imports.
    sys.stderr.write("error: interrupted.\n")
    sys.stderr.flush()
    os._exit(130)


# Only where Ctrl-C would interrupt anyway: a job started with SIGINT ignored (`nohup`, `cmd &` in a script) keeps it so.
_previous = signal.getsignal(signal.SIGINT)
if _previous is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from deid.cli import main as _main  # noqa: E402 - after the handler, on purpose

signal.signal(signal.SIGINT, _previous)


def main(argv: list[str] | None = None) -> None:
    """`deid ...`: see deid.cli.main."""
    _main(argv)
