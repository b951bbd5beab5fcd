"""Generator speed: images/s of the 256 px config (channel_base 16384, channel_max 512) at batch 1 and 8.

    python bench/generator.py [--device cpu] [--precision fp32] [--batches 1 8] [--repeats 3]

Prints one JSON object. NVIDIA's reference code runs this network at about 0.47 s/image on our 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import deid  # noqa: F401 - before torch: deid sets torch's OpenMP spin as the CLI runs it (deid/__init__.py)
import torch

from deid.devices import resolve_device, resolve_dtype
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator


def time_batch(G, batch: int, device, repeats: int) -> float:
    """Best-of-`repeats` seconds for one mapping + synthesis call of `batch` samples (after a warm-up)."""
    z = torch.randn(batch, G.z_dim, device=device)
    with torch.inference_mode():
        G.synthesis(G.mapping(z), noise_mode="const")
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            G.synthesis(G.mapping(z, truncation_psi=0.7), noise_mode="const")
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return best


def _load() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]  # other processes on the machine skew CPU timings
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads to try (torch.set_num_threads)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    config = GeneratorConfig(resolution=args.resolution, channel_base=16384, channel_max=512)
    G = load_generator("random", device=device, config=config).to(dtype)
    results = {}
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for batch in args.batches:
            seconds = time_batch(G, batch, device, args.repeats)
            results[f"threads_{threads}_batch_{batch}"] = {
                "seconds_per_batch": round(seconds, 4), "seconds_per_image": round(seconds / batch, 4),
                "images_per_second": round(batch / seconds, 3)}
    print(json.dumps({"benchmark": "generator", "resolution": args.resolution, "device": str(device),
                      "precision": args.precision, "torch": torch.__version__, "load_average": _load(),
                      "cpu": platform.processor() or platform.machine(), "reference_seconds_per_image_cpu": 0.47,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
