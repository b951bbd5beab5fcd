"""Outputs appear whole or not at all: write to a temporary file beside the target, rename at the end."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from deid.errors import MediaError

# What `atomic_output`'s temporary files look like: a process killed mid-write leaves them behind.
TEMPORARY_GLOB = ".*.partial*"


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an output in a missing directory, or an existing one without `--overwrite`."""
    if not path.parent.is_dir():
        raise MediaError(f"{path}: the directory {path.parent} does not exist. Create it first or choose another output path.")
    if path.exists() and not overwrite:
        raise MediaError(f"{path} already exists. Pass --overwrite to replace it, or choose another output path.")


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); on success rename it to `path`, else delete it.

    Ctrl-C, errors and full disks leave no partial file behind.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    tmp_path = _new_temporary(path)
    mode = stat.S_IMODE(tmp_path.stat().st_mode)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # writers that replace the file (safetensors does) create it owner-only
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _new_temporary(path: Path) -> Path:
    """Create an empty, uniquely named file beside `path` with the usual mode, 0666 minus the umask.

    Not `tempfile.mkstemp`: its mode 0600 survives the rename, and an output that only its owner can read is no
    use to a tool whose job is to share video."""
    for _ in range(100):
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file beside {path.name}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` in one step (used for manifests, indexes and reports)."""
    path = Path(path)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (dataset images and arrays)."""
    path = Path(path)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_bytes(data)
