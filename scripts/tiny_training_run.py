"""A short real training run on a tiny generator, to see the method learn on a CPU in minutes.

Makes a small dataset from a seeded random 32x32 StyleGAN2, trains the real encoder classes (random
weights, small inputs) with the paper's schedule, losses and learning rates, and prints the same-image
reconstruction loss curve as JSON (mean over windows of same-image steps). The run directory holds
losses.jsonl, TensorBoard logs, sample grids and checkpoints.

    python scripts/tiny_training_run.py --steps 600 --out /tmp/tiny_run     # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from deid.nets.encoders import AttributeEncoderConfig, IdentityEncoderConfig, LandmarkEncoderConfig
from deid.nets.model import ModelConfig
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator
from deid.train.config import TrainConfig
from deid.train.make_dataset import MakeDatasetConfig, make_dataset
from deid.train.trainer import train

GENERATOR = GeneratorConfig(resolution=32, z_dim=64, w_dim=64, mapping_layers=2, channel_base=256, channel_max=32)
ENCODERS = dict(
    identity=IdentityEncoderConfig(source="random", seed=1, input_size=80),
    attributes=AttributeEncoderConfig(source="random", seed=2, input_size=75),
    landmarks=LandmarkEncoderConfig(source="random", seed=3, modules=1, input_size=64),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=48, help="dataset size")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--window", type=int, default=40, help="same-image steps per curve point")
    parser.add_argument("--out", type=Path, default=Path("/tmp/deid_tiny_run"))
    args = parser.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    G = load_generator("random", config=GENERATOR, seed=0)
    make_dataset(MakeDatasetConfig(out=args.out / "data", n=args.samples, generator="random", seed=0, batch_size=16,
                                   device="cpu"), generator=G)
    model = ModelConfig(**ENCODERS).for_generator(G)
    config = TrainConfig(data=args.out / "data", out=args.out / "run", model=model, steps=args.steps,
                         batch_size=args.batch_size, device="cpu", checkpoint_every=args.steps, sample_every=100)
    rec: list[tuple[int, float]] = []
    start = time.perf_counter()
    train(config, on_step=lambda step, losses: rec.append((step, float(losses["reconstruction"]))) if "reconstruction" in losses else None)
    seconds = time.perf_counter() - start
    curve = [
        {"steps": f"{rec[i][0]}-{rec[min(i + args.window, len(rec)) - 1][0]}",
         "reconstruction": round(sum(v for _, v in rec[i:i + args.window]) / len(rec[i:i + args.window]), 4)}
        for i in range(0, len(rec), args.window)
    ]
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "dataset": args.samples,
                      "seconds": round(seconds, 1), "steps_per_second": round(args.steps / seconds, 3),
                      "reconstruction_first": curve[0]["reconstruction"], "reconstruction_last": curve[-1]["reconstruction"],
                      "curve": curve, "run": str(config.out)}, indent=1))


if __name__ == "__main__":
    main()
