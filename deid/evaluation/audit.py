"""The privacy audit: is anyone still recognisable in an output frame? And the fail-safe that covers who is.

The audit looks with networks that took no part in making the output, so it is not blind where the pipeline was:

- detection: dlib's HOG + linear SVM frontal face detector (hand-made gradient features, a failure mode unlike the
  MTCNN cascade that chose which faces to replace), on all four quarter turns of the frame, because like every
  frontal detector it sees faces only within about 20 degrees of upright, and rolled heads are exactly where the
  pipeline's own detector is weakest;
- recognition: dlib's ResNet descriptor (trained on other data than facenet's VGGFace2 network, the identity
  encoder the generator was steered with), with dlib's own same-person threshold, distance < 0.6.

A face the audit finds in the output frame is a leak when it was not replaced (its centre lies in no replaced
face's box: a missed detection, a face the tracker dropped, a face too small for the model), or when it was
replaced and its descriptor is still within 0.6 of the source frame's descriptor at the same place. Only faces the
audit detects are measured: a recogniser applied to a region without a face gives meaningless distances.

The fail-safe covers each leak before the frame is written (`blur`, `pixelate` or `black`) over the face's box grown
to a square `head_scale` times its longer side (the head, whichever way it is rolled), then measures the covered
face again and blacks it out if the recogniser still matches it. Blur and pixelate strengths are fractions of the
covered square: measured on carphone and the astronaut, the default blur takes every dlib distance to the source
from 0 to at least 0.7 (tests/test_audit.py checks it).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from deid.atomic import atomic_output
from deid.faces.orientation import same_face
from deid.evaluation.recognizers import DLIB_SAME_PERSON_DISTANCE, DlibFaceAnalyzer, dlib_module

FAIL_SAFES = ("blur", "pixelate", "black", "none")
HOG_WINDOW = 80  # pixels: the side of the face dlib's frontal HOG detector is trained on (smaller faces are missed)


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

    def __post_init__(self):
        if self.fail_safe not in FAIL_SAFES:
            raise ValueError(f"fail_safe must be one of {FAIL_SAFES}, not {self.fail_safe!r}")

    def scale(self, size: tuple[int, int]) -> float:
        """The factor a frame of size (width, height) is resized by for the audit."""
        return min(HOG_WINDOW / self.min_face, self.max_side / max(size))

    def smallest_face(self, size: tuple[int, int]) -> float:
        """The smallest face side (frame pixels) the audit can see in a frame of this size."""
        return HOG_WINDOW / self.scale(size)


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

    def record(self) -> dict:
        return {"frame": self.frame, "source_faces": self.source_faces, "replaced": self.replaced,
                "faces": [asdict(f) for f in self.faces], "leaks": len(self.leaks),
                "covered": [asdict(c) for c in self.covered]}


@dataclass
class AuditTotals:
    frames: int = 0
    frames_with_faces: int = 0  # output frames in which the audit found a face
    faces: int = 0
    leaks: int = 0  # faces
    leaked_frames: int = 0  # frames with at least one leak, before the fail-safe
    covered_frames: int = 0
    residual_leaked_frames: int = 0  # frames written with a leak left in them

    def add(self, audit: FrameAudit) -> None:
        self.frames += 1
        self.frames_with_faces += bool(audit.faces)
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


@functools.lru_cache(maxsize=1)
def _hog_detector():
    return dlib_module().get_frontal_face_detector()


@dataclass
class _Found:
    box: np.ndarray  # [4] frame pixels
    turns: int  # quarter turns (counter-clockwise) of the view it was found in
    in_view: np.ndarray  # [4] the box in that view of the audited copy
    score: float


class FaceAuditor:
    """Checks output frames against their source frames; with a fail-safe, covers what leaks. Thread-safe."""

    def __init__(self, config: AuditConfig = AuditConfig()):
        self.config = config
        self.analyzer = DlibFaceAnalyzer()
        self.hog = _hog_detector()
        self._lock = threading.Lock()

    @property
    def identity(self) -> dict:
        """The networks and settings, for the record."""
        return {"detector": "dlib HOG frontal face detector, 4 quarter turns", **self.analyzer.identity,
                "config": asdict(self.config)}

    def _copy(self, image: np.ndarray) -> np.ndarray:
        """The audited copy of a frame: scaled so the smallest face looked for fills HOG's window (within max_side)."""
        height, width = image.shape[:2]
        scale = self.config.scale((width, height))
        if scale == 1:
            return image
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)

    def find(self, image: np.ndarray, expected: np.ndarray | None = None) -> list[_Found]:
        """Faces in image [H, W, 3] uint8 RGB at any quarter turn, one entry per face, top to bottom.
        expected: boxes [K, 4] (image pixels) where a face is expected; a weaker detection counts there."""
        height, width = image.shape[:2]
        small = self._copy(image)
        scale = small.shape[1] / width
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        found = []
        for turns in range(4):
            view = np.ascontiguousarray(np.rot90(gray, turns))
            with self._lock:
                rects, scores, _ = self.hog.run(view, 0, min(self.config.hog_threshold, self.config.expected_threshold))
            for rect, score in zip(rects, scores):
                in_view = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], np.float64)
                box = _unturn_box(in_view, turns, (small.shape[1], small.shape[0])) / scale
                if score >= self.config.hog_threshold or (score >= self.config.expected_threshold and _inside(box, expected).any()):
                    found.append(_Found(box, turns, in_view, float(score)))
        if not found:
            return []
        # a face near 45 degrees can show in two turns: keep the more confident
        same = same_face(np.stack([f.box for f in found]), 0.3)
        kept: list[int] = []
        for i in np.argsort([-f.score for f in found], kind="stable"):
            if not any(same[i, k] for k in kept):
                kept.append(int(i))
        return sorted((found[i] for i in kept), key=lambda f: (f.box[1], f.box[0]))

    def _describe(self, small: np.ndarray, face: _Found) -> np.ndarray:
        """dlib's descriptor [128] of the face in its upright view of an audited copy."""
        return self.analyzer.measure(np.ascontiguousarray(np.rot90(small, face.turns)), face.in_view).descriptor

    def check(self, index: int, source: np.ndarray, output: np.ndarray, replaced: np.ndarray | None = None,
              expected: np.ndarray | None = None) -> FrameAudit:
        """Audit one output frame [H, W, 3] uint8 against its source frame (same size and orientation).

        replaced: boxes [K, 4] (frame pixels) of the faces the pipeline replaced; None for an output made elsewhere,
        where every face found is judged by the recogniser alone. expected: boxes where the source is known to hold
        a face (default: `replaced`). With the fail-safe on, leaks are covered in `output` in place."""
        boxes = None if replaced is None else np.asarray(replaced, np.float64).reshape(-1, 4)
        expected = boxes if expected is None else np.asarray(expected, np.float64).reshape(-1, 4)
        count = len(boxes) if boxes is not None else 0
        audit = FrameAudit(index, count if boxes is not None else len(expected) if expected is not None else None, count)
        small_out, small_src = self._copy(output), None
        leaks: list[_Found] = []
        for face in self.find(output, expected):
            was_replaced = boxes is None or bool(_inside(face.box, boxes).any())
            distance = None
            if was_replaced:  # an unreplaced face is the source itself: nothing to measure
                small_src = self._copy(source) if small_src is None else small_src
                distance = float(np.linalg.norm(self._describe(small_src, face) - self._describe(small_out, face)))
            leak = not was_replaced or distance < self.config.same_person_distance
            audit.faces.append(FaceCheck([round(float(v), 1) for v in face.box], 90 * face.turns, was_replaced,
                                         None if distance is None else round(distance, 4), leak))
            if leak:
                leaks.append(face)
        if self.config.fail_safe != "none" and leaks:
            audit.covered = self._cover(source, small_src, output, leaks)
        return audit

    def _cover(self, source: np.ndarray, small_src: np.ndarray | None, output: np.ndarray,
               leaks: list[_Found]) -> list[Cover]:
        """Cover the leaks in `output` in place, then look again: a face still found in a covered region that the
        recogniser matches to the source is blacked out (measured only where a face is found, as above)."""
        method = self.config.fail_safe
        covers = []
        for face in leaks:
            region = head_region(face.box, self.config.head_scale, output.shape)
            cover_region(output, region, method, self.config)
            covers.append(Cover([int(v) for v in region], method, None))
        small_out = self._copy(output)
        for face in self.find(output, np.array([c.box for c in covers], np.float64)):
            for cover in covers:
                if not _inside(face.box, np.array([cover.box], np.float64))[0]:
                    continue
                small_src = self._copy(source) if small_src is None else small_src
                distance = float(np.linalg.norm(self._describe(small_src, face) - self._describe(small_out, face)))
                cover.distance_after = round(min(distance, cover.distance_after or np.inf), 4)
                if distance < self.config.same_person_distance and method != "black":
                    cover_region(output, np.array(cover.box), "black", self.config)
                    cover.method = f"{method}+black"
        return covers


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

    def check(self, index: int, source: np.ndarray, output: np.ndarray, replaced: list[np.ndarray] | np.ndarray) -> FrameAudit:
        """Audit (and, with the fail-safe, cover in place) one output frame of the pipeline; record it.
        replaced: the boxes [4] (frame pixels) of the faces the pipeline replaced in it."""
        audit = self.auditor.check(index, source, output, np.asarray(replaced, np.float64).reshape(-1, 4))
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
