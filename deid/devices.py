"""Device and numeric precision: which processor a command runs on, and in which float type."""

from __future__ import annotations

import contextlib

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
