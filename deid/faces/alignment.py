"""Loose FFHQ-style head crops from 5-point landmarks: the frame -> crop affine, the warp, and photo alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from deid.console import warn
from deid.errors import NoFaceError
from deid.faces.detection import FaceDetector
from deid.media.images import load_image, to_tensor


@dataclass(frozen=True)
class AlignConfig:
    size: int = 256  # output side in pixels (the generator's resolution)
    scale: float = 1.0  # head crop side relative to the FFHQ crop (1.0: FFHQ's loose head crop)


def ffhq_affine(landmarks: np.ndarray, size: int, scale: float = 1.0) -> np.ndarray:
    """The FFHQ crop of a face as an affine map frame -> crop.

    landmarks: [5, 2] pixels (eyes, nose, mouth corners). Returns [2, 3] float64 A with crop = A @ [x, y, 1],
    the crop being `size` pixels square. As in the FFHQ recipe: the crop is centred a tenth of the way from the
    eye midpoint to the mouth midpoint; its half-side is the larger of 2x the eye distance and 1.8x the
    eye-to-mouth distance; it is rotated so that the eye line is horizontal (blended with the eye-mouth axis).
    """
    lm = np.asarray(landmarks, np.float64)
    eye_mid = (lm[0] + lm[1]) / 2
    eye_to_eye = lm[1] - lm[0]
    eye_to_mouth = (lm[3] + lm[4]) / 2 - eye_mid
    # The crop's x axis: the eye direction averaged with the eye-mouth axis turned by 90 degrees.
    x_axis = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    x_axis /= max(np.hypot(*x_axis), 1e-8)
    half = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) * scale
    x_vec = x_axis * half
    y_vec = np.array([-x_vec[1], x_vec[0]])
    centre = eye_mid + eye_to_mouth * 0.1
    origin = centre - x_vec - y_vec  # top-left corner of the crop in the frame
    # frame <- crop: p = origin + u * (2 x_vec / size) + v * (2 y_vec / size); invert it.
    crop_to_frame = np.array([[2 * x_vec[0] / size, 2 * y_vec[0] / size, origin[0]],
                              [2 * x_vec[1] / size, 2 * y_vec[1] / size, origin[1]]])
    return cv2.invertAffineTransform(crop_to_frame)


def crop_box(affine: np.ndarray, size: int) -> np.ndarray:
    """The crop as a rotated box in the frame: centre x, centre y, side, angle (radians). affine: [2, 3] frame -> crop."""
    inverse = cv2.invertAffineTransform(np.asarray(affine, np.float64))
    centre = inverse @ np.array([size / 2, size / 2, 1.0])
    side = np.hypot(inverse[0, 0], inverse[1, 0]) * size
    return np.array([centre[0], centre[1], side, np.arctan2(inverse[1, 0], inverse[0, 0])])


def warp_crop(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """Cut the crop out of image [H, W, 3] uint8 with affine [2, 3] frame -> crop. Returns [size, size, 3] uint8.

    Outside the frame the image is mirrored, as FFHQ pads, so crops near the border still look like a head.
    """
    return cv2.warpAffine(image, np.asarray(affine, np.float64), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


@dataclass(frozen=True)
class AlignedPhoto:
    """The largest face of a photo, aligned: the photo, its head crop and the map between them."""

    image: np.ndarray  # [H, W, 3] uint8 RGB, the photo
    crop: np.ndarray  # [S, S, 3] uint8 RGB, the loose FFHQ-style head crop
    affine: np.ndarray  # [2, 3] float64, photo -> crop
    box: np.ndarray | None = None  # [4] float32 (x0, y0, x1, y1): the chosen face's box in the photo
    faces: int = 1  # how many faces the photo holds

    @property
    def tensor(self) -> torch.Tensor:
        """The crop as float [3, S, S] in [-1, 1]."""
        return to_tensor(self.crop)


def align_photo(image: np.ndarray, size: int, *, detector: FaceDetector | None = None, scale: float = 1.0) -> AlignedPhoto:
    """Detect the largest face of a photo ([H, W, 3] uint8 RGB) and cut its loose FFHQ-style head crop of side
    `size`. Raises NoFaceError when no face is found."""
    image = np.ascontiguousarray(image)
    detections = (detector or FaceDetector())([image])[0]
    if not len(detections):
        raise NoFaceError("no face found in the photo. Use a photo where one face is clearly visible.")
    largest = detections.largest()
    affine = ffhq_affine(detections.landmarks[largest], size, scale)
    return AlignedPhoto(image, warp_crop(image, affine, size), affine, detections.boxes[largest], len(detections))


def align_photo_file(path: str | Path, size: int, **kwargs) -> AlignedPhoto:
    """align_photo on an image file; the NoFaceError names the file. A photo with several faces says which one was
    taken (the largest), so a group photo never silently lends the wrong person's identity."""
    try:
        photo = align_photo(load_image(path), size, **kwargs)
    except NoFaceError:
        raise NoFaceError(f"{path}: no face found. Use a photo where one face is clearly visible.") from None
    if photo.faces > 1:
        x0, y0, x1, y1 = (int(round(v)) for v in photo.box[:4])
        warn(f"{path}: {photo.faces} faces; the largest ({x1 - x0}x{y1 - y0} pixels at x={x0}, y={y0}) is the one "
             "taken. Crop the photo to one face to take another.")
    return photo
