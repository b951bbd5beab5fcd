"""The skeleton of every video-to-video job: decode ahead, encode behind, atomic output and preview."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from deid.atomic import atomic_output
from deid.media.video import EncodeOptions, Frame, VideoInfo, VideoWriter, read_frames
from deid.pipelines.inputs import preview_path
from deid.pipelines.stages import BackgroundSink, prefetch

T = TypeVar("T")


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
            preview_tmp = stack.enter_context(atomic_output(preview_path(target), overwrite=overwrite, clean_stale=True))
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
