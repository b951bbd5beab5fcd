"""The layout of a training run folder: RUN/checkpoints/step-NNNNNNNN.safetensors, and finding its checkpoints;
and the JSON Lines records that resumable runs append (training losses, evaluation records).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from deid.errors import DeidError, WeightsError

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


# ------------------------------------------------------------------------------------ JSON Lines


def complete_lines(path: str | Path) -> list[str]:
    """The lines of a JSON Lines file that hold whole records, without their newlines ([] when there is no file).

    Records are appended one line at a time, so a kill (OOM, SIGKILL) can leave the last line incomplete: a last
    line without its newline, or one that is not valid JSON, is dropped. A bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [line for line in text.split("\n")[:-1] if line.strip()]  # after the last newline: "" or a cut line
    if lines and not _is_json(lines[-1]):
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not _is_json(line):
            raise DeidError(f"{path}: record {number} is not valid JSON. Repair or delete the file.")
    return lines


def read_records(path: str | Path) -> list[dict]:
    """The whole records of a JSON Lines file (see `complete_lines`)."""
    return [json.loads(line) for line in complete_lines(path)]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
