"""Face detection over a video's frames: batched on the upright views, mapped back to the stored pixels."""

from __future__ import annotations

from typing import Callable

import numpy as np

from deid.faces.detection import Detections
from deid.media.video import points_to_stored, to_display
from deid.pipelines.stages import batched


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
