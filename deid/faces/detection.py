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

    def select(self, keep: np.ndarray) -> "Detections":
        """The detections where `keep` (a [K] bool mask or index array) says so."""
        return Detections(self.boxes[keep], self.scores[keep], self.landmarks[keep])

    def largest(self) -> int:
        """Index of the face with the largest box."""
        sides = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(np.argmax(sides))


@dataclass(frozen=True)
class DetectConfig:
    min_face_size: int = 20  # smallest face side (pixels of the detection image) MTCNN looks for
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # MTCNN's three stage thresholds
    min_score: float = 0.9  # final face probability a detection must reach
    # A head partly hidden behind another scores lower (carphone half behind the astronaut: 0.71-0.79, where the
    # whole face scores 0.99+). A detection that reaches only `crowd_min_score` is kept when it lies within
    # `crowd_reach` of its own side from a face that reaches min_score: in a crowd, not alone on a wall.
    crowd_min_score: float = 0.7
    crowd_reach: float = 0.5
    max_side: int = 640  # frames larger than this are detected on a downscaled copy (faces stay findable)
    # Faces cut off by the frame's edge: MTCNN finds only a whole face. The detection image is padded on every side
    # by this fraction of its shorter side with the frame mirrored at its edge, so half a face becomes a whole
    # (symmetric) one. Faces up to about 2.5x the margin are found from 40 % visible.
    edge_margin: float = 0.1
    # The detection image is padded (right and bottom, black) to a multiple of this: frames of many sizes share
    # a few image pyramids, so the networks meet a bounded set of shapes (see deid.buckets).
    size_multiple: int = 32


def in_frame(boxes: np.ndarray, size: tuple[int, int], min_visible: float = 0.4) -> np.ndarray:
    """[K] bool: boxes [K, 4] with at least `min_visible` of their area inside an image of size (width, height).
    A face cut off by the edge and found whole in the mirrored margin shows at least half its (symmetric) box; a
    mirror image of the corner's pixels in both directions, a quarter."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    width, height = size
    inside_w = np.clip(np.minimum(boxes[:, 2], width) - np.maximum(boxes[:, 0], 0), 0, None)
    inside_h = np.clip(np.minimum(boxes[:, 3], height) - np.maximum(boxes[:, 1], 0), 0, None)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    return inside_w * inside_h / area >= min_visible - 1e-6


def without_edge_ghosts(found: "Detections", size: tuple[int, int]) -> "Detections":
    """Detections in an image of size (width, height), padded by mirroring for detection, less the mirror images:
    a face whose centre lies outside the image (but enough of it inside: `in_frame`) is dropped when it overlaps a face
    centred inside by IoU 0.3 or more (a face cut by the edge shows twice, itself and its reflection, at IoU 0.6 or
    more wherever the reflection is 40 % inside; a real neighbour overlaps less)."""
    if not len(found):
        return found
    centre = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
    inside = np.all((centre >= 0) & (centre <= np.array(size)), axis=1)
    keep = in_frame(found.boxes, size)
    if (~inside).any() and inside.any():
        keep &= inside | ~(box_iou(found.boxes, found.boxes[inside]) >= 0.3).any(axis=1)
    return found.select(keep)


class _ChannelsLast(torch.nn.Module):
    """`module` (a convolutional net) run on channels-last (NHWC) tensors, weights included: same values.

    oneDNN's NCHW kernels are slow for MTCNN's thin layers (3 to 10 channels: P-Net's first convolution and its
    max-pooling take 46 and 43 ms on 8 frames' pyramid level where NHWC takes 7 and 12; R-Net on 256 candidates 46 ms
    against 13, O-Net 370 against 169, on one thread of this machine)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor):
        return self.module(x.contiguous(memory_format=torch.channels_last))


