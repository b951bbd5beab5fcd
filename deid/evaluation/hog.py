"""dlib's frontal HOG face detector, and the same detector turned upside down, so that one HOG feature pyramid
serves two quarter turns of an image.

The audit searches every frame at all four quarter turns. Computing HOG features costs about 60 % of a detector
run (on a 1136x880 copy: 70 ms for one detector, 98 ms for two on one pyramid), and the features of an image turned
by 180 degrees are those of the image, reordered: every cell moves to the opposite one, a gradient's direction
turns by half a circle (contrast-sensitive bin b -> b + 9 of 18; the 9 contrast-insensitive bins stay), and each
cell's four block normalisations swap with their opposites (texture features 0 <-> 3, 1 <-> 2). So the
upside-down detector's filters are the upright ones flipped in both axes with their feature planes reordered, and
running both on one view finds the faces upright in it and in its half turn.

Not bit for bit: the half turn moves each pixel of the feature pyramid's coarser levels by a fraction of a
pixel. On 88 faces in crowd frames of 704x576, the upside-down detector's scores differ from the upright one's on
the turned frame by 0.05 on average (at most 0.47), less than moving the frame by one pixel changes the upright
one's (0.11 on average, at most 0.33). On a frame of 950x778, not whole HOG cells, they differ by 0.27 on average,
so copies are padded to whole cells (`pad_to_cells`).

The weights are read from and written back in dlib's own serialisation (the detector file its Python API saves
and loads), from the detector compiled into dlib itself: nothing is downloaded.
"""

from __future__ import annotations

import functools
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from deid.evaluation.recognizers import dlib_module

CELL = 8  # pixels per HOG cell side (dlib's frontal face detector)
PLANES = 31  # fHOG features per cell: 18 contrast-sensitive orientations, 9 insensitive, 4 texture
# Feature plane p of the upside-down filter takes plane HALF_TURN_PLANES[p] of the upright one.
HALF_TURN_PLANES = np.array([*range(9, 18), *range(9), *range(18, 27), 30, 29, 28, 27])


@dataclass(frozen=True)
class Hit:
    """One detection in a view [H, W]: box [4] (x0, y0, x1, y1; x1, y1 exclusive, view pixels), dlib's score, and
    `half_turned`: the face is upright in the view turned by 180 degrees, not in the view itself."""

    box: np.ndarray
    score: float
    half_turned: bool


class HalfTurnHog:
    """dlib's frontal face detector, upright and upside down; `run` applies one or both to one feature pyramid.
    One per process (`hog_detector`): dlib's detectors are not safe to run from two threads at once, so `lock`
    guards them."""

    def __init__(self, dlib):
        self.upright = dlib.get_frontal_face_detector()
        self.upside_down = _half_turned(dlib, self.upright)
        self._run_multiple = dlib.fhog_object_detector.run_multiple
        self.lock = threading.Lock()

    def run(self, view: np.ndarray, threshold: float, half_turn_too: bool) -> list[Hit]:
        """Faces in view [H, W] uint8 (gray, C-contiguous) scoring at least `threshold`, upright in it and, with
        `half_turn_too`, upright in it turned by 180 degrees."""
        with self.lock:
            if half_turn_too:
                rects, scores, which = self._run_multiple([self.upright, self.upside_down], view, 0, threshold)
            else:
                rects, scores, _ = self.upright.run(view, 0, threshold)
                which = [0] * len(scores)
        return [Hit(np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float64), float(s), k == 1)
                for r, s, k in zip(rects, scores, which)]


@functools.lru_cache(maxsize=1)
def hog_detector() -> HalfTurnHog:
    """The process's detector pair (built once: about 0.5 s)."""
    return HalfTurnHog(dlib_module())


def pad_to_cells(image: np.ndarray) -> np.ndarray:
    """image [H, W, ...] padded at its right and bottom, by reflection, to whole HOG cells (multiples of 8): the
    cell grid of its half turn is then its own, turned. Coordinates from the top left are unchanged."""
    height, width = image.shape[:2]
    bottom, right = -height % CELL, -width % CELL
    if not (bottom or right):
        return image
    border = cv2.BORDER_REFLECT_101 if min(height, width) > max(bottom, right) else cv2.BORDER_REPLICATE
    return cv2.copyMakeBorder(image, 0, bottom, 0, right, border)


