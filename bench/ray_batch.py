"""`deid anonymize --ray --workers 2` against two static shards (`--shard 0/2` and `--shard 1/2`, side by side) on one
folder of six crowd clips, one of them long: wall time of each, end to end (process start, Ray start, model loading).

    python bench/ray_batch.py [--long-frames 60] [--short-frames 12] [--fps 5] [--repeats 1] [--threads 1]

The shards take every other file of the sorted list, so the long clip shares its shard with two short ones, while Ray
hands the long one out first and the short ones to the other actor. Both variants run with the tiny preset model
(random weights), the audit on, and `--threads` torch threads per process (a Ray actor runs one per CPU it holds);
each repeat runs the shards, then Ray. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prepare(folder: Path, long_frames: int, short_frames: int, fps: int) -> tuple[Path, Path]:
    """Six crowd clips (clip0 is the long one) and the tiny model saved as a checkpoint; returns (inputs, model)."""
    from deid.media.samples import make_crowd_clip
    from deid.nets.model import Disentangler
    from deid.nets.presets import TINY_GENERATOR_CONFIG, TINY_MODEL_CONFIG
    from deid.runs import checkpoint_path
    from deid.stylegan.loading import load_generator

    inputs = folder / "clips"
    inputs.mkdir()
    for index in range(6):
        frames = long_frames if index == 0 else short_frames
        make_crowd_clip(inputs / f"clip{index}.mp4", frames / fps, fps=fps, seed=index)
    model = Disentangler(TINY_MODEL_CONFIG, load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)).eval()
    return inputs, model.save(checkpoint_path(folder / "run", 0), step=0)


def _command(inputs: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deid.cli", "-q", "anonymize", str(inputs), "-o", str(output), "--model", str(model),
            "--device", "cpu", *extra]


def _timed(commands: list[list[str]], env: dict[str, str]) -> float:
    """Wall seconds until every command (started together) has finished; each must succeed."""
    start = time.perf_counter()
    processes = [subprocess.Popen(command, env=env) for command in commands]
    codes = [process.wait() for process in processes]
    if any(codes):
        raise SystemExit(f"a benchmark command failed (exit codes {codes}): {commands}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-frames", type=int, default=60)
    parser.add_argument("--short-frames", type=int, default=12)
    parser.add_argument("--fps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each shard process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs, model = _prepare(folder, args.long_frames, args.short_frames, args.fps)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DEID_HOME": str(folder / "home"), "DEID_OFFLINE": "1",
               "OMP_NUM_THREADS": str(args.threads), "RAY_USAGE_STATS_ENABLED": "0"}
        shards, ray = [], []
        for repeat in range(args.repeats):
            out = folder / f"shards{repeat}"
            shards.append(_timed([_command(inputs, out, model, "--shard", f"{k}/2") for k in range(2)], env))
            out = folder / f"ray{repeat}"
            ray.append(_timed([_command(inputs, out, model, "--ray", "--workers", "2")], env))
            shutil.rmtree(folder / f"shards{repeat}")
            shutil.rmtree(out)
    print(json.dumps({
        "benchmark": "ray_batch",
        "clips": {"count": 6, "long_frames": args.long_frames, "short_frames": args.short_frames, "fps": args.fps,
                  "size": "352x288"},
        "shards_side_by_side_s": [round(s, 1) for s in shards],
        "ray_workers_2_s": [round(s, 1) for s in ray],
        "ray_over_shards": [round(r / s, 3) for r, s in zip(ray, shards)],
        "threads_per_process": args.threads,
        "cpus": os.cpu_count(),
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
