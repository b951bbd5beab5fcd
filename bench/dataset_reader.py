"""Training reader speed: (image, w) pairs per second from a generated dataset, by DataLoader workers.

    python bench/dataset_reader.py [--n 96] [--resolution 256] [--batch-size 6] [--workers 0 1 2]

Builds a small dataset in the real on-disk format (PNG + ws.npy, via make_dataset with a narrow random
generator, so building is quick), then times full passes of a shuffled DataLoader. Prints one JSON object.
Compare samples/s with the training loop's consumption (batch 6 x steps/s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import deid  # noqa: F401 - before torch: deid sets torch's OpenMP spin as the CLI runs it (deid/__init__.py)
import torch

from deid.console import set_quiet
from deid.dataset import GeneratedDataset
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator
from deid.train.make_dataset import MakeDatasetConfig, make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        G = load_generator("random", config=GeneratorConfig(resolution=args.resolution, channel_base=2048, channel_max=64))
        t = time.perf_counter()
        make_dataset(MakeDatasetConfig(out=root, n=args.n, generator="random", device="cpu", batch_size=8), generator=G)
        build = time.perf_counter() - t
        png_bytes = sum(p.stat().st_size for p in root.rglob("*.png")) / args.n
        results = {}
        for workers in args.workers:
            loader = torch.utils.data.DataLoader(GeneratedDataset(root), batch_size=args.batch_size, shuffle=True,
                                                 num_workers=workers, persistent_workers=workers > 0, drop_last=True)
            next(iter(loader))  # start the workers
            t = time.perf_counter()
            count = 0
            for _ in range(args.epochs):
                for images, ws in loader:
                    count += images.shape[0]
            seconds = time.perf_counter() - t
            results[f"workers_{workers}"] = {"samples_per_second": round(count / seconds, 1),
                                             "batches_per_second": round(count / seconds / args.batch_size, 1)}
    print(json.dumps({"benchmark": "dataset_reader", "resolution": args.resolution, "batch_size": args.batch_size,
                      "samples": args.n, "mean_png_bytes": round(png_bytes), "dataset_build_seconds": round(build, 2),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
