"""Training speed: optimisation steps per second at the paper's batch (6) with the full 256 architecture
(StyleGAN2 256, FaceNet at 160, InceptionV3 at 299, 2DFAN4 at 256), random weights. Prints JSON.

    python bench/train_step.py                       # CPU, batch 6, 3 timed steps
    python bench/train_step.py --device cuda --steps 20 --precision bf16
    python bench/train_step.py --validation-batches 1   # also the cost of validation (50 batches by default)

Timed steps start at step 2 and follow the schedule (cross pairs every third step, adversarial updates
on even steps), so three or more timed steps cover every kind of step.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import deid  # noqa: F401 - before torch: deid sets torch's OpenMP spin as the CLI runs it (deid/__init__.py)
import torch

from deid.nets.encoders import AttributeEncoderConfig, IdentityEncoderConfig, LandmarkEncoder, LandmarkEncoderConfig
from deid.nets.model import Disentangler, ModelConfig, build_discriminator
from deid.devices import resolve_device, resolve_dtype
from deid.distributed import Dist
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator
from deid.train.config import TrainConfig
from deid.train.trainer import Trainer
from deid.train.validation import measure, validation_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after two warm-up steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--validation-batches", type=int, default=0, help="also time this many validation batches")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    G = load_generator("random", config=GeneratorConfig(resolution=args.resolution), seed=0)
    model_config = ModelConfig(
        identity=IdentityEncoderConfig(source="random"),
        attributes=AttributeEncoderConfig(source="random"),
        landmarks=LandmarkEncoderConfig(source="random"),
    ).for_generator(G)
    config = TrainConfig(data=None, out=None, model=model_config, batch_size=args.batch_size, precision=args.precision)
    model = Disentangler(model_config, G).to(device)
    trainer = Trainer(config, model, LandmarkEncoder(model_config.landmarks).to(device),
                      build_discriminator(model_config, G.w_dim).to(device), dtype=dtype)

    # a batch of the generator's own samples, as the dataset would hold them
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.randn(2 * args.batch_size, G.z_dim, generator=gen).to(device)
        w = G.mapping(z)
        images = G.synthesis(w, noise_mode="const").clamp(-1, 1)
    first, second = images[: args.batch_size], images[args.batch_size:]

    def run(step: int) -> None:
        trainer.step(step, first, second if trainer.is_cross(step) else first, w[: args.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(0)  # warm-up: a cross step and a same-image step (allocations, kernel selection)
    run(1)
    times = []
    for step in range(2, args.steps + 2):
        start = time.perf_counter()
        run(step)
        times.append(time.perf_counter() - start)
    mean = sum(times) / len(times)
    print(json.dumps({
        "benchmark": "train_step", "resolution": args.resolution, "batch_size": args.batch_size,
        "device": str(device), "precision": args.precision, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "timed_steps": len(times),
        "seconds_per_step": round(mean, 3), "steps_per_second": round(1 / mean, 4),
        "step_seconds": [round(t, 3) for t in times],
        **(_validation_seconds(trainer, images, args.validation_batches, dtype) if args.validation_batches else {}),
    }, indent=1))


def _validation_seconds(trainer: Trainer, images: torch.Tensor, batches: int, dtype: torch.dtype) -> dict:
    """Seconds per cross-identity batch of deid.train.validation.measure, on the benchmark's own images."""
    pairs = validation_batches(0, len(images), batches, len(images) // 2, seed=0)
    start = time.perf_counter()
    measure(trainer.model.eval(), trainer.landmarks, pairs, lambda indices: images[indices], Dist(), dtype, 160)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    per_batch = (time.perf_counter() - start) / batches
    return {"validation_seconds_per_batch": round(per_batch, 2), "seconds_per_default_validation": round(50 * per_batch, 1)}


if __name__ == "__main__":
    main()
