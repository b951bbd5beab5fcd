"""Faces at any roll: detection over rotated views of each image, mapped back to the image's own pixels.

MTCNN (like most face detectors) finds faces only within about +-30 degrees of upright. A head lying down, upside
down, or a phone video whose rotation tag was lost escapes it. `RollRobustDetector` runs the detector on views of
the image turned by multiples of 45 degrees (so every roll is within 22.5 degrees of one view), maps every
detection back and merges the duplicates. The five landmarks keep their anatomical order (the face's own eyes,
nose and mouth corners), so `ffhq_affine` cuts an upright crop of a rolled face and the tracker's smoothing works
on them unchanged.

For video, searching every view on every frame costs about eight detections per frame. `RollRobustStream` searches
the upright view on every frame at full resolution; all views on every `sweep_every`-th frame; on every frame the
views in which a face was seen during the last `hold` frames (the view nearest each face's roll), so a face that
stays rolled is followed frame by frame (at the size its face needs: a large face in a smaller view, since a
view costs in proportion to its pixels); and, between sweeps, the other turned views in rotation at a low
resolution, so a large face that appears rolled (after a cut, or right after a sweep) is found within
`rotation_groups` frames instead of at the next sweep. All the views of a batch that share a size go to the
detector in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from deid.faces.detection import Detections, box_iou, without_edge_ghosts

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
    # Video: a held view is searched only as large as its smallest recent face needs (twice the detector's smallest
    # face side), and never below `held_min_scale` of its full size (1.0: always full size). Sweeps search every view
    # at full size (small rolled faces are found there), the rotation between sweeps at `discovery_scale`.
    held_min_scale: float = 0.5
    # A held view's scale is rounded up to a power of 2 ** (1 / scale_steps_per_octave): a few view sizes per video,
    # not one per face size. Every new image size leaves buffers of its own size in the heap (`bench/video_pipeline.py
    # heap`: MTCNN grew by 255 MiB over two passes of 200 sizes, by 0.1 on 8 sizes in turn).
    # Rounding up costs at most 19 % more pixels with 8 steps.
    scale_steps_per_octave: int = 8
    discovery_scale: float = 0.4
    # Video, between sweeps: the turned views split into this many groups, one searched per frame in turn, so every
    # view is searched at least every `rotation_groups` frames (0: no rotation, only sweeps and held views).
    rotation_groups: int = 2


@dataclass(frozen=True)
class ViewSearch:
    """One view of one image to search: turned by `angle` degrees, at `scale` of the size the detector would
    search the (turned) image at (1.0: the detector's own max_side)."""

    angle: int
    scale: float = 1.0


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


def rotate_view(image: np.ndarray, angle: float, max_side: int | None = None,
                mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """image [H, W, 3] uint8 turned counter-clockwise by `angle` degrees. Returns the view and the [2, 3] affine
    image -> view. A view larger than `max_side` pixels is also scaled down to it (in the same warp when the turn
    is not a quarter turn: the detector would shrink it anyway). Where the image does not reach, the view is black,
    or with `mirror` the image reflected at its edge (a face cut off by the edge is then found whole)."""
    height, width = image.shape[:2]
    if angle % 360 == 0 and max_side is None:
        return image, np.array([[1.0, 0, 0], [0, 1.0, 0]])
    affine, size = view_affine((width, height), angle)
    scale = min(1.0, max_side / max(size)) if max_side else 1.0
    if angle % 90 == 0:  # np.rot90: exact, and faster than a warp
        turns = int(angle // 90) % 4
        if scale == 1.0:
            return np.ascontiguousarray(np.rot90(image, turns)), affine
        small = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        # shrunk, then turned: the turn copies the small image, not the frame
        unturned = small if turns % 2 == 0 else small[::-1]
        view = np.rot90(cv2.resize(image, unturned, interpolation=cv2.INTER_AREA), turns)
        return np.ascontiguousarray(view), _scaled(affine, size, small)
    if scale < 1.0:
        small = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        affine, size = _scaled(affine, size, small), small
    border = cv2.BORDER_REFLECT_101 if mirror else cv2.BORDER_CONSTANT
    return cv2.warpAffine(image, affine, size, flags=cv2.INTER_LINEAR, borderMode=border), affine


def _scaled(affine: np.ndarray, size: tuple[int, int], small: tuple[int, int]) -> np.ndarray:
    """The affine image -> view followed by the resize of the view from `size` to `small` (width, height),
    pixel centres onto pixel centres as cv2.resize maps them."""
    sx, sy = small[0] / size[0], small[1] / size[1]
    resize = np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1.0]])
    return (resize @ np.vstack([affine, [0, 0, 1.0]]))[:2]


