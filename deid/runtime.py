"""Device and numeric precision choices shared by every command."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from deid.errors import DeidError

PRECISIONS = ("fp32", "bf16", "fp16")


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
