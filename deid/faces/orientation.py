"""Faces at any roll: detection over rotated views of each image, mapped back to the image's own pixels.

MTCNN (like most face detectors) finds faces only within about +-30 degrees of upright. A head lying down, upside
down, or a phone video whose rotation tag was lost escapes it. `RollRobustDetector` runs the detector on views of
the image turned by multiples of 45 degrees (so every roll is within 22.5 degrees of one view), maps every
detection back and merges the duplicates. The five landmarks keep their anatomical order (the face's own eyes,
nose and mouth corners), so `ffhq_affine` cuts an upright crop of a rolled face and the tracker's smoothing works
on them unchanged.

For video, searching every view on every frame costs about eight detections per frame. `RollRobustStream` searches
the upright view on every frame, all views on every `sweep_every`-th frame (to discover faces in new
orientations), and, on every frame, the views in which a face was seen during the last `hold` frames (the view
nearest each face's roll), so a face that stays rolled is followed frame by frame at the price of one more view.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from deid.faces.detection import Detections, box_iou

VIEW_STEP = 45  # degrees between views: every roll is within half of it of some view


@dataclass(frozen=True)
class OrientationConfig:
    views: tuple[int, ...] = (0, 45, 90, 135, 180, 225, 270, 315)  # degrees (counter-clockwise) the image is turned
    sweep_every: int = 8  # video: every k-th frame is searched in every view (1: every frame, the costliest)
    hold: int = 16  # video: a view keeps being searched on every frame until this many frames after its last face
    merge_iou: float = 0.3  # detections of one face in several views overlap at least this much
    # Detections in turned views must be this confident: each view is another chance for a false face (the gray
    # astronaut's 135-degree view shows one at 0.93), while a real face's best view scores >= 0.998 on carphone
    # turned by every 15 degrees.
    min_turned_score: float = 0.98


def face_roll(landmarks: np.ndarray) -> np.ndarray:
    """The roll of faces in degrees from their 5 landmarks [..., 5, 2] (pixels, y down); returns [...].

    0 for an upright face; a face whose eye line is turned clockwise on screen has a positive roll, so that turning
    the image counter-clockwise by the roll (`rotate_view`) makes it upright. The axis is the one `ffhq_affine`
    aligns: the eye line averaged with the eye-to-mouth axis turned by 90 degrees.
    """
    lm = np.asarray(landmarks, np.float64)
    eye_to_eye = lm[..., 1, :] - lm[..., 0, :]
    eye_to_mouth = (lm[..., 3, :] + lm[..., 4, :]) / 2 - (lm[..., 0, :] + lm[..., 1, :]) / 2
    x_axis = eye_to_eye + np.stack([eye_to_mouth[..., 1], -eye_to_mouth[..., 0]], axis=-1)
    return np.degrees(np.arctan2(x_axis[..., 1], x_axis[..., 0]))


def nearest_view(roll: float, views: tuple[int, ...]) -> int:
    """The view (degrees) that shows a face of this roll closest to upright."""
    gaps = [abs((roll - v + 180) % 360 - 180) for v in views]
    return views[int(np.argmin(gaps))]


def view_affine(size: tuple[int, int], angle: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The map image -> view for an image of size (width, height) turned counter-clockwise by `angle` degrees.

    Returns the [2, 3] float64 affine and the view's (width, height): the whole turned image fits, centred.
    Quarter turns map pixel centres onto pixel centres exactly (the view is np.rot90 of the image)."""
    width, height = size
    rad = np.radians(angle)
    c, s = round(np.cos(rad), 12), round(np.sin(rad), 12)
    view_w = int(np.ceil(abs(width * c) + abs(height * s) - 1e-6))
    view_h = int(np.ceil(abs(width * s) + abs(height * c) - 1e-6))
    # rotate about the image's centre pixel onto the view's centre pixel (cv2.getRotationMatrix2D's convention)
    rotation = np.array([[c, s], [-s, c]])
    centre, view_centre = np.array([(width - 1) / 2, (height - 1) / 2]), np.array([(view_w - 1) / 2, (view_h - 1) / 2])
    affine = np.concatenate([rotation, (view_centre - rotation @ centre)[:, None]], axis=1)
    return affine, (view_w, view_h)


