"""Device, numeric precision, bounded batch shapes and the torchrun setup shared by every command."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from deid.errors import DeidError

PRECISIONS = ("fp32", "bf16", "fp16")
T = TypeVar("T")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda|cuda:N|mps` into a torch.device, checking that it exists.

    `auto` picks the first CUDA device, else Apple's MPS, else the CPU.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeidError(f"--device {spec!r} is not a device. Use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeidError(f"--device {spec}: CUDA is not available on this machine. Use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeidError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here. Use cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeidError(f"--device {spec}: Apple MPS is not available on this machine. Use --device cpu.")
    elif device.type != "cpu":
        raise DeidError(f"--device {spec!r} is not supported. Use auto, cpu, cuda, cuda:N or mps.")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Map `fp32|bf16|fp16` to a dtype; fp16 is refused on the CPU, where it is slow and inexact."""
    if precision not in PRECISIONS:
        raise DeidError(f"--precision {precision!r} is not known. Use one of {', '.join(PRECISIONS)}.")
    if precision == "fp16" and device.type == "cpu":
        raise DeidError("--precision fp16 needs a GPU. Use --precision bf16 or fp32 on the CPU.")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Run the networks in `dtype` (weights stay fp32): torch.autocast for bf16/fp16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------ bounded batch shapes
# oneDNN (CPU) compiles and caches a primitive for every input shape it meets, and cuDNN autotuning and CUDA
# graphs pay once per shape too. A batch that follows the number of faces (or of MTCNN's candidate boxes) in a
# frame would make that cache grow with the length of a video; padding each batch up to the next of a few sizes
# bounds the set of shapes (and so the memory), at the cost of some zero rows.

FACE_BUCKETS = (1, 2, 4, 8, 16, 32)  # faces per generation batch; more run in chunks of 32
CANDIDATE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images or candidate boxes per MTCNN stage call


def bucket_size(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `count` items (at most the largest bucket)."""
    for size in buckets:
        if size >= count:
            return size
    raise ValueError(f"{count} items exceed the largest bucket, {buckets[-1]}")


def bucket_chunks(count: int, buckets: Sequence[int]) -> list[slice]:
    """Slices of at most the largest bucket that cover range(count)."""
    return [slice(start, min(start + buckets[-1], count)) for start in range(0, count, buckets[-1])]


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """x [N, ...] -> [size, ...]: x, then zero rows."""
    if len(x) == size:
        return x
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


class BucketedBatch(torch.nn.Module):
    """`module` run on its input's batch padded up to a bucket size, its outputs cut back to the real rows.

    Exact for modules that treat samples independently (no batch statistics), such as MTCNN's three nets.
    forward: x [N, ...] -> what `module` returns (a tensor or a tuple of tensors), each [N, ...]."""

    def __init__(self, module: torch.nn.Module, buckets: Sequence[int] = CANDIDATE_BUCKETS):
        super().__init__()
        self.module, self.buckets = module, tuple(buckets)

    def forward(self, x: torch.Tensor):
        parts = []
        for part in bucket_chunks(len(x), self.buckets) or [slice(0, 0)]:
            n = part.stop - part.start
            out = self.module(pad_batch(x[part], bucket_size(max(n, 1), self.buckets)))
            parts.append(tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n])
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)


# ------------------------------------------------------------------------------------ torchrun


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
