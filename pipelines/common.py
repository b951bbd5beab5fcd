"""Job plumbing shared by the media commands: input expansion, output mirroring, sharding, background stages."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from rich.progress import ProgressColumn
from rich.text import Text

from deid.atomic import atomic_output, is_partial
from deid.errors import DeidError, MediaError
from deid.faces.detection import Detections
from deid.media.images import IMAGE_EXTENSIONS, to_tensor, to_uint8
from deid.media.video import (
    VIDEO_EXTENSIONS,
    EncodeOptions,
    Frame,
    VideoInfo,
    VideoWriter,
    points_to_stored,
    read_frames,
    to_display,
)
from deid.runtime import FACE_BUCKETS, autocast, bucket_chunks, bucket_size, pad_batch

T = TypeVar("T")
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
    if len(items) == 1 and output.suffix and not output.is_dir():
        source = items[0][0]
        wanted = IMAGE_EXTENSIONS if source.suffix.lower() in IMAGE_EXTENSIONS else VIDEO_EXTENSIONS
        if output.suffix.lower() not in wanted:
            kind = "an image" if wanted is IMAGE_EXTENSIONS else "a video"
            raise MediaError(f"{output}: {source} is {kind}, so the output must be one too ({', '.join(wanted[:4])}, ...).")
        return [Task(source, output)]
    if output.exists() and not output.is_dir():
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


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`K/N` (0-based K) -> (K, N); without a spec, torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if spec:
        try:
            k, n = (int(part) for part in spec.split("/"))
        except ValueError:
            raise DeidError(f"--shard {spec!r} is not K/N. Use e.g. --shard 0/4 for the first of four shards.") from None
        if not (n >= 1 and 0 <= k < n):
            raise DeidError(f"--shard {spec}: K must be in 0..N-1. Use e.g. --shard 0/4.")
        return k, n
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(tasks: list[Task], index: int, count: int) -> list[Task]:
    """This rank's share: every count-th task of the list sorted by source, so all ranks agree without talking."""
    ordered = sorted(tasks, key=lambda t: str(t.source))
    return ordered[index::count]


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterator[T], maxsize: int) -> Iterator[T]:
    """Run an iterator in a background thread, `maxsize` items ahead (bounded memory); errors re-raise here."""
    slots: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            slots.put(_Failure(exc))

    thread = threading.Thread(target=produce, daemon=True, name="deid-prefetch")
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class BackgroundSink:
    """Consume items in a background thread (e.g. the encoder) through a bounded queue; errors re-raise on put/close.

    As a context manager it closes (waiting for the consumer) on success and abandons on an error."""

    def __init__(self, consume: Callable[[T], None], maxsize: int):
        self.consume = consume
        self.slots: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="deid-sink")
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.slots.get()
            if item is _DONE:
                return
            if self.error is None:
                try:
                    self.consume(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the producer
                    self.error = exc

    def put(self, item: T) -> None:
        if self.error is not None:
            raise self.error
        self.slots.put(item)

    def close(self) -> None:
        self.slots.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop without raising (the caller is already handling an error)."""
        self.error = self.error or RuntimeError("abandoned")
        self.slots.put(_DONE)
        # Queued items are skipped once `error` is set, so this waits for at most the item being consumed, and
        # the writers it uses are not closed under it.
        self.thread.join()

    def __enter__(self) -> "BackgroundSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def preview_path(target: Path, suffix: str = ".mp4") -> Path:
    """Where `--preview` writes the side-by-side view of `target`: NAME.preview.mp4 beside it."""
    return target.with_name(f"{target.stem}.preview{suffix}")


@contextlib.contextmanager
def video_job(source: VideoInfo, target: Path, encode: EncodeOptions, *, overwrite: bool, queue_size: int,
              render: Callable[[T], tuple[Frame, np.ndarray, np.ndarray | None]], size: tuple[int, int] | None = None,
              rotation: int | None = None, preview_size: tuple[int, int] | None = None, notes: list[str] | None = None
              ) -> Iterator[tuple[Iterator[Frame], BackgroundSink]]:
    """The skeleton of a video-to-video job: decoded frames in, encoded frames out, both in background threads.

    Yields (frames, sink): `frames` streams the source's frames (decoded `queue_size` ahead); each item put into
    `sink` is turned by `render` (on the encoder thread) into (source frame whose timing it takes, output image,
    preview image or None). The output goes to `target` through `atomic_output`, with `size`/`rotation` passed to
    its VideoWriter; with `preview_size` a side-by-side preview goes to `preview_path(target)` as well (in that
    container's default codec). What the output cannot keep of the source is added to `notes`. On an error nothing
    is left behind; what a killed run left for `target` is removed first."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(target, overwrite=overwrite, clean_stale=True))
        writer = stack.enter_context(VideoWriter(tmp, source, encode, size=size, rotation=rotation))
        if notes is not None:
            notes.extend(writer.notes)
        preview = None
        if preview_size is not None:
            preview_tmp = stack.enter_context(atomic_output(preview_path(target), overwrite=True, clean_stale=True))
            preview = stack.enter_context(VideoWriter(preview_tmp, source, dataclasses.replace(encode, codec=None),
                                                      size=preview_size, rotation=0))

        def encode_item(item: T) -> None:
            frame, image, side = render(item)
            writer.write(image, frame.pts, frame.duration)
            if preview is not None:
                preview.write(side, frame.pts, frame.duration)

        sink = stack.enter_context(BackgroundSink(encode_item, maxsize=queue_size))
        frames = stack.enter_context(contextlib.closing(prefetch(read_frames(source.path), maxsize=queue_size)))
        yield frames, sink


# ------------------------------------------------------------------------------------------- synthesis


class HeadSynthesizer:
    """The model's side of the media commands: identity codes, and heads from (identity, aligned crop) pairs.

    model: a Disentangler-like object (encode_identity, encode_attributes, map, generate, resolution; and
    `.generator` with `.mapping`/`z_dim` for random identities). Crops and heads are [N, R, R, 3] uint8 RGB.
    """

    def __init__(self, model, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.resolution = int(model.resolution)

    def _autocast(self):
        return autocast(self.device, self.dtype)

    @torch.inference_mode()
    def identity_of(self, crop: torch.Tensor) -> torch.Tensor:
        """crop: [3, R, R] in [-1, 1] (an aligned head) -> identity code [512] (float32, on the device)."""
        with self._autocast():
            return self.model.encode_identity(crop[None].to(self.device)).float()[0]

    @torch.inference_mode()
    def random_identity(self, seed: int, person: int, file_key: str | None = None) -> torch.Tensor:
        """The identity of a random person the generator imagines, fixed by (seed, file_key, person) -> [512].

        `file_key` (a file's name in the job) makes person k of one file another person than person k of the next
        file; without it person k looks the same in every file. Sampling the generator (z -> w -> image -> E_id)
        keeps the code on the manifold of real identities, unlike a random unit vector in E_id's space.
        """
        if file_key is None:
            stream = seed * 1_000_003 + person
        else:
            digest = hashlib.sha256(f"{seed}/{person}/{file_key}".encode()).digest()
            stream = int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit seed
        rng = torch.Generator().manual_seed(stream)
        generator = self.model.generator
        z = torch.randn(1, generator.z_dim, generator=rng).to(self.device)
        w = generator.mapping(z, truncation_psi=0.7)  # float32: a cheap MLP, and its truncation lerp wants one dtype
        with self._autocast():
            image = self.model.generate(w)
            return self.model.encode_identity(image.float().clamp(-1, 1)).float()[0]

    @torch.inference_mode()
    def __call__(self, crops: np.ndarray, identities: torch.Tensor) -> np.ndarray:
        """crops: [N, R, R, 3] uint8 aligned heads; identities: [N, 512]. Returns heads [N, R, R, 3] uint8."""
        if not len(crops):
            return np.zeros_like(crops)
        heads = []
        # batches padded to FACE_BUCKETS sizes: the number of faces per batch changes with every frame, the
        # shapes the networks see do not (see deid.runtime)
        for part in bucket_chunks(len(crops), FACE_BUCKETS):
            size = bucket_size(part.stop - part.start, FACE_BUCKETS)
            images = pad_batch(to_tensor(crops[part], self.device), size)
            with self._autocast():
                w = self.model.map(pad_batch(identities[part].to(self.device), size), self.model.encode_attributes(images))
                heads.append(to_uint8(self.model.generate(w)[: part.stop - part.start]))
        return np.concatenate(heads)


def batched(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """Group an iterator into lists of `size` (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------- detection


def stored_detections(detections: Detections, rotation: int, stored_size: tuple[int, int]) -> Detections:
    """Detections on the upright view, mapped back to the stored frame."""
    if not rotation or not len(detections):
        return detections
    b = detections.boxes
    corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], axis=1)
    corners = points_to_stored(corners, rotation, stored_size)
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1)
    landmarks = points_to_stored(detections.landmarks, rotation, stored_size)
    return Detections(boxes.astype(np.float32), detections.scores, landmarks)


def detect_frames(frames, detector: Callable[[list[np.ndarray]], list[Detections]], rotation: int, stored_size: tuple[int, int], batch: int):
    """(frame, detections in stored pixels) per frame; `detector` (e.g. a FaceDetector, or a RollRobustStream for
    rolled faces) runs batched on the upright views, in frame order."""
    for chunk in batched(frames, batch):
        views = [to_display(frame.image, rotation) for frame in chunk] if rotation else [frame.image for frame in chunk]
        for frame, detections in zip(chunk, detector(views)):
            yield frame, stored_detections(detections, rotation, stored_size)


class FramesPerSecond(ProgressColumn):
    """Progress column: frames per second of the current file."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:5.1f} fps" if speed else "  ... fps", style="cyan")
