"""Outputs appear whole or not at all: write to a temporary file beside the target, rename at the end."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Iterator

from deid.errors import MediaError

try:  # POSIX: the lock that tells a live writer's temporary file from one a killed process left behind
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# What `atomic_output`'s temporary files look like: a process killed mid-write leaves them behind.
TEMPORARY_GLOB = ".*.partial*"
# `.NAME.XXXXXXXX.partial.EXT`: eight random hex characters between the target's stem and `.partial`.
_PARTIAL = re.compile(r"^\.(?P<stem>.+)\.[a-z0-9_]{8}\.partial(?P<suffix>\.[^.]*)?$")
# A partial younger than this is not removed even when unlocked: its writer may be between creating and locking it.
_STALE_AFTER_S = 2.0
# errno values that mean "this folder cannot be written" rather than a bug.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def is_partial(path: str | Path) -> bool:
    """Whether `path` is one of deid's temporary output files (never an input)."""
    return _PARTIAL.match(Path(path).name) is not None


def target_of(path: str | Path) -> Path:
    """The output that a temporary file of `atomic_output` becomes (`path` itself when it is not one): messages
    name the file the user asked for."""
    path = Path(path)
    match = _PARTIAL.match(path.name)
    return path.with_name(f"{match['stem']}{match['suffix'] or ''}") if match else path


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an output in a missing or unwritable directory, a directory, or an existing file without `--overwrite`."""
    if not path.parent.is_dir():
        raise MediaError(f"{path}: the directory {path.parent} does not exist. Create it first or choose another output path.")
    if path.is_dir():
        raise MediaError(f"{path} is a directory, not a file. Name a file inside it, or choose another output path.")
    check_not_device(path)
    check_writable_folder(path.parent)
    if path.exists() and not overwrite:
        raise MediaError(f"{path} already exists. Pass --overwrite to replace it, or choose another output path.")


def check_not_device(path: Path) -> None:
    """Refuse an output that is a device or a pipe (`-o /dev/null`): the rename at the end would replace the node."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise MediaError(f"{path}: is a device or a pipe, not a file: deid writes a whole file beside its output and "
                         "renames it. Name a file (e.g. out.mp4) or a folder.")


def check_writable_folder(folder: Path) -> None:
    """Refuse a folder (or, if it does not exist yet, its nearest existing parent) that cannot be written."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise MediaError(f"{folder}: cannot write in {existing} (read-only or no permission). Choose another output folder.")


def check_not_input(target: Path, source: Path) -> None:
    """Refuse an output that is the input itself, however either path is spelled (links, `..`, case)."""
    with contextlib.suppress(OSError):
        if target.exists() and os.path.samefile(source, target):
            raise MediaError(f"{target} is the input {source} itself: writing it would destroy the original. "
                             "Choose another output path.")


def unwritable(path: Path, exc: OSError) -> MediaError:
    """The one-line error for an OSError that says a folder cannot be written (read-only, permissions)."""
    return MediaError(f"{path}: cannot write in {path.parent} ({os.strerror(exc.errno)}). Choose another output folder.")


def remove_stale_partials(path: Path, min_age_s: float = _STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files of `path` that killed runs left behind (unlocked and not brand new); returns them.

    A running writer holds a lock on its temporary file, so a run that is writing the same target now is left alone.
    `min_age_s`: how old an unlocked one must be; a caller that knows its writer is dead (a Ray worker that died)
    passes 0."""
    if fcntl is None or not path.parent.is_dir():
        return []
    removed = []
    for candidate in path.parent.glob(f".*.partial{glob.escape(path.suffix)}"):
        match = _PARTIAL.match(candidate.name)
        if match is None or match["stem"] != path.stem:
            continue
        with contextlib.suppress(OSError):
            if time.time() - candidate.stat().st_mtime < min_age_s:
                continue
            fd = os.open(candidate, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
                candidate.unlink()
                removed.append(candidate)
            finally:
                os.close(fd)
    return removed


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to `path`. Without `overwrite`, never replace a file that appeared meanwhile
    (another run writing the same output): a hard link fails if the name is taken, where a rename would not."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise MediaError(f"{path} appeared while deid was writing it (another run?); it was kept and this run's output "
                         "discarded. Pass --overwrite to replace it, or choose another output path.") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # No hard links on this file system (some network and FAT mounts): claim the name exclusively, then replace.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise MediaError(f"{path} appeared while deid was writing it (another run?); it was kept and this run's "
                             "output discarded. Pass --overwrite to replace it.") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False, clean_stale: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); on success rename it to `path`, else delete it.

    Ctrl-C, SIGTERM, errors and full disks leave no partial file behind. Without `overwrite`, a file that appears
    at `path` meanwhile is never replaced. `clean_stale`: first remove what killed runs (SIGKILL) left for this
    target (a folder scan per call: for user-facing outputs, not for thousands of files in one folder).
    """
    path = Path(path)
    check_output_path(path, overwrite)
    if clean_stale:
        remove_stale_partials(path)
    fd, tmp_path = _new_temporary(path)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the end: marks the file as a live run's
        yield tmp_path
        os.chmod(tmp_path, mode)  # writers that replace the file (safetensors does) create it owner-only
        _publish(tmp_path, path, overwrite)
    finally:
        os.close(fd)
        tmp_path.unlink(missing_ok=True)


def _new_temporary(path: Path) -> tuple[int, Path]:
    """Create an empty, uniquely named file `.STEM.XXXXXXXX.partial.EXT` beside `path` with the usual mode, 0666
    minus the umask; returns its open descriptor (which holds the live-writer lock) and its path.

    Not `tempfile.mkstemp`: its mode 0600 survives the rename, and an output that only its owner can read is no
    use to a tool whose job is to share video."""
    for _ in range(100):
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp  # the kernel applies the umask
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno in _UNWRITABLE:
                raise unwritable(path, exc) from None
            raise
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
