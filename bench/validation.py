"""Validation cost: seconds for one validation during training (deid.train.validation.measure) with the full
256 architecture (StyleGAN2 256, FaceNet at 160, InceptionV3 at 299, 2DFAN4 at 256), random weights, so a
user can choose --validate-every and --validation-batches. Prints JSON.

    python bench/validation.py --batches 1            # CPU, one cross batch of 6 (the default test has 50)
    python bench/validation.py --device cuda --batches 50 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from deid.nets.encoders import AttributeEncoderConfig, IdentityEncoderConfig, LandmarkEncoder, LandmarkEncoderConfig
from deid.nets.model import Disentangler, ModelConfig
from deid.runtime import Dist, resolve_device, resolve_dtype
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator
from deid.train.validation import measure, validation_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1, help="cross-identity batches (the default validation: 50)")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    G = load_generator("random", config=GeneratorConfig(resolution=args.resolution), seed=0)
    config = ModelConfig(identity=IdentityEncoderConfig(source="random"), attributes=AttributeEncoderConfig(source="random"),
                         landmarks=LandmarkEncoderConfig(source="random")).for_generator(G)
    model = Disentangler(config, G).to(device).eval()
    landmarks = LandmarkEncoder(config.landmarks).to(device)
    # a held-out pool of the generator's own samples, as the dataset would hold them
    pool = 2 * args.batch_size
    with torch.no_grad():
        z = torch.randn(pool, G.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
        images = G.synthesis(G.mapping(z), noise_mode="const").clamp(-1, 1)
    pairs = validation_batches(0, pool, args.batches + 1, args.batch_size, seed=0)

    def run(batches):
        start = time.perf_counter()
        measure(model, landmarks, batches, lambda indices: images[indices], Dist(), dtype, 160)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(pairs[:1])  # warm-up
    seconds = run(pairs[1:])
    print(json.dumps({
        "benchmark": "validation", "resolution": args.resolution, "batch_size": args.batch_size, "batches": args.batches,
        "device": str(device), "precision": args.precision, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "seconds": round(seconds, 2),
        "seconds_per_batch": round(seconds / args.batches, 2),
        "seconds_per_default_validation": round(50 * seconds / args.batches, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