def rotate_view(image: np.ndarray, angle: float, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """image [H, W, 3] uint8 turned counter-clockwise by `angle` degrees (black where the image does not reach).
    Returns the view and the [2, 3] affine image -> view. A view that is not a quarter turn is also scaled down to
    at most `max_side` pixels in the same warp (the detector would shrink it anyway)."""
    height, width = image.shape[:2]
    if angle % 360 == 0:
        return image, np.array([[1.0, 0, 0], [0, 1.0, 0]])
    affine, size = view_affine((width, height), angle)
    if angle % 90 == 0:
        return np.ascontiguousarray(np.rot90(image, int(angle // 90) % 4)), affine  # exact, and faster than a warp
    scale = min(1.0, max_side / max(size)) if max_side else 1.0
    if scale < 1.0:
        size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        affine = affine * scale
    return cv2.warpAffine(image, affine, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT), affine


def detections_to_image(found: Detections, affine: np.ndarray, angle: float, size: tuple[int, int]) -> Detections:
    """Detections in a view -> the image's pixels. Landmarks map exactly; a box maps to the axis-aligned box with
    the same centre and area (sides swapped when the view is turned nearer a quarter than a half turn).
    Faces whose centre falls outside the image (in the view's black corners) are dropped."""
    if not len(found):
        return found
    inverse = cv2.invertAffineTransform(np.asarray(affine, np.float64))
    to_image = lambda p: p @ inverse[:, :2].T + inverse[:, 2]  # noqa: E731
    landmarks = to_image(found.landmarks.astype(np.float64))
    b = found.boxes.astype(np.float64)
    centre = to_image((b[:, :2] + b[:, 2:]) / 2)
    half = (b[:, 2:] - b[:, :2]) / 2 / np.sqrt(abs(np.linalg.det(np.asarray(affine, np.float64)[:, :2])))  # view scale
    rad = np.radians(angle)
    if abs(np.sin(rad)) > abs(np.cos(rad)) + 1e-9:
        half = half[:, ::-1]
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    width, height = size
    inside = (centre[:, 0] >= 0) & (centre[:, 0] < width) & (centre[:, 1] >= 0) & (centre[:, 1] < height)
    return Detections(boxes[inside].astype(np.float32), found.scores[inside], landmarks[inside].astype(np.float32))


def same_face(boxes: np.ndarray, min_iou: float, centre_fraction: float = 0.6) -> np.ndarray:
    """[K, K] bool: boxes [K, 4] that mark one face: overlapping by `min_iou`, or overlapping at all with centres
    closer than `centre_fraction` of the smaller box's side (a face seen from a far view can be boxed half a face
    off, at IoU ~0.28 on carphone)."""
    boxes = np.asarray(boxes, np.float64)
    iou = box_iou(boxes, boxes)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    close = distance < centre_fraction * np.minimum(sides[:, None], sides[None])
    return (iou >= min_iou) | ((iou > 0) & close)


def merge_views(per_view: list[tuple[int, Detections]], merge_iou: float) -> Detections:
    """One detection per face from detections of the same image in several views (image pixels).

    Overlapping detections are one face; the most confident is kept. A face turned far from a view's upright is
    sometimes still detected there, with landmarks placed as if it were upright (wrong); such detections score
    lower than the same face in a view that shows it within about 30 degrees of upright (measured on carphone at
    every view: never higher), so confidence picks the right landmarks."""
    boxes, scores, landmarks = [], [], []
    for _, found in per_view:
        if len(found):
            boxes.append(found.boxes)
            scores.append(found.scores)
            landmarks.append(found.landmarks)
    if not boxes:
        return Detections.empty()
    boxes, scores, landmarks = (np.concatenate(x) for x in (boxes, scores, landmarks))
    order = np.argsort(-scores, kind="stable")
    same = same_face(boxes, merge_iou)
    kept: list[int] = []
    for i in order:
        if not any(same[i, k] for k in kept):
            kept.append(int(i))
    # A turned view sometimes fires on a region spanning several heads (one at 0.98 over three astronaut heads in
    # the benchmark clip). A face's box cannot hold the centres of two other faces: such a box is not a face.
    centres = (boxes[kept, :2] + boxes[kept, 2:]) / 2
    inside = ((centres[None, :, 0] > boxes[kept, None, 0]) & (centres[None, :, 0] < boxes[kept, None, 2])
              & (centres[None, :, 1] > boxes[kept, None, 1]) & (centres[None, :, 1] < boxes[kept, None, 3]))
    np.fill_diagonal(inside, False)
    kept = [i for i, holds in zip(kept, inside.sum(axis=1)) if holds < 2]
    kept.sort(key=lambda i: (boxes[i, 1], boxes[i, 0]))  # a stable order: top to bottom, left to right
    return Detections(boxes[kept], scores[kept], landmarks[kept])


class RollRobustDetector:
    """A face detector (e.g. deid.faces.FaceDetector) run over turned views of each image.

    Called on images it searches every view (photos); `stream()` gives the cheaper per-video searcher.
    """

    def __init__(self, detector, config: OrientationConfig = OrientationConfig()):
        if 0 not in config.views:
            raise ValueError("the upright view (0) must be among the views")
        self.detector = detector
        self.config = config
        # a FaceDetector shrinks large images to its max_side; turned views are shrunk in the same warp instead
        self.max_side = getattr(getattr(detector, "config", None), "max_side", None)

    def detect(self, images: list[np.ndarray], views: list[tuple[int, ...]]) -> list[list[tuple[int, Detections]]]:
        """images: [H, W, 3] uint8, all one size; views[i]: the angles to search image i in.
        Returns, per image, (angle, detections in image pixels) for each of its views. One detector call per angle."""
        results: list[list[tuple[int, Detections]]] = [[] for _ in images]
        if not images:
            return results
        height, width = images[0].shape[:2]
        for angle in sorted({a for v in views for a in v}):
            members = [i for i, v in enumerate(views) if angle in v]
            turned = [rotate_view(images[i], angle, self.max_side) for i in members]
            for i, found, (_, affine) in zip(members, self.detector([v for v, _ in turned]), turned):
                if angle % 360 and len(found):
                    keep = found.scores >= self.config.min_turned_score
                    found = Detections(found.boxes[keep], found.scores[keep], found.landmarks[keep])
                results[i].append((angle, detections_to_image(found, affine, angle, (width, height))))
        return results

    def __call__(self, images) -> list[Detections]:
        """images: [N, H, W, 3] uint8 RGB (one size). Every view of every image; one Detections per image."""
        images = [np.asarray(im) for im in images]
        found = self.detect(images, [self.config.views] * len(images))
        return [merge_views(per_view, self.config.merge_iou) for per_view in found]

    def stream(self) -> "RollRobustStream":
        """A detector for the consecutive frames of one video (call it on batches, in order)."""
        return RollRobustStream(self)


class RollRobustStream:
    """Roll-robust detection over one video's frames, searching only the views that can hold a face.

    Every frame: the upright view and each view that showed a face (the view nearest its roll) within the last
    `hold` frames. Every `sweep_every`-th frame: all views. Counts of views searched are kept in `searched`
    (what the extra detection costs)."""

    def __init__(self, owner: RollRobustDetector):
        self.owner = owner
        self.config = owner.config
        self.frame = 0  # index of the next frame
        self.last_seen: dict[int, int] = {}  # view -> last frame index a face near it was found
        self.searched = 0  # views searched, summed over frames (1 per frame would be upright only)

    def _remember(self, index: int, found: Detections) -> None:
        for roll in face_roll(found.landmarks) if len(found) else ():
            self.last_seen[nearest_view(float(roll), self.config.views)] = index

    def __call__(self, images) -> list[Detections]:
        """images: the video's next frames [N, H, W, 3] uint8 RGB, in order. Returns one Detections per frame."""
        images = [np.asarray(im) for im in images]
        cfg = self.config
        indices = range(self.frame, self.frame + len(images))
        self.frame += len(images)
        sweep = [k for k, t in enumerate(indices) if t % max(cfg.sweep_every, 1) == 0]
        results: list[list[tuple[int, Detections]]] = [[] for _ in images]
        # sweeps first: what they find decides which views the other frames of the batch search
        for k, per_view in zip(sweep, self.owner.detect([images[k] for k in sweep], [cfg.views] * len(sweep))):
            results[k] = per_view
            self._remember(indices[k], merge_views(per_view, cfg.merge_iou))
        rest = [k for k in range(len(images)) if k not in sweep]
        if rest:
            newest = indices[rest[0]]
            active = tuple(sorted({0} | {v for v, t in self.last_seen.items() if newest - t <= cfg.hold}))
            for k, per_view in zip(rest, self.owner.detect([images[k] for k in rest], [active] * len(rest))):
                results[k] = per_view
        merged = [merge_views(per_view, cfg.merge_iou) for per_view in results]
        for k in rest:
            self._remember(indices[k], merged[k])
        self.searched += sum(len(per_view) for per_view in results)
        return merged
