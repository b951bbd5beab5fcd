"""The torchrun setup shared by training and dataset generation: this process's rank, device and collectives."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch

from deid.devices import resolve_device
from deid.errors import DeidError

T = TypeVar("T")


def rank_device(spec: str) -> str:
    """Under torchrun, `auto` means this rank's own GPU (cuda:LOCAL_RANK), not every rank on the first one."""
    if (spec or "auto") == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return spec


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def failures_shared(self) -> Iterator[None]:
        """Every rank runs the block; when it raises on any rank, every rank raises at the block's end.

        Without this, the ranks that did not fail wait in their next collective until its timeout (NCCL's is
        ten minutes). The exchange (one all-gather) also acts as a barrier. The failed rank raises its own
        exception, the others a RankFailed carrying the lowest failed rank's message. Blocks may nest, but
        must hold no collectives other than nested `failures_shared` blocks: a failing rank skips the rest of
        its block, so its next collective is this exchange."""
        if self.world == 1:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - shared with the other ranks, then raised again
            if getattr(exc, "shared_with_ranks", False):  # an inner block already told everyone
                raise
            error = exc
        reports: list[str | None] = [None] * self.world
        torch.distributed.all_gather_object(reports, None if error is None else _one_line(error))
        failed = [(rank, message) for rank, message in enumerate(reports) if message is not None]
        if error is not None:
            error.shared_with_ranks = True
            raise error
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} failed: {message}")

    def first_on_each_node(self, fn: Callable[[], object]) -> None:
        """Run fn() on the first rank of each node while the others wait (e.g. downloads into a shared cache);
        a failure there stops every rank with its message."""
        with self.failures_shared():
            if self.local_rank == 0:
                fn()

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 and its (picklable) result on every rank; a failure there stops every rank."""
        result: list = [None]
        with self.failures_shared():
            if self.main:
                result[0] = fn()
        if self.world > 1:
            torch.distributed.broadcast_object_list(result, src=0)
        return result[0]


def init_distributed(device_spec: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment, if any, and choose this process's device.

    Under torchrun a CUDA device is made the current one before the process group starts, so NCCL's
    collectives (barriers included) run on this rank's GPU and not all on GPU 0."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(rank_device(device_spec))
    if world <= 1:
        return Dist(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dist = Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return dist, device


class RankFailed(DeidError):
    """Another process of a torchrun job failed; the message is its own."""

    shared_with_ranks = True


def _one_line(error: BaseException) -> str:
    """What another rank prints of this rank's error: a DeidError's message, else the exception's type and first line."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(error, DeidError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
