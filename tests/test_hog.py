"""The audit's HOG detector pair: dlib's detector file read and written back byte for byte, the upside-down
detector finding a face turned by 180 degrees where the upright one finds it upright, and both on one pyramid."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from deid.evaluation.audit import _unturn_box
from deid.evaluation.hog import (CELL, HALF_TURN_PLANES, half_turn_weights, hog_detector, pad_to_cells, read_detector,
                                 write_detector)
from deid.media.samples import crowd_frames


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("hog") / "frontal.svm"
    hog_detector().upright.save(str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    """Gray crowd frames at twice their size (704x576, whole cells): 0-4 real faces each, 95-140 pixels."""
    frames = [image for image, _ in crowd_frames(24, fps=2, seed=3)][::3]
    return [cv2.cvtColor(cv2.resize(f, (704, 576), interpolation=cv2.INTER_LINEAR), cv2.COLOR_RGB2GRAY) for f in frames]


def test_the_detector_file_is_read_and_written_back_byte_for_byte(detector_file):
    header, weights = read_detector(detector_file)
    assert len(weights) == 5 and all(w.shape == (31 * 10 * 10 + 1,) for w in weights)  # dlib's 5 frontal sub-detectors
    assert write_detector(header, weights) == detector_file
    with pytest.raises(ValueError, match="left over"):
        read_detector(detector_file + b"\x00")


def test_a_half_turn_of_the_weights_twice_is_none():
    weights = np.random.default_rng(0).normal(size=31 * 100 + 1)
    assert sorted(HALF_TURN_PLANES) == list(range(31))
    assert np.array_equal(half_turn_weights(half_turn_weights(weights)), weights)
    once = half_turn_weights(weights)
    assert once[-1] == weights[-1]  # the bias stays
    assert once[9 * 100] == weights[0 * 100 + 99]  # sensitive bin 0 -> 9, the filter's first cell -> its last


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def test_the_upside_down_detector_finds_turned_faces_as_the_upright_one_finds_them_upright(faces):
    hog = hog_detector()
    differences = []
    for gray in faces:
        upright = hog.run(gray, 0.0, half_turn_too=False)
        turned = np.ascontiguousarray(gray[::-1, ::-1])
        hits = hog.run(turned, -0.5, half_turn_too=True)
        assert not any(h.score >= 0 and not h.half_turned for h in hits)  # no upright face in a turned frame
        for face in upright:
            same = [h for h in hits if h.half_turned and _iou(_unturn_box(h.box, 2, (704, 576)), face.box) > 0.5]
            assert same, f"a face at {face.box} (score {face.score:.2f}) not found upside down"
            differences.append(same[0].score - face.score)
    assert len(differences) >= 10
    # dlib's scores move by 0.11 on average when the image moves by one pixel; the half turn moves them less (0.07
    # here; 0.16 with the texture features left in place, and most faces are lost without the orientation shift)
    assert np.mean(np.abs(differences)) < 0.1 and np.max(np.abs(differences)) < 0.35, differences


def test_both_detectors_on_one_pyramid_find_what_each_finds_alone(faces):
    hog = hog_detector()
    scene = np.concatenate([faces[1], np.ascontiguousarray(faces[1][::-1, ::-1])], 0)  # upright above, upside down below
    both = hog.run(scene, 0.0, half_turn_too=True)
    alone = hog.run(scene, 0.0, half_turn_too=False)
    assert [h.box.tolist() for h in both if not h.half_turned] == [h.box.tolist() for h in alone]
    assert any(h.half_turned and h.box[1] >= 576 for h in both) and not any(h.half_turned and h.box[3] <= 576 for h in both)


@pytest.mark.parametrize("size", [(704, 576), (705, 577), (3, 2)])
def test_copies_are_padded_to_whole_cells_from_the_top_left(size):
    image = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), np.uint8)
    padded = pad_to_cells(image)
    assert padded.shape[0] % CELL == 0 and padded.shape[1] % CELL == 0
    assert padded.shape[0] - size[1] < CELL and padded.shape[1] - size[0] < CELL
    assert np.array_equal(padded[:size[1], :size[0]], image)
