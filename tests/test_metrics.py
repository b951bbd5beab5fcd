"""Known-answer tests of the evaluation metrics on real faces (carphone, astronaut) and synthetic geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from deid.errors import WeightsError
from deid.evaluation.metrics import (
    FaceMeter,
    FeatureStats,
    FIDInception,
    compare_faces,
    cosine_similarity,
    descriptor_distance,
    frechet_distance,
    landmark_error,
    pose_error,
    psnr,
    rmse,
    square_crop,
)
from deid.evaluation.pose import (
    HeadPose,
    angle_difference,
    estimate_pose,
    euler_to_rotation,
    project_model,
    rotation_to_euler,
)
from deid.evaluation.recognizers import DLIB_SAME_PERSON_DISTANCE
from deid.faces.detection import box_iou


@pytest.fixture(scope="module")
def meter():
    return FaceMeter()


@pytest.fixture(scope="module")
def carphone_frames(carphone):
    """Frames 0, 60 and 119 of carphone: one man, different moments (head moves, mouth talks)."""
    from deid.media.video import read_frames

    return [f.image for f in read_frames(carphone) if f.index in (0, 60, 119)]


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    return skimage.data.astronaut()


# ------------------------------------------------------------------------------------------ identity


def test_dlib_says_carphone_frames_are_one_person_and_astronaut_another(meter, carphone_frames, astronaut):
    faces = [meter.measure(frame) for frame in carphone_frames]
    assert all(f is not None and f.detected for f in faces)
    for a, b in itertools.combinations(faces, 2):
        assert descriptor_distance(a.face.descriptor, b.face.descriptor) < DLIB_SAME_PERSON_DISTANCE
        assert compare_faces(a, b, 176)["same_person"]
    other = meter.measure(astronaut)
    for face in faces:
        distance = descriptor_distance(face.face.descriptor, other.face.descriptor)
        assert distance > DLIB_SAME_PERSON_DISTANCE + 0.1
        assert not compare_faces(face, other, 176)["same_person"]
        # the cosine identity metric ranks the same person above a different one
        assert cosine_similarity(faces[0].face.descriptor, face.face.descriptor) > cosine_similarity(face.face.descriptor, other.face.descriptor)


def test_dlib_analyzers_share_the_lock_of_the_models_they_share(astronaut):
    """The dlib models are cached and shared by every analyzer: one analyzer busy with them holds off the others,
    whichever alignment each uses (one recogniser, one lock)."""
    import threading

    from deid.evaluation.recognizers import DlibFaceAnalyzer

    first, second = DlibFaceAnalyzer(), DlibFaceAnalyzer(landmarks=5)
    assert first._shape is DlibFaceAnalyzer()._shape and second._shape is DlibFaceAnalyzer(landmarks=5)._shape
    assert first._recognizer is second._recognizer and first._lock is second._lock
    done = threading.Event()
    worker = threading.Thread(target=lambda: (second.measure(astronaut, np.array([180, 60, 300, 220])), done.set()))
    with first._lock:  # as if `first` were in the middle of a measurement
        worker.start()
        assert not done.wait(0.5)
    worker.join(timeout=30)
    assert done.is_set()


def test_no_face_gives_none_or_the_fallback_box(meter):
    flat = np.full((160, 160, 3), 128, np.uint8)
    assert meter.measure(flat) is None
    fallback = meter.measure(flat, fallback_box=np.array([40.0, 40.0, 120.0, 120.0]))
    assert fallback is not None and not fallback.detected
    assert fallback.face.landmarks.shape == (68, 2) and fallback.face.descriptor.shape == (128,)


# --------------------------------------------------------------------------------- expression, pose


def test_landmark_and_pose_error_zero_against_itself_large_against_its_mirror(meter, astronaut):
    face = meter.measure(astronaut)
    again = meter.measure(astronaut.copy())
    assert landmark_error(face.face.landmarks, again.face.landmarks, astronaut.shape[1]) == 0.0
    assert pose_error(face.pose, again.pose) == 0.0
    mirror = meter.measure(np.ascontiguousarray(astronaut[:, ::-1]))
    assert landmark_error(face.face.landmarks, mirror.face.landmarks, astronaut.shape[1]) > 0.05
    assert pose_error(face.pose, mirror.pose) > 5.0
    # mirroring flips the sign of yaw and roll and keeps pitch
    assert np.sign(face.pose.yaw) == -np.sign(mirror.pose.yaw)
    assert abs(face.pose.pitch - mirror.pose.pitch) < 5.0


def test_landmark_error_is_mean_point_distance_over_scale():
    a = np.random.default_rng(0).uniform(0, 100, (68, 2))
    assert landmark_error(a, a + np.array([3.0, 4.0]), 50.0) == pytest.approx(0.1)


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (30, 0, 0), (0, -20, 0), (0, 0, 25), (-35, 15, -10), (20, -25, 30)])
def test_pose_recovers_angles_of_a_projected_3d_face(yaw, pitch, roll):
    truth = HeadPose(yaw, pitch, roll, translation=(20.0, -30.0, 1500.0))
    landmarks = project_model(truth, 256, 256)
    exact = estimate_pose(landmarks, 256, 256)
    assert np.abs(angle_difference(exact.angles, truth.angles)).max() < 0.01
    # half-pixel landmark noise on a ~90 px face: still within 2 degrees
    noisy = estimate_pose(landmarks + np.random.default_rng(yaw + 100).normal(0, 0.2, landmarks.shape), 256, 256)
    assert np.abs(angle_difference(noisy.angles, truth.angles)).max() < 2.0


def test_pose_accepts_68_points_and_rejects_other_shapes():
    truth = HeadPose(10, 5, -5, translation=(0.0, 0.0, 1500.0))
    six = project_model(truth, 200, 160)
    full = np.zeros((68, 2))
    full[[30, 8, 36, 45, 48, 54]] = six
    assert np.abs(estimate_pose(full, 200, 160).angles - truth.angles).max() < 0.01
    with pytest.raises(ValueError):
        estimate_pose(np.zeros((5, 2)), 200, 160)


def test_euler_round_trip_and_wrapped_differences():
    for angles in [(10, 20, 30), (-80, 45, -170), (0, 0, 179)]:
        assert np.allclose(rotation_to_euler(euler_to_rotation(*angles)), angles, atol=1e-9)
    assert np.allclose(angle_difference([179, -179, 0], [-179, 179, 360]), [-2, 2, 0])
    assert pose_error(HeadPose(3, 4, 0), HeadPose(0, 0, 0)) == pytest.approx(5.0)


# ------------------------------------------------------------------------------------------ pixels


def test_rmse_and_psnr_known_values():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 51, np.uint8)  # 0.2 on [0, 1]
    assert rmse(a, b) == pytest.approx(0.2)
    assert psnr(a, b) == pytest.approx(20 * np.log10(5))
    assert psnr(a, a) == float("inf") and rmse(a, a) == 0.0


def test_box_iou_and_square_crop():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    assert np.allclose(iou, [[1.0, 1 / 3, 0.0]])
    image = np.zeros((100, 100, 3), np.uint8)
    image[40:60, 30:50] = 255  # a white 20x20 square
    crop = square_crop(image, np.array([30, 40, 50, 60]), 64)
    assert crop.shape == (64, 64, 3) and crop[8:56, 8:56].min() == 255  # the box fills the crop


# --------------------------------------------------------------------------------------------- FID


def _gaussian_samples(mean: np.ndarray, variances: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Samples whose sample mean and (unbiased) covariance are exactly `mean` and diag(`variances`)."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) = I exactly
    return mean + z * np.sqrt(variances)


def test_feature_stats_streamed_match_numpy():
    x = np.random.default_rng(1).normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6]
    stats = FeatureStats(6)
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    assert stats.count == 300
    assert np.allclose(stats.mean, x.mean(axis=0))
    assert np.allclose(stats.covariance, np.cov(x, rowvar=False))
    restored = FeatureStats.from_state(stats.state())
    assert np.allclose(restored.covariance, stats.covariance) and restored.count == 300


def test_frechet_distance_of_known_gaussians():
    mu1, var1 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
    mu2, var2 = np.array([1.0, 1.0, 0.0, 0.5]), np.array([4.0, 1.0, 1.0, 2.0])
    a, b = FeatureStats(4), FeatureStats(4)
    a.update(_gaussian_samples(mu1, var1, 500, 0))
    b.update(_gaussian_samples(mu2, var2, 400, 1))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_inception_random_and_file_weights_agree(tmp_path, astronaut):
    import cv2

    net = FIDInception("random", dims=64)
    crops = np.stack([cv2.resize(astronaut, (299, 299)), cv2.resize(astronaut[::-1], (299, 299)),
                      np.full((299, 299, 3), 90, np.uint8)])
    features = net.features(crops)
    assert features.shape == (3, 64) and np.isfinite(features).all()
    assert np.linalg.norm(features[0] - features[1]) > 1e-3  # different images, different features
    # the published file format is a plain state dict of the TF-FID Inception: load one written that way
    from deid.evaluation.metrics import _fid_inception_net

    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_fid_inception_net(None, seed=0).state_dict(), path)
    from_file = FIDInception(str(path), dims=64)
    assert np.allclose(from_file.features(crops), features, atol=1e-5)
    from deid.weights import file_sha256

    assert from_file.fingerprint == file_sha256(path)


@pytest.mark.parametrize("dims", [64, 768, 2048])
def test_fid_features_equal_pytorch_fid_own_extractor(dims):
    """deid builds pytorch-fid's block layout itself (pytorch-fid's class only builds around weights it downloads);
    the reference is pytorch-fid's InceptionV3, handed the same network here in the test."""
    from unittest import mock

    from pytorch_fid import inception as pf

    from deid.evaluation.metrics import _fid_inception_net

    ours = FIDInception("random", dims=dims)
    with mock.patch.object(pf, "fid_inception_v3", lambda: _fid_inception_net(None, seed=0)):
        reference = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))  # resized to 299 inside
    with torch.no_grad():
        expected = torch.nn.functional.adaptive_avg_pool2d(reference(images)[0], 1).flatten(1)
    torch.testing.assert_close(ours(images), expected, rtol=1e-5, atol=1e-5)


def test_fid_refuses_missing_weights_with_the_fix(tmp_path):
    with pytest.raises(WeightsError, match="inception-v3-fid"):
        FIDInception("inception-v3-fid")
    with pytest.raises(WeightsError):
        FIDInception(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError, match="deid weights fetch inception-v3-fid"):
        FIDInception(str(wrong))
