"""Device and numeric precision: which processor a command runs on, and in which float type."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from deid.errors import DeidError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)
MODEL_PRECISIONS = ("auto",) + PRECISIONS  # what the commands that run a trained model accept


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
    return DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Run the networks in `dtype` (weights stay fp32): torch.autocast for bf16/fp16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): where bf16 is faster than fp32, not an
    emulation slower than it."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


@dataclass(frozen=True)
class Precision:
    """The float types a trained model's networks run in, under autocast (weights stay fp32).

    encoders: E_id, E_attr, E_lnd and the mapping M; generator: G's synthesis, most of the work.
    """

    encoders: torch.dtype = torch.float32
    generator: torch.dtype = torch.float32

    def encoding(self, device: torch.device):
        """The autocast the encoders and M run under on `device`."""
        return autocast(device, self.encoders)

    def generating(self, device: torch.device):
        """The autocast G's synthesis runs under on `device`."""
        return autocast(device, self.generator)

    @property
    def name(self) -> str:
        """For the records: `fp32`, `bf16`, or `fp32, generator bf16`."""
        names = {dtype: name for name, dtype in DTYPES.items()}
        encoders, generator = names[self.encoders], names[self.generator]
        return encoders if encoders == generator else f"{encoders}, generator {generator}"


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """`auto|fp32|bf16|fp16` -> the Precision a trained model runs in on `device`.

    `auto` is fp32, except G's synthesis in bf16 on a CPU with native bf16: there it is 1.5x faster and its
    images stay above 40 dB PSNR of fp32's on the test faces. The encoders stay fp32 because E_attr in bf16 moves
    the attribute code by 3 % and the image to about 30 dB (bench/README.md, "Precision on the CPU"). On GPUs
    `auto` is fp32 until the bench suite's synthesis rows have measured bf16 there.
    """
    if precision not in MODEL_PRECISIONS:
        raise DeidError(f"--precision {precision!r} is not known. Use one of {', '.join(MODEL_PRECISIONS)}.")
    if precision == "auto":
        fast_bf16 = device.type == "cpu" and native_bf16_cpu()
        return Precision(torch.float32, torch.bfloat16 if fast_bf16 else torch.float32)
    dtype = resolve_dtype(precision, device)
    return Precision(dtype, dtype)
