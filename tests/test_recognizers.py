"""dlib's two alignments: the audit describes faces with the 5-point shape predictor (dlib's pairing for its
recogniser, small enough to travel) and never opens the 68-point one; evaluation keeps the 68 landmarks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from deid.errors import DeidError
from deid.evaluation import recognizers
from deid.evaluation.audit import FaceAuditor
from deid.evaluation.recognizers import DLIB_SAME_PERSON_DISTANCE, DlibFaceAnalyzer
from deid.faces.detection import FaceDetector

FIVE_POINT_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNIZER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
IBUG_OF_FIVE_POINTS = [45, 42, 36, 39, 33]  # the iBUG indices of dlib's 5 points, in their order


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    image = skimage.data.astronaut()
    return image, FaceDetector()([image])[0].boxes[0]


@pytest.fixture
def without_the_68_point_file(tmp_path, monkeypatch):
    """A face_recognition_models whose 68-point predictor is missing (as in the folder that travels to a GPU
    machine); the shape predictors' cache is emptied around the test, so each is loaded again from its file."""
    import face_recognition_models

    monkeypatch.setattr(face_recognition_models, "pose_predictor_model_location", lambda: str(tmp_path / "missing.dat"))
    recognizers._shape_predictor.cache_clear()
    yield tmp_path / "missing.dat"
    monkeypatch.undo()
    recognizers._shape_predictor.cache_clear()


def test_the_audit_opens_the_five_point_predictor_and_not_the_68_point_one(without_the_68_point_file, astronaut):
    image, box = astronaut
    auditor = FaceAuditor()
    identity = auditor.identity  # what every OUTPUT.audit.json records
    assert identity["landmarks"] == "dlib shape_predictor_5_face_landmarks"
    assert identity["recognizer"] == "dlib_face_recognition_resnet_model_v1"
    assert sorted(identity["files"]) == [RECOGNIZER_FILE, FIVE_POINT_FILE]
    assert all(len(digest) == 64 and int(digest, 16) for digest in identity["files"].values())  # sha256 hex
    assert identity["same_person_distance"] == DLIB_SAME_PERSON_DISTANCE == 0.6
    face = auditor.analyzer.measure(image, box)
    assert face.landmarks.shape == (5, 2) and face.descriptor.shape == (128,)
    # evaluation needs the 68-point file, and says which one is missing and how to get it back
    missing = re.escape(str(without_the_68_point_file))
    with pytest.raises(DeidError, match=f"{missing}: dlib model file missing.*Reinstall"):
        DlibFaceAnalyzer(landmarks=68)


def test_evaluation_gets_68_landmarks_where_the_audit_gets_5_at_the_same_places(astronaut):
    image, box = astronaut
    five, sixty_eight = DlibFaceAnalyzer(landmarks=5).measure(image, box), DlibFaceAnalyzer().measure(image, box)
    assert five.landmarks.shape == (5, 2) and sixty_eight.landmarks.shape == (68, 2)
    assert DlibFaceAnalyzer().identity["landmarks"] == "dlib shape_predictor_68_face_landmarks"
    # eye corners and the base of the nose, on a face about 90 pixels wide: where the 68-point predictor puts them
    assert np.abs(five.landmarks - sixty_eight.landmarks[IBUG_OF_FIVE_POINTS]).max() <= 3
    # one recogniser: the same person under either alignment (0.15 apart measured)
    assert np.linalg.norm(five.descriptor - sixty_eight.descriptor) < DLIB_SAME_PERSON_DISTANCE / 2


def test_the_alignment_is_5_or_68_points():
    with pytest.raises(ValueError, match=r"landmarks must be one of \[5, 68\], not 6"):
        DlibFaceAnalyzer(landmarks=6)
