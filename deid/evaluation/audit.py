"""The privacy audit: is anyone still recognisable in an output frame? And the fail-safe that covers who is.

The audit looks with networks that took no part in making the output, so it is not blind where the pipeline was:

- detection: dlib's HOG + linear SVM frontal face detector (hand-made gradient features, a failure mode unlike the
  MTCNN cascade that chose which faces to replace), on all four quarter turns of the frame, because like every
  frontal detector it sees faces only within about 20 degrees of upright, and rolled heads are exactly where the
  pipeline's own detector is weakest (a view and its half turn share one HOG feature pyramid: deid.evaluation.hog);
- recognition: dlib's ResNet descriptor (trained on other data than facenet's VGGFace2 network, the identity
  encoder the generator was steered with), on faces aligned by dlib's 5-point shape predictor (dlib's own pairing
  for this recogniser; the audit needs no other landmarks), with dlib's own same-person threshold, distance < 0.6.

Each frame is searched in passes, each on an audited copy (`_Geometry`):

- the whole frame, on all four quarter turns, scaled so the smallest face looked for (`min_face`) fills HOG's
  window (no finer: that is the documented limit), and padded on every side by reflection, about a quarter of the
  largest expected face side, so a face cut off by the frame's edge is completed by its mirror image;
- around each face the pipeline replaced that is small for the whole-frame pass, or cut off by the frame's edge,
  harder: scaled so faces down to half its box fill the window, in the quarter turns the face's roll suggests;
- after the fail-safe covered something, around each covered region only (all four turns): is it still recognised?

A face the audit finds in the output frame is a leak when it was not replaced (its centre lies in no replaced
face's box: a missed detection, a face the tracker dropped, a face too small for the model), or when it was
replaced and its descriptor is still within 0.6 of the source frame's descriptor at the same place. Only faces the
audit detects are measured: a recogniser applied to a region without a face gives meaningless distances. With
track ids, the source face's descriptor is computed once per track and view, and again when the face's box moves
(`SourceFaces`); the output's is computed every frame.

The fail-safe covers each leak before the frame is written (`blur`, `pixelate` or `black`) over the face's box grown
to a square `head_scale` times its longer side (the head, whichever way it is rolled), then measures the covered
face again and blacks it out if the recogniser still matches it. Blur and pixelate strengths are fractions of the
covered square: measured on carphone and the astronaut, the default blur takes every dlib distance to the source
from 0 to above 0.65 (at least 0.742 with the audit's 5-point alignment, 0.738 with 68 points; pixelate 0.698 and
0.722; tests/test_audit.py checks it).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from deid.atomic import atomic_output
from deid.faces.orientation import same_face
from deid.evaluation.hog import hog_detector, pad_to_cells
from deid.evaluation.recognizers import DLIB_SAME_PERSON_DISTANCE, DlibFaceAnalyzer

FAIL_SAFES = ("blur", "pixelate", "black", "none")
HOG_WINDOW = 80  # pixels: the side of the face dlib's frontal HOG detector is trained on (smaller faces are missed)
ALL_TURNS = (0, 1, 2, 3)


@dataclass(frozen=True)
class AuditConfig:
    min_face: int = 40  # smallest face side (frame pixels) the audit looks for; small frames are scaled up for it
    max_side: int = 960  # ...but the audited copy's longer side stays below this (cost); see `smallest_face`
    hog_threshold: float = 0.0  # dlib's detection score threshold (its default), anywhere in the frame
    # ...and within the boxes where the source held a face, where a face is expected: the pasted crop is resampled
    # twice, which costs HOG some confidence (a leaky model's carphone output: 16 of 24 frames at 0, 24 at -0.3)
    expected_threshold: float = -0.3
    same_person_distance: float = DLIB_SAME_PERSON_DISTANCE
    fail_safe: str = "blur"  # blur | pixelate | black | none
    head_scale: float = 2.0  # covered square side / the face box's longer side
    blur_sigma: float = 0.08  # Gaussian sigma / covered square side
    pixel_blocks: int = 8  # pixelation blocks across the covered square
    largest_face: float = 0.5  # the largest face side expected / the frame's shorter side (sets the edge padding)
    edge_margin: float = 0.25  # padding on each side of the frame / the largest face side expected
    near_faces: float = 0.5  # around a replaced face, faces down to this fraction of its box's side are looked for
    refresh_shift: float = 0.1  # a track's source descriptor is remade when its box moves by this x its side

    def __post_init__(self):
        if self.fail_safe not in FAIL_SAFES:
            raise ValueError(f"fail_safe must be one of {FAIL_SAFES}, not {self.fail_safe!r}")

    def scale(self, size: tuple[int, int]) -> float:
        """The factor a frame of size (width, height) is resized by for the audit."""
        return min(HOG_WINDOW / self.min_face, self.max_side / max(size))

    def smallest_face(self, size: tuple[int, int]) -> float:
        """The smallest face side (frame pixels) the audit can see in a frame of this size."""
        return HOG_WINDOW / self.scale(size)

    def edge_padding(self, size: tuple[int, int]) -> int:
        """Frame pixels of reflected padding on each side of a frame of size (width, height)."""
        return int(round(self.edge_margin * self.largest_face * min(size)))


@dataclass
class FaceCheck:
    """One face the audit found in an output frame. box: [x0, y0, x1, y1] frame pixels; view: the quarter turn
    (degrees counter-clockwise) it was found in; distance: dlib distance to the source at the same place (None for
    an unreplaced face: it is the source)."""

    box: list[float]
    view: int
    replaced: bool
    distance: float | None
    leak: bool


@dataclass
class Cover:
    """A region the fail-safe covered: box [x0, y0, x1, y1] frame pixels, method (`blur+black` where the blur was not
    enough), and the dlib distance to the source of a face still found there afterwards (None: none found)."""

    box: list[int]
    method: str
    distance_after: float | None


@dataclass
class FrameAudit:
    frame: int
    source_faces: int | None  # faces known in the source frame (replaced ones, or the original's for an evaluation)
    replaced: int
    faces: list[FaceCheck] = field(default_factory=list)
    covered: list[Cover] = field(default_factory=list)

    @property
    def leaks(self) -> list[FaceCheck]:
        return [f for f in self.faces if f.leak]

    @property
    def residual(self) -> bool:
        """A leak remains in the written frame (the fail-safe is off, or could not cover it)."""
        return bool(self.leaks) and len(self.covered) < len(self.leaks)

    @property
    def has_source_face(self) -> bool:
        """The source frame holds a face as far as anyone knows: the pipeline replaced (or the caller expected) one
        there, or the audit found one the pipeline did not replace (the source's own face)."""
        return bool(self.source_faces) or any(not f.replaced for f in self.faces)

    def record(self) -> dict:
        return {"frame": self.frame, "source_faces": self.source_faces, "replaced": self.replaced,
                "faces": [asdict(f) for f in self.faces], "leaks": len(self.leaks),
                "covered": [asdict(c) for c in self.covered]}


@dataclass
class AuditTotals:
    frames: int = 0
    frames_with_faces: int = 0  # output frames in which the audit found a face
    # frames whose source holds a face (FrameAudit.has_source_face): a leak rate over far fewer frames with faces
    # means the audit did not see most of them, and measured nothing there
    frames_with_source_faces: int = 0
    unseen_frames: int = 0  # ...of them, frames in which the audit found no face at all
    faces: int = 0
    leaks: int = 0  # faces
    leaked_frames: int = 0  # frames with at least one leak, before the fail-safe
    covered_frames: int = 0
    residual_leaked_frames: int = 0  # frames written with a leak left in them

    def add(self, audit: FrameAudit) -> None:
        self.frames += 1
        self.frames_with_faces += bool(audit.faces)
        self.frames_with_source_faces += audit.has_source_face
        self.unseen_frames += audit.has_source_face and not audit.faces
        self.faces += len(audit.faces)
        self.leaks += len(audit.leaks)
        self.leaked_frames += bool(audit.leaks)
        self.covered_frames += bool(audit.covered)
        self.residual_leaked_frames += audit.residual

    @property
    def leak_rate(self) -> float:
        """Leaked frames / frames in which the audit finds a face (0 when it finds none)."""
        return self.leaked_frames / self.frames_with_faces if self.frames_with_faces else 0.0

    def record(self) -> dict:
        return {**asdict(self), "leak_rate": self.leak_rate}


def _unturn_box(box: np.ndarray, turns: int, size: tuple[int, int]) -> np.ndarray:
    """A box [4] (x0, y0, x1, y1) in np.rot90(image, turns) -> the image's pixels; size: the image's (width, height).

    One counter-clockwise quarter turn maps image (x, y) to view (y, W - x), so a view box (u0, v0, u1, v1) came
    from the image box (W - v1, u0, W - v0, u1), W being the view's height."""
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = size
    view_w, view_h = (height, width) if turns % 2 else (width, height)
    for _ in range(turns % 4):
        x0, y0, x1, y1 = view_h - y1, x0, view_h - y0, x1
        view_w, view_h = view_h, view_w
    return np.array([x0, y0, x1, y1])


def _inside(box: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    """[K] bool: the centre of `box` [4] lies in each of `boxes` [K, 4] (all pixels, x0 y0 x1 y1)."""
    if boxes is None or not len(boxes):
        return np.zeros(0, bool)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return (boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])


def roll_turns(roll: float | None) -> tuple[int, ...]:
    """The quarter turns (np.rot90 counts) in which a face of this roll (degrees, deid.faces.orientation.face_roll)
    looks upright enough for HOG (within about 25 degrees): the nearest, and its neighbour when the roll lies
    between the two. None (roll unknown): all four."""
    if roll is None or not np.isfinite(roll):
        return ALL_TURNS
    nearest = int(np.round(roll / 90))
    off = roll - 90 * nearest
    turns = (nearest % 4,)
    return turns + ((nearest + int(np.sign(off))) % 4,) if abs(off) > 25 else turns


@dataclass(frozen=True)
class _Geometry:
    """How an audited copy is cut from a frame: `region` [x0, y0, x1, y1] (frame pixels; it may reach beyond the
    frame) resized by `scale`. What lies beyond the frame is the frame reflected at its edge, so a face cut off
    there is completed by its mirror image and fills HOG's window; inside, the copy holds the frame's own pixels."""

    region: tuple[int, int, int, int]
    scale: float

    def _inner(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        height, width = shape[:2]
        x0, y0, x1, y1 = self.region
        return max(0, x0), max(0, y0), min(width, x1), min(height, y1)

    def copy(self, image: np.ndarray) -> np.ndarray:
        """The copy [h, w, C] of image [H, W, C] (uint8)."""
        ix0, iy0, ix1, iy1 = self._inner(image.shape)
        crop = image[iy0:iy1, ix0:ix1]
        size = (max(1, round((ix1 - ix0) * self.scale)), max(1, round((iy1 - iy0) * self.scale)))
        if size != (ix1 - ix0, iy1 - iy0):
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR)
        x0, y0, x1, y1 = self.region
        pads = [max(0, round(v * self.scale)) for v in (iy0 - y0, y1 - iy1, ix0 - x0, x1 - ix1)]
        if not any(pads):
            return crop
        border = cv2.BORDER_REFLECT_101 if min(crop.shape[:2]) > 1 else cv2.BORDER_REPLICATE
        return cv2.copyMakeBorder(crop, *pads, border)

    def to_frame(self, box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A box [4] in the copy of a frame of this shape -> frame pixels (they may lie beyond the frame)."""
        ix0, iy0, ix1, iy1 = self._inner(shape)
        sx = max(1, round((ix1 - ix0) * self.scale)) / (ix1 - ix0)  # the scale the resize really made
        sy = max(1, round((iy1 - iy0) * self.scale)) / (iy1 - iy0)
        left, top = max(0, round((ix0 - self.region[0]) * self.scale)), max(0, round((iy0 - self.region[1]) * self.scale))
        x0, y0, x1, y1 = (float(v) for v in box)
        return np.array([ix0 + (x0 - left) / sx, iy0 + (y0 - top) / sy, ix0 + (x1 - left) / sx, iy0 + (y1 - top) / sy])


class _Copies:
    """The audited copies of one frame, each geometry's made once (RGB for the recogniser, gray for HOG), padded
    at the right and bottom to whole HOG cells."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self._rgb: dict[_Geometry, np.ndarray] = {}
        self._gray: dict[_Geometry, np.ndarray] = {}

    def rgb(self, geometry: _Geometry) -> np.ndarray:
        if geometry not in self._rgb:  # in whole HOG cells: where a view and its half turn are searched together
            self._rgb[geometry] = pad_to_cells(geometry.copy(self.image))
        return self._rgb[geometry]

    def gray(self, geometry: _Geometry) -> np.ndarray:
        if geometry not in self._gray:
            self._gray[geometry] = cv2.cvtColor(self.rgb(geometry), cv2.COLOR_RGB2GRAY)
        return self._gray[geometry]


@dataclass
class _Found:
    box: np.ndarray  # [4] frame pixels
    turns: int  # quarter turns (counter-clockwise) of the view it was found in
    in_view: np.ndarray  # [4] the box in that view of the audited copy
    score: float
    geometry: _Geometry  # the audited copy it was found in


class SourceFaces:
    """The source faces' dlib descriptors of one video, per track and view: a source face is described once and
    again when its box moves by more than `refresh_shift` x its side (or changes size by as much). Tracks not seen
    for `forget_after` frames are dropped, so memory stays flat however many people pass."""

    def __init__(self, refresh_shift: float, forget_after: int = 150):
        self.refresh_shift = refresh_shift
        self.forget_after = forget_after
        self._known: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = {}  # -> (box, descriptor, frame)
        self.described = 0  # descriptors computed (the rest were reused)

    def descriptor(self, key: tuple[int, int], box: np.ndarray, frame: int, describe: Callable[[], np.ndarray]) -> np.ndarray:
        """The descriptor [128] of the source face of `key` (track id, quarter turns) at `box` [4] in `frame`."""
        known = self._known.get(key)
        if known is None or self._moved(known[0], box):
            known = (np.asarray(box, np.float64), describe(), frame)
            self.described += 1
        self._known[key] = (known[0], known[1], frame)
        self._forget(frame)
        return known[1]

    def _moved(self, before: np.ndarray, box: np.ndarray) -> bool:
        side = max(before[2] - before[0], before[3] - before[1])
        shift = np.abs(np.asarray(box, np.float64) - before).max()
        return shift > self.refresh_shift * side

    def _forget(self, frame: int) -> None:
        for key in [k for k, (_, _, seen) in self._known.items() if abs(frame - seen) > self.forget_after]:
            del self._known[key]


class FaceAuditor:
    """Checks output frames against their source frames; with a fail-safe, covers what leaks. Thread-safe."""

    def __init__(self, config: AuditConfig = AuditConfig()):
        self.config = config
        self.analyzer = DlibFaceAnalyzer(landmarks=5)  # descriptors only: dlib's pairing, 31.6 MB of model files
        self.hog = hog_detector()  # one per process, shared by every auditor, with the lock that guards it
        self.timings: dict[str, float] | None = None  # set to {} to sum seconds per pass (bench/video_pipeline.py)

    @contextlib.contextmanager
    def _timing(self, key: str):
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    @property
    def identity(self) -> dict:
        """The networks and settings, for the record."""
        return {"detector": "dlib HOG frontal face detector, 4 quarter turns (2 feature pyramids)",
                **self.analyzer.identity,
                "config": asdict(self.config)}

    # ------------------------------------------------------------------------------------ where to look

    def _frame_geometry(self, shape: tuple[int, ...]) -> _Geometry:
        """The whole frame, scaled so the smallest face looked for fills HOG's window, padded at its edges."""
        height, width = shape[:2]
        pad = self.config.edge_padding((width, height))
        return _Geometry((-pad, -pad, width + pad, height + pad), self.config.scale((width, height)))

    def _near_geometry(self, box: np.ndarray, frame: _Geometry, shape: tuple[int, ...]) -> _Geometry | None:
        """Around a replaced face box [4]: a square of 1.5 times its side (room for HOG's window around a face of
        up to the box's size), scaled so faces down to `near_faces` of its side fill the window (at most twice as
        fine as the frame pass allows anywhere); None where the whole-frame pass already looks that closely and
        the face lies inside the frame (a face cut off by the edge is looked at again, reflected around its box)."""
        side = max(float(box[2] - box[0]), float(box[3] - box[1]), 1.0)
        scale = min(HOG_WINDOW / (self.config.near_faces * side), 2 * HOG_WINDOW / self.config.min_face)
        height, width = shape[:2]
        cut_off = box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height
        if scale <= 1.25 * frame.scale and not cut_off:
            return None
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half = 0.75 * side
        return _Geometry((int(np.floor(cx - half)), int(np.floor(cy - half)), int(np.ceil(cx + half)),
                          int(np.ceil(cy + half))), scale)

    def _around(self, region: np.ndarray, shape: tuple[int, ...]) -> _Geometry:
        """A covered region [4] and half its side around it, at the whole-frame pass's scale."""
        x0, y0, x1, y1 = (int(v) for v in region)
        grow = max(x1 - x0, y1 - y0) // 2
        return _Geometry((x0 - grow, y0 - grow, x1 + grow, y1 + grow), self._frame_geometry(shape).scale)

    # ------------------------------------------------------------------------------------ detection

    def _search(self, copies: _Copies, geometry: _Geometry, turns: Sequence[int], expected: np.ndarray | None,
                kind: str) -> list[_Found]:
        """HOG on the given quarter turns of one audited copy: faces scoring `hog_threshold`, or `expected_threshold`
        where a face is expected (its centre inside one of `expected` [K, 4], frame pixels). kind: the pass's name
        in `timings`."""
        with self._timing(f"copy {kind}"):
            gray = copies.gray(geometry)
        size = (gray.shape[1], gray.shape[0])
        threshold = min(self.config.hog_threshold, self.config.expected_threshold)
        found = []
        for turn in turns:
            if turn - 2 in turns:
                continue  # searched with its half turn, on one feature pyramid
            view = np.ascontiguousarray(np.rot90(gray, turn))
            both = turn + 2 in turns
            with self._timing(f"hog {kind} {90 * turn}" + (f"+{90 * turn + 180}" if both else "")):
                hits = self.hog.run(view, threshold, half_turn_too=both)
            for hit in hits:
                upright_turn, in_view = turn, hit.box
                if hit.half_turned:  # upright in the view's half turn: record it there (a half turn undoes itself)
                    upright_turn, in_view = turn + 2, _unturn_box(hit.box, 2, (view.shape[1], view.shape[0]))
                box = geometry.to_frame(_unturn_box(in_view, upright_turn, size), copies.image.shape)
                if hit.score >= self.config.hog_threshold or (hit.score >= self.config.expected_threshold and _inside(box, expected).any()):
                    found.append(_Found(box, upright_turn, in_view, hit.score, geometry))
        return found

    def find(self, image: np.ndarray, expected: np.ndarray | None = None, rolls: Sequence[float] | None = None,
             copies: _Copies | None = None) -> list[_Found]:
        """Faces in image [H, W, 3] uint8 RGB at any quarter turn, one entry per face, top to bottom.
        expected: boxes [K, 4] (image pixels) where a face is expected; a weaker detection counts there, and they
        are searched again more finely, in the quarter turns of `rolls` [K] (degrees; None: all four)."""
        copies = copies if copies is not None else _Copies(image)
        frame = self._frame_geometry(image.shape)
        found = _distinct(self._search(copies, frame, ALL_TURNS, expected, "frame"))
        for k, box in enumerate(expected if expected is not None else ()):
            near = self._near_geometry(box, frame, image.shape)
            if near is None:
                continue
            turns = roll_turns(None if rolls is None else rolls[k])
            found += _distinct(self._search(copies, near, turns, expected, "near"), found)
        return sorted(found, key=lambda f: (f.box[1], f.box[0]))

    # ------------------------------------------------------------------------------------ recognition

    def _describe(self, copies: _Copies, face: _Found) -> np.ndarray:
        """dlib's descriptor [128] of the face in its upright view of an audited copy."""
        with self._timing("describe"):
            view = np.ascontiguousarray(np.rot90(copies.rgb(face.geometry), face.turns))
            return self.analyzer.measure(view, face.in_view).descriptor

    def _distance(self, source: _Copies, output: _Copies, face: _Found, frame: int, track: int | None,
                  memory: SourceFaces | None) -> float:
        """dlib distance between the output's face and the source's at the same place (per track through memory)."""
        if memory is None or track is None:
            source_descriptor = self._describe(source, face)
        else:
            source_descriptor = memory.descriptor((track, face.turns), face.box, frame, lambda: self._describe(source, face))
        return float(np.linalg.norm(source_descriptor - self._describe(output, face)))

    def check(self, index: int, source: np.ndarray, output: np.ndarray, replaced: np.ndarray | None = None,
              expected: np.ndarray | None = None, *, tracks: Sequence[int] | None = None,
              rolls: Sequence[float] | None = None, memory: SourceFaces | None = None) -> FrameAudit:
        """Audit one output frame [H, W, 3] uint8 against its source frame (same size and orientation).

        replaced: boxes [K, 4] (frame pixels) of the faces the pipeline replaced; None for an output made elsewhere,
        where every face found is judged by the recogniser alone. expected: boxes where the source is known to hold
        a face (default: `replaced`). tracks [K] and rolls [K] (degrees, face_roll) of the replaced faces: with
        `memory` (one per video), source descriptors are reused per track; rolls pick the turns searched closely.
        With the fail-safe on, leaks are covered in `output` in place."""
        boxes = None if replaced is None else np.asarray(replaced, np.float64).reshape(-1, 4)
        expected = boxes if expected is None else np.asarray(expected, np.float64).reshape(-1, 4)
        count = len(boxes) if boxes is not None else 0
        audit = FrameAudit(index, count if boxes is not None else len(expected) if expected is not None else None, count)
        src, out = _Copies(source), _Copies(output)
        leaks: list[_Found] = []
        for face in self.find(output, expected, rolls if expected is boxes else None, out):
            owners = np.flatnonzero(_inside(face.box, boxes)) if boxes is not None else np.zeros(0, int)
            was_replaced = boxes is None or len(owners) > 0
            distance = None
            if was_replaced:  # an unreplaced face is the source itself: nothing to measure
                track = tracks[owners[0]] if tracks is not None and len(owners) else None
                distance = self._distance(src, out, face, index, track, memory)
            leak = not was_replaced or distance < self.config.same_person_distance
            audit.faces.append(FaceCheck([round(float(v), 1) for v in face.box], 90 * face.turns, was_replaced,
                                         None if distance is None else round(distance, 4), leak))
            if leak:
                leaks.append(face)
        if self.config.fail_safe != "none" and leaks:
            audit.covered = self._cover(src, output, leaks)
        return audit

    def _cover(self, source: _Copies, output: np.ndarray, leaks: list[_Found]) -> list[Cover]:
        """Cover the leaks in `output` in place, then look again around each covered region: a face found there that
        the recogniser matches to the source is blacked out (measured only where a face is found, as above)."""
        method = self.config.fail_safe
        covers = []
        for face in leaks:
            region = head_region(face.box, self.config.head_scale, output.shape)
            with self._timing("cover"):
                cover_region(output, region, method, self.config)
            covers.append(Cover([int(v) for v in region], method, None))
        boxes = np.array([c.box for c in covers], np.float64)
        covered = _Copies(output)
        for cover in covers:
            around = self._around(np.array(cover.box), output.shape)
            for face in _distinct(self._search(covered, around, ALL_TURNS, boxes, "after cover")):
                if not _inside(face.box, np.array([cover.box], np.float64))[0]:
                    continue
                distance = float(np.linalg.norm(self._describe(source, face) - self._describe(covered, face)))
                cover.distance_after = round(min(distance, cover.distance_after or np.inf), 4)
                if distance < self.config.same_person_distance and method != "black":
                    cover_region(output, np.array(cover.box), "black", self.config)
                    cover.method = f"{method}+black"
        return covers


def _distinct(found: list[_Found], kept_before: Sequence[_Found] = ()) -> list[_Found]:
    """One entry per face: a face near 45 degrees can show in two turns (keep the more confident), and a face
    already in `kept_before` is not found again."""
    if not found:
        return []
    before = list(kept_before)
    same = same_face(np.stack([f.box for f in before + found]), 0.3)
    kept: list[int] = list(range(len(before)))
    for i in np.argsort([-f.score for f in found], kind="stable"):
        i = len(before) + int(i)
        if not any(same[i, k] for k in kept):
            kept.append(i)
    return [found[i - len(before)] for i in kept[len(before):]]


def head_region(box: np.ndarray, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    """The square around a face box (side `scale` x its longer side, same centre), clipped to the image;
    [x0, y0, x1, y1] int pixels. Centred, so it covers the head whichever way the face is rolled."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half = max(x1 - x0, y1 - y0) * scale / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    height, width = shape[:2]
    return np.array([max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half))),
                     min(width, int(np.ceil(cx + half))), min(height, int(np.ceil(cy + half)))])


def cover_region(image: np.ndarray, region: np.ndarray, method: str, config: AuditConfig = AuditConfig()) -> None:
    """Cover image[y0:y1, x0:x1] in place: `blur` (Gaussian, sigma = blur_sigma x the region's side), `pixelate`
    (pixel_blocks blocks across), or `black`. image: [H, W, 3] uint8."""
    x0, y0, x1, y1 = (int(v) for v in region)
    if x1 <= x0 or y1 <= y0:
        return
    roi = image[y0:y1, x0:x1]
    side = max(x1 - x0, y1 - y0)
    if method == "blur":
        roi[:] = cv2.GaussianBlur(roi, (0, 0), sigmaX=config.blur_sigma * side, borderType=cv2.BORDER_REPLICATE)
    elif method == "pixelate":
        blocks = max(1, config.pixel_blocks)
        small = cv2.resize(roi, (max(1, round(blocks * (x1 - x0) / side)), max(1, round(blocks * (y1 - y0) / side))),
                           interpolation=cv2.INTER_AREA)
        roi[:] = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
    elif method == "black":
        roi[:] = 0
    else:
        raise ValueError(f"unknown cover method {method!r}")


class AuditLog:
    """OUTPUT.audit.json, written as the frames go (memory does not grow with the video) and renamed into place
    when closed without error (deid.atomic). Use as a context manager."""

    def __init__(self, path: Path, auditor: FaceAuditor, source: Path, frame_size: tuple[int, int]):
        """path: the audit file (`audit_path(output)`); frame_size: (width, height) of the frames audited."""
        self.path = Path(path)
        self.auditor = auditor
        self.totals = AuditTotals()
        self.memory = SourceFaces(auditor.config.refresh_shift)  # this video's source descriptors, per track
        self.header = {"source": str(source), "output": str(self.path.name[: -len(".audit.json")]),
                       "fail_safe": auditor.config.fail_safe,
                       "smallest_face_px": round(auditor.config.smallest_face(frame_size), 1),
                       "networks": auditor.identity}

    def __enter__(self) -> "AuditLog":
        self._context = self._file = None
        return self

    def _open(self) -> None:
        """The temporary file is made at the first frame, so an output that cannot be written fails on its own
        name first."""
        context = atomic_output(self.path, overwrite=True)  # a by-product of the output, like its preview
        tmp = context.__enter__()
        try:
            file = tmp.open("w")
            header = json.dumps(self.header, indent=1, default=str)
            file.write(header[:-2] + ',\n "frames": [\n')  # the header object, left open for the frames
        except BaseException:
            context.__exit__(*sys.exc_info())  # removes the temporary file
            raise
        self._context, self._file = context, file

    def check(self, index: int, source: np.ndarray, output: np.ndarray, replaced: list[np.ndarray] | np.ndarray,
              tracks: Sequence[int] | None = None, rolls: Sequence[float] | None = None) -> FrameAudit:
        """Audit (and, with the fail-safe, cover in place) one output frame of the pipeline; record it.
        replaced: the boxes [4] (frame pixels) of the faces the pipeline replaced in it; tracks, rolls: theirs
        (see FaceAuditor.check)."""
        audit = self.auditor.check(index, source, output, np.asarray(replaced, np.float64).reshape(-1, 4),
                                   tracks=tracks, rolls=rolls, memory=self.memory)
        self.add(audit)
        return audit

    def add(self, audit: FrameAudit) -> None:
        first = self._file is None
        if first:
            self._open()
        self.totals.add(audit)
        self._file.write(("" if first else ",\n") + json.dumps(audit.record(), allow_nan=False))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is None:
            if exc_type is not None:
                return
            self._open()  # no frame at all: still a file that says so
        try:
            if exc_type is None:
                self._file.write(f'\n ],\n "totals": {json.dumps(self.totals.record())}\n}}\n')
            self._file.close()
        finally:
            self._context.__exit__(exc_type, exc, tb)


def audit_path(target: Path) -> Path:
    """Where an output's audit goes: OUTPUT.audit.json (the full name, so a.png and a.mp4 keep separate audits)."""
    return target.with_name(f"{target.name}.audit.json")
