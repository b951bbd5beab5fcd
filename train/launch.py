"""Start training in this process, or (`gpus` > 1) under torchrun with one process per GPU.

Under torchrun each process runs `python -m train.launch CONFIG.json`; `train()` finds its rank in the
environment. `torchrun --nproc-per-node N -m cli train ...` works as well.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import torch

from deid.atomic import write_text_atomic
from deid.errors import DeidError
from train.config import TrainConfig

LAUNCH_FILE = "launch.json"


def launch(config: TrainConfig) -> Path | None:
    """Train with `config`: here when gpus == 1, else in `gpus` torchrun processes (this one waits).
    Returns the last checkpoint (None when it was written by child processes)."""
    from train.trainer import train

    if config.gpus <= 1:
        return train(config)
    if config.device != "cpu" and torch.cuda.device_count() < config.gpus:
        raise DeidError(f"--gpus {config.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s). "
                        "Lower --gpus (or use --device cpu to test the multi-process path on the CPU).")
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / LAUNCH_FILE
    write_text_atomic(path, dataclasses.replace(config, gpus=1).to_json())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.gpus}",
               "-m", "train.launch", str(path)]
    status = subprocess.call(command)
    if status != 0:
        raise DeidError(f"training processes exited with status {status} (messages above). "
                        f"Continue with `deid train --data {config.data} --out {config.out} --resume --gpus {config.gpus}`.")
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of each torchrun process: `python -m train.launch CONFIG.json`."""
    from deid.console import console
    from train.trainer import train

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m train.launch CONFIG.json")
    try:
        train(TrainConfig.from_json(Path(args[0]).read_text()))
    except DeidError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