def detections_to_image(found: Detections, affine: np.ndarray, angle: float, size: tuple[int, int]) -> Detections:
    """Detections in a view -> the image's pixels. Landmarks map exactly; a box maps to the axis-aligned box with
    the same centre and area (sides swapped when the view is turned nearer a quarter than a half turn).
    Faces mostly outside the image (`in_frame`: in a view's corners) are dropped, and so are the
    mirror images of faces cut off by the image's edge."""
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
    mapped = Detections(boxes.astype(np.float32), found.scores, landmarks.astype(np.float32))
    return without_edge_ghosts(mapped, size)


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

    Overlapping detections from different views are one face; the most confident is kept. A face turned far from
    a view's upright is sometimes still detected there, with landmarks placed as if it were upright (wrong); such
    detections score lower than the same face in a view that shows it within about 30 degrees of upright
    (measured on carphone at every view: never higher), so confidence picks the right landmarks. Detections of
    one search (one entry of `per_view`) are never merged with each other: the detector's own suppression already
    made them distinct faces, and in a crowd a head partly hidden behind another overlaps it (merging them lost the
    hidden face)."""
    found = [(angle, d) for angle, d in per_view if len(d)]
    if not found:
        return Detections.empty()
    boxes, scores, landmarks = (np.concatenate([getattr(d, name) for _, d in found])
                                for name in ("boxes", "scores", "landmarks"))
    views = np.concatenate([np.full(len(d), angle % 360) for angle, d in found])
    runs = np.concatenate([np.full(len(d), run) for run, (_, d) in enumerate(found)])  # one detector run each
    order = np.argsort(-scores, kind="stable")
    same = same_face(boxes, merge_iou) & (runs[:, None] != runs[None, :])
    kept: list[int] = []
    for i in order:
        if not any(same[i, k] for k in kept):
            kept.append(int(i))
    kept = [i for i in kept if not _spans_faces(i, kept, boxes, views)]
    kept.sort(key=lambda i: (boxes[i, 1], boxes[i, 0]))  # a stable order: top to bottom, left to right
    return Detections(boxes[kept], scores[kept], landmarks[kept])


def _spans_faces(i: int, kept: list[int], boxes: np.ndarray, views: np.ndarray) -> bool:
    """Whether detection i is a turned view's false face over a group of heads: its box holds the centres of two
    other kept faces. A turned view sometimes fires on a region spanning several heads (one at 0.98 over three
    astronaut heads in the benchmark clip). Upright detections are exempt: a large face in front with two small
    faces behind it is a real layout (an upright face at 0.999 was dropped so, and never replaced)."""
    if views[i] == 0:
        return False
    others = [k for k in kept if k != i]
    centres = (boxes[others, :2] + boxes[others, 2:]) / 2
    x0, y0, x1, y1 = boxes[i]
    inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
    return int(inside.sum()) >= 2


class RollRobustDetector:
    """A face detector (e.g. deid.faces.FaceDetector) run over turned views of each image.

    Called on images it searches every view at full size (photos); `stream()` gives the cheaper per-video searcher.
    The detector is called as detector(images, edges=...) (edges: whether the view's own edges are the image's,
    to be mirrored; see FaceDetector).
    """

    def __init__(self, detector, config: OrientationConfig = OrientationConfig()):
        if 0 not in config.views:
            raise ValueError("the upright view (0) must be among the views")
        self.detector = detector
        self.config = config
        # a FaceDetector shrinks large images to its max_side; turned views are shrunk in the same warp instead
        self.max_side = getattr(getattr(detector, "config", None), "max_side", None)
        self.min_face = getattr(getattr(detector, "config", None), "min_face_size", 20)

    def scale_for(self, face_side: float, angle: int, size: tuple[int, int]) -> float:
        """The scale (`ViewSearch.scale`, at least held_min_scale) at which a face of `face_side` image pixels is
        still twice the detector's smallest face in the view turned by `angle` of an image of size (width, height),
        rounded up to the scale ladder (`scale_steps_per_octave`)."""
        _, (view_w, view_h) = view_affine(size, angle)
        full = 1.0 if self.max_side is None else min(1.0, self.max_side / max(view_w, view_h))
        need = 2.0 * self.min_face / max(face_side * full, 1e-6)
        steps = self.config.scale_steps_per_octave
        rung = 2.0 ** (math.ceil(math.log2(need) * steps - 1e-9) / steps)  # the ladder's first rung >= need
        return float(np.clip(rung, self.config.held_min_scale, 1.0))

    def _view(self, image: np.ndarray, search: ViewSearch) -> tuple[np.ndarray, np.ndarray]:
        """The view of image [H, W, 3] a search looks at, and its affine image -> view."""
        if search.angle % 360 == 0 and search.scale == 1.0:
            return rotate_view(image, 0)
        _, (view_w, view_h) = view_affine((image.shape[1], image.shape[0]), search.angle)
        side = max(view_w, view_h) if self.max_side is None else min(self.max_side, max(view_w, view_h))
        return rotate_view(image, search.angle, max(1, round(side * search.scale)), mirror=True)

    def detect(self, images: list[np.ndarray], searches: list[list[ViewSearch]]) -> list[list[tuple[int, Detections]]]:
        """images: [H, W, 3] uint8, all one size; searches[i]: the views to search image i in (one per angle).
        Returns, per image, (angle, detections in image pixels) for each of its views. All views of one size (of
        any images and angles) go to the detector in one call."""
        results: list[list[tuple[int, Detections]]] = [[] for _ in images]
        if not images:
            return results
        height, width = images[0].shape[:2]
        views = [(i, search, *self._view(images[i], search)) for i, wanted in enumerate(searches) for search in wanted]
        groups: dict[tuple, list] = {}
        for item in views:  # same shape, same edge handling: one batch
            groups.setdefault((item[2].shape, item[1].angle % 90 == 0), []).append(item)
        for (_, quarter), members in groups.items():
            for (i, search, _, affine), found in zip(members, self.detector([m[2] for m in members], edges=quarter)):
                if search.angle % 360 and len(found):
                    found = found.select(found.scores >= self.config.min_turned_score)
                results[i].append((search.angle, detections_to_image(found, affine, search.angle, (width, height))))
        return results

    def __call__(self, images) -> list[Detections]:
        """images: [N, H, W, 3] uint8 RGB (one size). Every view of every image; one Detections per image."""
        images = [np.asarray(im) for im in images]
        every = [ViewSearch(angle) for angle in self.config.views]
        found = self.detect(images, [every] * len(images))
        return [merge_views(per_view, self.config.merge_iou) for per_view in found]

    def stream(self) -> "RollRobustStream":
        """A detector for the consecutive frames of one video (call it on batches, in order)."""
        return RollRobustStream(self)


class RollRobustStream:
    """Roll-robust detection over one video's frames, searching only the views that can hold a face.

    Every frame: the upright view, each view that showed a face (the view nearest its roll) within the last `hold`
    frames (at the scale its smallest face needs), and (between sweeps) one group of the turned views in rotation
    at `discovery_scale`. Every `sweep_every`-th frame: all views at full size. `searched` sums the views searched
    over frames, each weighed by its share of a full-size view's pixels (what the detection costs; 1 per frame would be upright only)."""

    def __init__(self, owner: RollRobustDetector):
        self.owner = owner
        self.config = owner.config
        self.frame = 0  # index of the next frame
        self.last_seen: dict[int, tuple[int, float]] = {}  # view -> (last frame a face near it was found, its side)
        self.searched = 0.0

    def _remember(self, index: int, found: Detections) -> None:
        """Note each face's view (the one nearest its roll) and its size; the smallest recent face of a view sets
        the size the view is searched at."""
        for view, side in self._faces_by_view(found):
            seen, before = self.last_seen.get(view, (-self.config.hold - 1, np.inf))
            recent = index - seen <= self.config.hold
            self.last_seen[view] = (index, min(side, before) if recent else side)

    def _faces_by_view(self, found: Detections) -> list[tuple[int, float]]:
        """(the view nearest its roll, its side in image pixels) of each face found."""
        if not len(found):
            return []
        sides = np.sqrt(np.prod(found.boxes[:, 2:] - found.boxes[:, :2], axis=1))
        return [(nearest_view(float(roll), self.config.views), float(side))
                for roll, side in zip(face_roll(found.landmarks), sides)]

    def _sweep(self) -> list[ViewSearch]:
        return [ViewSearch(a) for a in self.config.views]

    def _between_sweeps(self, index: int, held: dict[int, float]) -> list[ViewSearch]:
        """Frame `index`'s views: upright, the held views (view -> scale), and its group of the rotation."""
        cfg = self.config
        turned = [a for a in cfg.views if a % 360]
        groups = max(cfg.rotation_groups, 0)
        rotation = set(turned[index % groups::groups]) if groups else set()
        scales = {a: cfg.discovery_scale for a in rotation - set(held)}
        scales.update({a: scale for a, scale in held.items() if a % 360})
        return [ViewSearch(0)] + [ViewSearch(a, scales[a]) for a in sorted(scales)]

    def _held(self, newest: int, size: tuple[int, int]) -> dict[int, float]:
        """The views a face was seen near within `hold` frames of frame `newest`, each with the scale it needs."""
        return {v: self.owner.scale_for(side, v, size) for v, (t, side) in self.last_seen.items()
                if newest - t <= self.config.hold}

    def __call__(self, images) -> list[Detections]:
        """images: the video's next frames [N, H, W, 3] uint8 RGB, in order. Returns one Detections per frame."""
        images = [np.asarray(im) for im in images]
        cfg = self.config
        indices = range(self.frame, self.frame + len(images))
        self.frame += len(images)
        sweep = [k for k, t in enumerate(indices) if t % max(cfg.sweep_every, 1) == 0]
        results: list[list[tuple[int, Detections]]] = [[] for _ in images]
        searches: list[list[ViewSearch]] = [self._sweep() for _ in images]
        # sweeps first: what they find decides which views the other frames of the batch search
        for k, per_view in zip(sweep, self.owner.detect([images[k] for k in sweep], [searches[k] for k in sweep])):
            results[k] = per_view
            self._remember(indices[k], merge_views(per_view, cfg.merge_iou))
        rest = [k for k in range(len(images)) if k not in sweep]
        if rest:
            held = self._held(indices[rest[0]], (images[0].shape[1], images[0].shape[0]))
            for k in rest:
                searches[k] = self._between_sweeps(indices[k], held)
            for k, per_view in zip(rest, self.owner.detect([images[k] for k in rest], [searches[k] for k in rest])):
                results[k] = per_view
            self._follow(images, rest, held, searches, results)
        merged = [merge_views(per_view, cfg.merge_iou) for per_view in results]
        for k in rest:
            self._remember(indices[k], merged[k])
        self.searched += sum(s.scale ** 2 for wanted in searches for s in wanted)
        return merged

    def _follow(self, images, rest: list[int], held: dict[int, float], searches, results) -> None:
        """A face the rotation found in this batch is searched for in every other frame of the batch too, in its own
        view at the size it needs (the rotation alone would find it only every `rotation_groups` frames). In place."""
        cfg = self.config
        size = (images[0].shape[1], images[0].shape[0])
        new: dict[int, float] = {}
        for k in rest:
            for view, side in self._faces_by_view(merge_views(results[k], cfg.merge_iou)):
                if view % 360 and view not in held:
                    new[view] = max(new.get(view, 0.0), self.owner.scale_for(side, view, size))
        extra = {k: [ViewSearch(v, scale) for v, scale in sorted(new.items())
                     if not any(s.angle == v and s.scale >= scale for s in searches[k])] for k in rest}
        todo = [k for k in rest if extra[k]]
        for k, per_view in zip(todo, self.owner.detect([images[k] for k in todo], [extra[k] for k in todo])):
            searches[k] = searches[k] + extra[k]
            results[k] = results[k] + per_view
