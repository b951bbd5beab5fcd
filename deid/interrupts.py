"""SIGTERM (what `timeout`, `docker stop` and Slurm send) ends a command the way Ctrl-C does.

Python turns SIGINT into KeyboardInterrupt, so every `finally` runs and `atomic_output` removes its temporary
file; SIGTERM's default kills the process on the spot and leaves that file behind. Inside `sigterm_as_interrupt`
the first SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread instead; a second one kills as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (signals can only be handled there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up kills at once
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
