"""Multi-process tests: two gloo ranks on this machine, with a bound on how long they may take."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp

# The suite runs on every core (pytest-xdist, setup.cfg). Tests that start processes of their own (gloo ranks, a Ray
# instance, the bench suite's groups) all go to one worker, one at a time: two of them side by side would compete
# for the cores their own processes need, and the Ray tests share one Ray instance.
OWN_PROCESSES = pytest.mark.xdist_group("own-processes")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the ranks' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, args: tuple, nprocs: int = 2, timeout: float = 300.0) -> None:
    """Run fn(rank, *args) in `nprocs` spawned processes and wait for them; a rank that fails raises here, and
    ranks still running after `timeout` seconds are killed and fail the test instead of stalling the run."""
    ranks = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            raise AssertionError(f"{nprocs} ranks of {fn.__name__} did not finish within {timeout:.0f} s")
