"""Static shards of a batch: each of N processes (a Slurm array, torchrun ranks) takes every N-th task."""

from __future__ import annotations

import os

from deid.errors import DeidError
from deid.pipelines.inputs import Task


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`K/N` (0-based K) -> (K, N); without a spec, torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if spec:
        try:
            k, n = (int(part) for part in spec.split("/"))
        except ValueError:
            raise DeidError(f"--shard {spec!r} is not K/N. Use e.g. --shard 0/4 for the first of four shards.") from None
        if not (n >= 1 and 0 <= k < n):
            raise DeidError(f"--shard {spec}: K must be in 0..N-1. Use e.g. --shard 0/4.")
        return k, n
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(tasks: list[Task], index: int, count: int) -> list[Task]:
    """This rank's share: every count-th task of the list sorted by source, so all ranks agree without talking."""
    ordered = sorted(tasks, key=lambda t: str(t.source))
    return ordered[index::count]
