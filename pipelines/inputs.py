"""What a media command works on: inputs expanded into (source, target) tasks, output folders, preview paths."""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from deid.atomic import check_not_device, is_partial
from deid.errors import DeidError, MediaError
from deid.media.images import IMAGE_EXTENSIONS
from deid.media.video import VIDEO_EXTENSIONS

MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Task:
    source: Path
    target: Path

    @property
    def is_image(self) -> bool:
        return self.source.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(inputs: Iterable[str | Path], output: Path) -> list[Task]:
    """Files, directories (searched recursively for videos and images) and globs -> (source, target) tasks.

    One file with an output that has a suffix: the output is that file. Otherwise the output is a directory
    that mirrors each input's tree (a directory input's relative paths; a file's own name).
    """
    items: list[tuple[Path, Path]] = []  # (file, path relative to the output directory)
    for raw in inputs:
        raw = str(raw)
        # deid's own temporary outputs (what a killed run left: `.NAME.xxxxxxxx.partial.mp4`) are never inputs.
        matches = sorted(m for m in glob.glob(raw, recursive=True) if not is_partial(m)) if glob.has_magic(raw) else [raw]
        if not matches:
            raise MediaError(f"{raw}: no file matches. Check the pattern.")
        for match in map(Path, matches):
            if match.is_file() and is_partial(match):
                raise MediaError(f"{match}: the unfinished output of a deid run that was killed, not an input. Delete it.")
            if match.is_dir():
                found = sorted(p for p in match.rglob("*")
                               if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS and not is_partial(p))
                if not found:
                    raise MediaError(f"{match}: holds no videos or images. Check the directory.")
                items += [(p, match.name / p.relative_to(match)) for p in found]
            elif match.is_file():
                items.append((match, Path(match.name)))
            else:
                raise MediaError(f"{match}: no such file or directory. Check the path.")
    check_not_device(output)
    if len(items) == 1 and output.suffix and not output.is_dir():
        source = items[0][0]
        wanted = IMAGE_EXTENSIONS if source.suffix.lower() in IMAGE_EXTENSIONS else VIDEO_EXTENSIONS
        if output.suffix.lower() not in wanted:
            kind = "an image" if wanted is IMAGE_EXTENSIONS else "a video"
            raise MediaError(f"{output}: {source} is {kind}, so the output must be one too ({', '.join(wanted[:4])}, ...).")
        return [Task(source, output)]
    if output.exists() and not output.is_dir():
        if len(items) == 1:
            raise MediaError(f"{output}: an output file needs a suffix that names its type ({items[0][0].suffix or '.mp4'}). "
                             "Rename it, or pass a directory with -o.")
        raise MediaError(f"{output}: several inputs need an output directory, not a file. Pass a directory with -o.")
    tasks = [Task(source, output / relative) for source, relative in items]
    targets = [t.target for t in tasks]
    if len(set(targets)) != len(targets):
        raise DeidError("two inputs map to the same output name. Rename one or run them separately.")
    return tasks


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those it created, deepest first (for `remove_empty`).
    A place that cannot be written raises MediaError."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise MediaError(f"{folder}: cannot create it ({os.strerror(exc.errno)}). Choose another output folder.") from None
        raise
    return missing


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove the folders (deepest first) that hold nothing: a failed file leaves no empty mirror folders."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another file landed there) or already gone: leave it and its parents
            return


def preview_path(target: Path, suffix: str = ".mp4") -> Path:
    """Where `--preview` writes the side-by-side view of `target`: NAME.preview.mp4 beside it."""
    return target.with_name(f"{target.stem}.preview{suffix}")


def preview_of(task: Task) -> Path:
    """Where `--preview` writes a task's side-by-side view: beside its output, a photo's in the photo's format, a
    video's as MP4."""
    return preview_path(task.target, task.target.suffix if task.is_image else ".mp4")


def check_previews(previews: Iterable[tuple[Path, Path]], inputs: Iterable[Path], overwrite: bool) -> None:
    """Refuse, before any work, a preview that would replace an input, sit where an output (or another preview)
    goes, or replace a file without `overwrite`. previews: (output, its preview) pairs, every task's.

    A preview shows the original faces: one taken for an output (`a.preview.mp4` beside an input of that name)
    would be a privacy failure, and one that replaces an input destroys it."""
    previews = list(previews)
    sources = {_file_identity(p): p for p in inputs}
    outputs = {_file_identity(output): output for output, _ in previews}
    seen: dict[object, Path] = {}
    for output, preview in previews:
        key = _file_identity(preview)
        if key in sources:
            raise MediaError(f"{preview}: the preview of {output} would replace the input {sources[key]}. "
                             "Choose another output name, or leave out --preview.")
        if key in outputs or key in seen:
            other = outputs.get(key) or seen[key]
            raise MediaError(f"{preview}: the preview of {output} would take the place of {other}'s output. "
                             "Rename one of the inputs, or leave out --preview.")
        seen[key] = output
        if preview.exists() and not overwrite and not output.exists():  # an existing output is skipped, preview too
            raise MediaError(f"{preview} already exists. Pass --overwrite to replace it, or choose another output path.")


def _file_identity(path: Path) -> object:
    """What names one file however the path is spelled (links, `..`, case): its device and inode when it exists,
    else its real path."""
    try:
        status = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return status.st_dev, status.st_ino