# ------------------------------------------------------------------------------------------ dlib's detector files


def _half_turned(dlib, upright):
    """The upside-down copy of an fHOG object detector (dlib.fhog_object_detector)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "detector.svm"
        upright.save(str(path))
        header, weights = read_detector(path.read_bytes())
        path.write_bytes(write_detector(header, [half_turn_weights(w) for w in weights]))
        return dlib.fhog_object_detector(str(path))


def half_turn_weights(weights: np.ndarray) -> np.ndarray:
    """One sub-detector's weights [31 * rows * cols + 1] (plane by plane, each row-major; the bias last) -> the
    weights that score a window's half turn as these score the window."""
    side = int(round(np.sqrt((len(weights) - 1) / PLANES)))
    filters = weights[:-1].reshape(PLANES, side, side)
    return np.concatenate([filters[HALF_TURN_PLANES, ::-1, ::-1].ravel(), weights[-1:]])


class _Reader:
    """dlib's serialisation of numbers: an integer is a byte (its length in bytes, and 0x80 when negative), then
    its magnitude, little-endian; a double is two integers, mantissa and exponent (value = m * 2**e)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def integer(self) -> int:
        control = self.data[self.pos]
        length = control & 0x0F
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + length], "little")
        self.pos += 1 + length
        return -value if control & 0x80 else value

    def double(self) -> float:
        mantissa = self.integer()
        return float(np.ldexp(float(mantissa), self.integer()))


def _integer(value: int) -> bytes:
    magnitude = abs(value).to_bytes((abs(value).bit_length() + 7) // 8, "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


def _double(value: float) -> bytes:
    """As dlib writes a double: a 53-bit mantissa less its trailing zero bytes, and the exponent that scales it."""
    fraction, exponent = np.frexp(value)
    mantissa, exponent = int(np.ldexp(fraction, 53)), int(exponent) - 53
    while mantissa and not mantissa & 0xFF:
        mantissa, exponent = mantissa >> 8, exponent + 8
    return _integer(mantissa) + _integer(exponent if mantissa else 0)


def read_detector(data: bytes) -> tuple[bytes, list[np.ndarray]]:
    """A serialised dlib object_detector<scan_fhog_pyramid> (format version 2) -> (everything before its weight
    vectors, each sub-detector's weights [N] float64)."""
    reader = _Reader(data)
    if reader.integer() != 2:
        raise ValueError("not a version-2 dlib object detector")
    if reader.integer() != 1:
        raise ValueError("not a version-1 scan_fhog_pyramid scanner")
    for _ in range(9):  # feature-pyramid cache (2 counts), cell size, padding, window w/h, levels, min layer w/h
        reader.integer()
    reader.double()  # nuclear-norm regularisation strength
    dims = reader.integer()
    reader.double(), reader.double()  # the box-overlap test's two thresholds
    header = data[:reader.pos]
    weights = []
    for _ in range(reader.integer()):
        rows, cols = abs(reader.integer()), abs(reader.integer())  # dlib writes a matrix's sizes negated
        weights.append(np.array([reader.double() for _ in range(rows * cols)]))
        if len(weights[-1]) != dims + 1:
            raise ValueError(f"a weight vector of {len(weights[-1])} values, not {dims} + 1")
    if reader.pos != len(data):
        raise ValueError(f"{len(data) - reader.pos} bytes left over after the weight vectors")
    return header, weights


def write_detector(header: bytes, weights: list[np.ndarray]) -> bytes:
    """The inverse of `read_detector`: dlib reads the result as a detector with these weight vectors."""
    out = bytearray(header) + _integer(len(weights))
    for vector in weights:
        out += _integer(-len(vector)) + _integer(-1)
        for value in vector:
            out += _double(float(value))
    return bytes(out)
