"""The layout of a training run folder: RUN/checkpoints/step-NNNNNNNN.safetensors (and best-identity /
best-landmarks.safetensors, written by validation), and finding its checkpoints; and the JSON Lines records
that resumable runs append (training losses, evaluation records).
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


BEST_CHECKPOINTS = ("best-identity", "best-landmarks")  # written by validation during training


def best_checkpoint_path(run_dir: str | Path, kind: str) -> Path:
    """RUN/checkpoints/best-identity.safetensors or best-landmarks.safetensors."""
    if kind not in BEST_CHECKPOINTS:
        raise ValueError(f"{kind!r}: expected one of {BEST_CHECKPOINTS}")
    return Path(run_dir) / CHECKPOINT_DIR / f"{kind}.safetensors"


def named_checkpoint(spec: str) -> Path | None:
    """`RUN:NAME` -> that checkpoint of the run directory RUN, NAME being best-identity, best-landmarks,
    latest or step-N; None when `spec` is not of that form (so paths with a colon still work)."""
    run, sep, name = spec.rpartition(":")
    if not sep or not run or not Path(run).expanduser().is_dir():
        return None
    run_dir = Path(run).expanduser()
    if name == "latest":
        return latest_checkpoint(run_dir)
    if name in BEST_CHECKPOINTS:
        path = best_checkpoint_path(run_dir, name)
        if not path.is_file():
            raise WeightsError(f"{run_dir}: no {name} checkpoint yet (validation writes it when a test sets a new "
                               f"best; see `deid train --validate-every`). Use {run}:latest or another run.")
        return path
    match = re.fullmatch(r"step-(\d+)", name)
    if match:
        path = checkpoint_path(run_dir, int(match.group(1)))
        if not path.is_file():
            raise WeightsError(f"{run_dir}: no checkpoint of step {int(match.group(1))} (kept: "
                               f"{', '.join(str(s) for s, _ in list_checkpoints(run_dir)) or 'none'}).")
        return path
    raise WeightsError(f"{spec}: unknown checkpoint name {name!r}. Use RUN:latest, RUN:step-N, "
                       f"RUN:{BEST_CHECKPOINTS[0]} or RUN:{BEST_CHECKPOINTS[1]}.")

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