@functools.lru_cache(maxsize=4)
def _mtcnn(device: str, min_face_size: int, thresholds: tuple[float, float, float]):
    # lazy: facenet-pytorch is imported only when a detector is first built (slow import)
    from facenet_pytorch import MTCNN

    # keep_all: every face, not just the best one; the weights ship inside the facenet-pytorch wheel.
    net = MTCNN(keep_all=True, device=torch.device(device), min_face_size=min_face_size, thresholds=list(thresholds))
    # The second and third stages see one crop per candidate box, a number that changes with every frame:
    # bucketed batches keep the set of shapes (oneDNN's primitive cache, cuDNN's autotuning) bounded.
    net.pnet, net.rnet, net.onet = (BucketedBatch(_ChannelsLast(stage)) for stage in (net.pnet, net.rnet, net.onet))
    return net


_MTCNN_LOCK = threading.Lock()


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """image [H, W, 3] with black rows and columns added below and to the right up to multiples of `multiple`
    (pixel coordinates do not change)."""
    extra_h, extra_w = -image.shape[0] % multiple, -image.shape[1] % multiple
    return np.pad(image, ((0, extra_h), (0, extra_w), (0, 0))) if extra_h or extra_w else image


def _mirror_edges(image: np.ndarray, margin: int) -> np.ndarray:
    """image [H, W, 3] with `margin` pixels added on every side, the image mirrored at its edge (pixel (x, y)
    moves to (x + margin, y + margin))."""
    if margin <= 0:
        return image
    return cv2.copyMakeBorder(image, margin, margin, margin, margin, cv2.BORDER_REFLECT_101)


def confident(found: "Detections", config: DetectConfig) -> np.ndarray:
    """[K] bool: detections that reach min_score, and weaker ones (down to crowd_min_score) next to one that does."""
    strong = found.scores >= config.min_score
    weak = (found.scores >= config.crowd_min_score) & ~strong
    if not weak.any() or not strong.any():
        return strong
    boxes = found.boxes.astype(np.float64)
    grow = config.crowd_reach * (boxes[:, 2:] - boxes[:, :2])
    reach = np.concatenate([boxes[:, :2] - grow, boxes[:, 2:] + grow], axis=1)
    near = (box_iou(reach[weak], boxes[strong]) > 0).any(axis=1)
    kept = strong.copy()
    kept[np.flatnonzero(weak)[near]] = True
    return kept


class FaceDetector:
    """MTCNN face detection with 5-point landmarks, batched over same-sized images."""

    def __init__(self, config: DetectConfig = DetectConfig(), device: torch.device | str = "cpu"):
        self.config = config
        self.device = str(torch.device(device))

    def __call__(self, images: np.ndarray | list[np.ndarray], edges: bool = True) -> list[Detections]:
        """images: [N, H, W, 3] uint8 RGB (all one size). Returns one Detections per image, in its pixels (a face
        cut off by the image's edge has a box reaching beyond it). `edges=False`: no mirrored margin (for views
        whose own border already surrounds the image, such as a 45-degree turn)."""
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
        margin = round(self.config.edge_margin * min(small[0].shape[:2])) if edges else 0
        small = [_pad_to_multiple(_mirror_edges(im, margin), self.config.size_multiple) for im in small]
        net = _mtcnn(self.device, self.config.min_face_size, self.config.thresholds)
        with _MTCNN_LOCK, torch.inference_mode():
            boxes, scores, points = net.detect(np.stack(small), landmarks=True)
        return [self._to_image(b, s, p, margin, factor, (width, height)) for b, s, p in zip(boxes, scores, points)]

    def _to_image(self, boxes, scores, points, margin: int, factor: float, size: tuple[int, int]) -> Detections:
        """MTCNN's output for one padded detection image -> Detections in the image's own pixels."""
        if boxes is None:
            return Detections.empty()
        found = Detections((np.asarray(boxes, np.float32) - margin) / factor, np.asarray(scores, np.float32),
                           (np.asarray(points, np.float32) - margin) / factor)
        found = found.select(confident(found, self.config))
        return without_edge_ghosts(found, size) if margin else found
