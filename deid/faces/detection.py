"""Face detection: MTCNN with 5-point landmarks, batched, on a downscaled copy of large frames.

Coordinates are pixels in the (upright) image, x to the right and y down. The five landmarks are, in order:
left eye, right eye (as seen in the upright face: for a face turned upside down, the left one is on the right),
nose tip, left and right mouth corner.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from deid.buckets import BucketedBatch


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
    # The detection image is padded (right and bottom, black) to a multiple of this: frames of many sizes share
    # a few image pyramids, so the networks meet a bounded set of shapes (see deid.buckets).
    size_multiple: int = 32


@functools.lru_cache(maxsize=4)
def _mtcnn(device: str, min_face_size: int, thresholds: tuple[float, float, float]):
    # lazy: facenet-pytorch is imported only when a detector is first built (slow import)
    from facenet_pytorch import MTCNN

    # keep_all: every face, not just the best one; the weights ship inside the facenet-pytorch wheel.
    net = MTCNN(keep_all=True, device=torch.device(device), min_face_size=min_face_size, thresholds=list(thresholds))
    # The second and third stages see one crop per candidate box, a number that changes with every frame:
    # bucketed batches keep the set of shapes (oneDNN's primitive cache, cuDNN's autotuning) bounded.
    net.pnet, net.rnet, net.onet = BucketedBatch(net.pnet), BucketedBatch(net.rnet), BucketedBatch(net.onet)
    return net


_MTCNN_LOCK = threading.Lock()


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """image [H, W, 3] with black rows and columns added below and to the right up to multiples of `multiple`
    (pixel coordinates do not change)."""
    extra_h, extra_w = -image.shape[0] % multiple, -image.shape[1] % multiple
    return np.pad(image, ((0, extra_h), (0, extra_w), (0, 0))) if extra_h or extra_w else image


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
        small = [_pad_to_multiple(im, self.config.size_multiple) for im in small]
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
