"""Faces in images: load a photo, detect faces with 5-point landmarks (MTCNN), align loose FFHQ-style head crops.

Coordinates are pixels in the (upright) image, x to the right and y down. The five landmarks are, in order:
left eye, right eye (as seen in the image), nose tip, left and right mouth corner.
Tracking and smoothing across video frames live in deid/tracking.py; pasting heads back in deid/paste.py.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from deid.errors import MediaError, NoFaceError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path: str | Path) -> np.ndarray:
    """Read a photo as [H, W, 3] uint8 RGB, upright per its EXIF orientation. Raises MediaError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file. Check the path.")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.array(image.convert("RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable image ({exc.__class__.__name__}). Use a PNG or JPEG photo.") from None


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write [H, W, 3] uint8 RGB to `path` (format from its suffix)."""
    from PIL import Image

    Image.fromarray(image).save(path)


# ------------------------------------------------------------------------------------------- detection


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes a [K, 4] and b [M, 4] (x0, y0, x1, y1). Returns [K, M]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


@dataclass(frozen=True)
class Detections:
    """Faces found in one image: boxes [K, 4] (x0, y0, x1, y1), scores [K], landmarks [K, 5, 2]; float32 pixels."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.scores)

    def largest(self) -> int:
        """Index of the face with the largest box."""
        sides = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(np.argmax(sides))


@dataclass(frozen=True)
class DetectConfig:
    min_face_size: int = 20  # smallest face side (pixels of the detection image) MTCNN looks for
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # MTCNN's three stage thresholds
    min_score: float = 0.9  # final face probability a detection must reach
    max_side: int = 640  # frames larger than this are detected on a downscaled copy (faces stay findable)


@functools.lru_cache(maxsize=4)
def _mtcnn(device: str, min_face_size: int, thresholds: tuple[float, float, float]):
    from facenet_pytorch import MTCNN

    # keep_all: every face, not just the best one; the weights ship inside the facenet-pytorch wheel.
    return MTCNN(keep_all=True, device=torch.device(device), min_face_size=min_face_size, thresholds=list(thresholds))


_MTCNN_LOCK = threading.Lock()


class FaceDetector:
    """MTCNN face detection with 5-point landmarks, batched over same-sized images."""

    def __init__(self, config: DetectConfig = DetectConfig(), device: torch.device | str = "cpu"):
        self.config = config
        self.device = str(torch.device(device))

    def __call__(self, images: np.ndarray | list[np.ndarray]) -> list[Detections]:
        """images: [N, H, W, 3] uint8 RGB (all one size). Returns one Detections per image, in its pixels."""
        images = [np.asarray(im) for im in images]
        if not images:
            return []
        height, width = images[0].shape[:2]
        factor = min(1.0, self.config.max_side / max(height, width))
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            small = [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images]
        else:
            small = images
        net = _mtcnn(self.device, self.config.min_face_size, self.config.thresholds)
        with _MTCNN_LOCK, torch.inference_mode():
            boxes, scores, points = net.detect(np.stack(small), landmarks=True)
        results = []
        for b, s, p in zip(boxes, scores, points):
            if b is None:
                results.append(Detections.empty())
                continue
            b, s, p = np.asarray(b, np.float32), np.asarray(s, np.float32), np.asarray(p, np.float32)
            keep = s >= self.config.min_score
            results.append(Detections(b[keep] / factor, s[keep], p[keep] / factor))
        return results


# ------------------------------------------------------------------------------------------- alignment


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


def to_tensor(crops: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """[N, S, S, 3] (or [S, S, 3]) uint8 RGB -> float [N, 3, S, S] (or [3, S, S]) in [-1, 1], on `device`.

    The bytes travel to the device as uint8 (a quarter of float32's) and are converted there."""
    t = torch.from_numpy(np.ascontiguousarray(crops)).to(device).float().div_(127.5).sub_(1.0)
    return t.movedim(-1, -3)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, S, S] (or [3, S, S]) in about [-1, 1] -> [N, S, S, 3] (or [S, S, 3]) uint8 RGB."""
    t = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return t.movedim(-3, -1).cpu().numpy()


def align_photo(image: np.ndarray, size: int, *, detector: FaceDetector | None = None, scale: float = 1.0) -> torch.Tensor:
    """The largest face of a photo as a loose FFHQ-style head crop.

    image: [H, W, 3] uint8 RGB. Returns float [3, size, size] in [-1, 1]. Raises NoFaceError when no face is found.
    """
    detections = (detector or FaceDetector())([np.ascontiguousarray(image)])[0]
    if not len(detections):
        raise NoFaceError("no face found in the photo. Use a photo where one face is clearly visible.")
    landmarks = detections.landmarks[detections.largest()]
    crop = warp_crop(image, ffhq_affine(landmarks, size, scale), size)
    return to_tensor(crop)


def align_photo_file(path: str | Path, size: int, **kwargs) -> torch.Tensor:
    """align_photo on an image file; the NoFaceError names the file."""
    try:
        return align_photo(load_image(path), size, **kwargs)
    except NoFaceError:
        raise NoFaceError(f"{path}: no face found. Use a photo where one face is clearly visible.") from None
