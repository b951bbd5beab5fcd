"""The layout of a training run folder: RUN/checkpoints/step-NNNNNNNN.safetensors, and finding its checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

from deid.errors import WeightsError

CHECKPOINT_DIR = "checkpoints"


CHECKPOINT_RE = re.compile(r"^step-(\d+)\.safetensors$")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of a training run directory, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return sorted((int(m.group(1)), p) for p in folder.glob("step-*.safetensors") if (m := CHECKPOINT_RE.match(p.name)))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The highest-step checkpoint of a training run directory."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise WeightsError(f"{run_dir}: no checkpoint in {run_dir / CHECKPOINT_DIR}. "
                           f"Train one with `deid train --data DIR --out {run_dir}`.")
    return found[-1][1]


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.safetensors"
