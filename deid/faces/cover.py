"""The region that hides a tracked head: a rectangle that turns with the face's roll, and a mask of it.

The privacy audit's fail-safe covers an axis-aligned square twice the face box's side around the face; centred,
it covers the head only as far as the disc that fits inside it at every roll (radius: the box's side). The head
region here holds that disc and more: it is laid out in the head's own frame (its x axis along the eye line, as
`face_roll` measures it), wider than the face and taller towards the crown, so hair and ears are covered however
the head is rolled, without the square's empty corners around a head lying on its side.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from deid.faces.orientation import face_roll


@dataclass(frozen=True)
class HeadRegionConfig:
    # sizes are multiples of the face box's longer side (roll-invariant: a rolled face's box keeps its area)
    width: float = 2.0  # across the face: holds the ears and the fail-safe's disc (radius 1)
    height: float = 2.5  # chin to crown
    crown_shift: float = 0.15  # the centre moves this far from the face's centre towards the crown (hair)


def head_corners(box: np.ndarray, landmarks: np.ndarray, config: HeadRegionConfig = HeadRegionConfig()) -> np.ndarray:
    """The head region of one face as its 4 corners [4, 2] float64 (frame pixels, x y; clockwise on screen).

    box: [4] (x0, y0, x1, y1) the face box; landmarks: [5, 2] (eyes, nose, mouth corners), which give the roll."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    roll = np.radians(float(face_roll(landmarks)))
    across = np.array([np.cos(roll), np.sin(roll)])  # along the eye line, left to right of the image of the face
    up = np.array([across[1], -across[0]])  # towards the crown (y grows downwards)
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + up * config.crown_shift * side
    half_w, half_h = across * config.width * side / 2, up * config.height * side / 2
    return np.stack([centre - half_w + half_h, centre + half_w + half_h, centre + half_w - half_h, centre - half_w - half_h])


def region_mask(corners: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The pixels of a convex region inside an image of `shape` ([H, W, ...]): (bounds [x0, y0, x1, y1] int, mask
    [y1 - y0, x1 - x0] bool of the pixels within those bounds whose centre lies in the region), or None when the
    region misses the image. Hard-edged: every pixel is either covered or not."""
    height, width = shape[:2]
    lo = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(corners.max(0)).astype(int) + 1, (width, height))
    if np.any(hi <= lo):
        return None
    mask = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
    _fill(mask, corners - lo, 1)
    if not mask.any():
        return None
    return np.array([lo[0], lo[1], hi[0], hi[1]]), mask.astype(bool)


def fill_region(image: np.ndarray, corners: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Set the pixels of the region with `corners` [4, 2] (those `region_mask` gives) in image [H, W, 3] uint8
    (C-contiguous) to `colour`, in place: one rasterisation, no mask (a 720p head is 8 ms as a masked assignment)."""
    if not image.flags.c_contiguous:  # OpenCV would fill a copy
        raise ValueError("fill_region needs a C-contiguous image")
    _fill(image, np.asarray(corners, np.float64), colour)


def _fill(image: np.ndarray, corners: np.ndarray, value) -> None:
    points = np.round(corners * 16).astype(np.int32)  # 4 fractional bits: sub-pixel corners
    cv2.fillConvexPoly(image, points, value, lineType=cv2.LINE_8, shift=4)
