"""Start training in this process, or (`gpus` > 1) under torchrun with one process per GPU.

Under torchrun each process runs the installed `deid` command (`deid train-worker CONFIG.json`, hidden from
the help), never `python -m ...`: a module run that way is looked up from the current folder first, where a
user's own `train.py` or `deid/` would be imported instead of ours. `train()` finds its rank in the
environment. `torchrun --nproc-per-node N --no-python deid train ...` works as well.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from deid.atomic import write_text_atomic
from deid.errors import DeidError
from deid.train.config import TrainConfig
from deid.train.trainer import train

LAUNCH_FILE = "launch.json"


def deid_executable() -> Path:
    """The installed `deid` console script of this Python environment."""
    beside = Path(sys.executable).with_name("deid")
    found = beside if beside.is_file() else shutil.which("deid")
    if not found:
        raise DeidError("the `deid` command is not installed in this environment, so torchrun cannot start it. "
                        "Install deid with pip (pip install -e .) and run `deid train` again.")
    return Path(found)


def torchrun_command(config_file: Path, processes: int) -> list[str]:
    """The torchrun command line that starts `processes` training workers on `config_file`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "--no-python", str(deid_executable()), "train-worker", str(config_file)]


def launch(config: TrainConfig) -> Path | None:
    """Train with `config`: here when gpus == 1, else in `gpus` torchrun processes (this one waits).
    Returns the last checkpoint (None when it was written by child processes)."""

    if config.gpus <= 1:
        return train(config)
    if config.device != "cpu" and torch.cuda.device_count() < config.gpus:
        raise DeidError(f"--gpus {config.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s). "
                        "Lower --gpus (or use --device cpu to test the multi-process path on the CPU).")
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / LAUNCH_FILE
    write_text_atomic(path, dataclasses.replace(config, gpus=1).to_json())
    status = subprocess.call(torchrun_command(path, config.gpus))
    if status != 0:
        raise DeidError(f"training processes exited with status {status} (messages above). "
                        f"Continue with `deid train --data {config.data} --out {config.out} --resume --gpus {config.gpus}`.")
    return None


def run_worker(config_file: Path) -> Path:
    """One torchrun process: train with the config that `launch` wrote."""
    return train(TrainConfig.from_json(Path(config_file).read_text()))
