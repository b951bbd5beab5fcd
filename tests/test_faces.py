"""Face stages on real faces: load, detect (MTCNN), align (FFHQ crop), track + smooth (carphone), paste back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from deid.errors import MediaError, NoFaceError
from deid.faces.alignment import align_photo, align_photo_file, crop_box, ffhq_affine, warp_crop
from deid.faces.detection import DetectConfig, Detections, FaceDetector
from deid.faces.orientation import RollRobustDetector, view_affine
from deid.faces.paste import face_mask, match_colour, paste_head
from deid.faces.tracking import FaceTracker, TrackConfig, track
from deid.media.images import load_image, to_tensor, to_uint8
from deid.media.video import read_frames


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def test_held_views_take_few_sizes_each_at_least_as_large_as_its_faces_need():
    """A held view's scale is the first rung of an eighth-octave ladder at or above what its smallest face needs:
    every face keeps the resolution it needs, and the views take 9 sizes, not one per face size (each new image
    size leaves buffers of its own size in the heap)."""
    config = DetectConfig()
    roll = RollRobustDetector(FaceDetector(config))
    size = (1280, 720)
    scales = {}
    for side in np.linspace(5, 900, 2000):
        for angle in (45, 90):
            _, view = view_affine(size, angle)
            need = 2 * config.min_face_size / (side * min(1.0, config.max_side / max(view)))
            scale = roll.scale_for(side, angle, size)
            assert min(max(need, 0.5), 1.0) <= scale + 1e-9 <= max(need * 2 ** (1 / 8), 0.5) + 1e-9
            scales.setdefault(angle, set()).add(round(scale, 9))
    ladder = {round(2 ** (-k / 8), 9) for k in range(9)}  # 0.5 ... 1.0
    assert scales[45] == scales[90] == ladder


@pytest.fixture(scope="session")
def carphone_detections(carphone):
    """(frames [120, 144, 176, 3] uint8, detections per frame) of the whole carphone clip."""
    frames = np.stack([f.image for f in read_frames(carphone)])
    return frames, FaceDetector()(frames)


# ------------------------------------------------------------------------------------------- load

def test_load_image_roundtrip(astronaut_png, astronaut):
    image = load_image(astronaut_png)
    assert image.dtype == np.uint8 and image.shape == (512, 512, 3)
    np.testing.assert_array_equal(image, astronaut)


def test_load_image_errors(tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    with pytest.raises(MediaError, match="not a readable image"):
        load_image(junk)


# ------------------------------------------------------------------------------------------- detect


def test_detects_astronaut_with_plausible_landmarks(astronaut):
    (found,) = FaceDetector()([astronaut])
    assert len(found) == 1 and found.scores[0] > 0.99
    x0, y0, x1, y1 = found.boxes[0]
    lm = found.landmarks[0]
    assert np.all((lm[:, 0] > x0) & (lm[:, 0] < x1) & (lm[:, 1] > y0) & (lm[:, 1] < y1))
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # left eye/mouth corner left of the right ones
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes above nose above mouth


def test_large_images_are_detected_downscaled(astronaut):
    (small,) = FaceDetector()([astronaut])
    big = cv2.resize(astronaut, (1536, 1536), interpolation=cv2.INTER_CUBIC)
    (found,) = FaceDetector(DetectConfig(max_side=512))([big])
    assert len(found) == 1
    np.testing.assert_allclose(found.landmarks[0], small.landmarks[0] * 3, atol=6)


def test_no_face_detects_nothing(no_face_png):
    assert len(FaceDetector()([load_image(no_face_png)])[0]) == 0


# ------------------------------------------------------------------------------------------- align


def test_ffhq_affine_by_hand():
    # Upright face: eyes 20 px apart, mouth 20 px below the eyes.
    lm = np.array([[40, 50], [60, 50], [50, 60], [42, 70], [58, 70]], np.float64)
    # centre = eye midpoint + 0.1 * eye->mouth = (50, 52); half side = max(2*20, 1.8*20) = 40 -> crop (10, 12)..(90, 92)
    a = ffhq_affine(lm, 160)
    np.testing.assert_allclose(a, [[2, 0, -20], [0, 2, -24]], atol=1e-9)
    np.testing.assert_allclose(crop_box(a, 160), [50, 52, 80, 0], atol=1e-9)


def test_ffhq_affine_follows_rotation_and_scale():
    lm = np.array([[40, 50], [60, 50], [50, 60], [42, 70], [58, 70]], np.float64)
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * 1.5
    moved = lm @ rot.T + [100, -30]
    a, b = ffhq_affine(lm, 64), ffhq_affine(moved, 64)
    # Every landmark lands at the same crop position whatever the face's position, size and roll.
    to_crop = lambda m, p: p @ m[:, :2].T + m[:, 2]  # noqa: E731
    np.testing.assert_allclose(to_crop(a, lm), to_crop(b, moved), atol=1e-9)


def test_align_photo_astronaut(astronaut):
    crop = align_photo(astronaut, 128).tensor
    assert crop.shape == (3, 128, 128) and crop.dtype == torch.float32
    assert -1.0 <= crop.min() and crop.max() <= 1.0 and crop.std() > 0.2
    # The aligned face's eyes sit level and symmetric about the vertical centre line.
    (found,) = FaceDetector()([to_uint8(crop)])
    eyes = found.landmarks[found.largest()][:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 3
    assert abs((eyes[0, 0] + eyes[1, 0]) / 2 - 64) < 4
    assert 0.2 * 128 < eyes[1, 0] - eyes[0, 0] < 0.35 * 128  # FFHQ: eye distance about a quarter of the side


def test_align_photo_without_face(no_face_png):
    with pytest.raises(NoFaceError, match="no face found"):
        align_photo(load_image(no_face_png), 64)
    with pytest.raises(NoFaceError, match="gradient.png"):
        align_photo_file(no_face_png, 64)


def test_tensor_conversions_roundtrip(astronaut):
    t = to_tensor(astronaut[:64, :64])
    assert t.shape == (3, 64, 64) and float(t.min()) >= -1 and float(t.max()) <= 1
    np.testing.assert_array_equal(to_uint8(t), astronaut[:64, :64])


# ------------------------------------------------------------------------------------------- track


def _dets(*faces):
    """Detections from (x, y, side) squares with landmarks placed inside them."""
    if not faces:
        return Detections.empty()
    boxes = np.array([[x, y, x + s, y + s] for x, y, s in faces], np.float32)
    unit = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32)
    lms = np.stack([np.array([x, y]) + unit * s for x, y, s in faces]).astype(np.float32)
    return Detections(boxes, np.ones(len(faces), np.float32), lms)


def test_tracker_ids_gap_filling_and_order():
    config = TrackConfig(max_gap=3, smooth_radius=2)
    frames = []
    for t in range(20):
        faces = [(10 + t, 10, 40)]  # person A, moving right
        if not 8 <= t < 11:  # person B missed for three frames
            faces.append((200, 50 + t, 50))
        if t == 15:  # a one-off far away
            faces.append((400, 400, 30))
        frames.append((t, _dets(*faces)))
    out = list(track(iter(frames), config))
    assert [payload for payload, _ in out] == list(range(20))
    ids = {t: {f.track_id: f for f in faces} for t, faces in out}
    a_id = next(f.track_id for f in out[0][1] if f.box[0] < 100)
    b_id = next(f.track_id for f in out[0][1] if f.box[0] > 100)
    assert all(a_id in ids[t] and b_id in ids[t] for t in range(20))  # B's gap filled, ids kept
    assert [ids[t][b_id].filled for t in range(7, 12)] == [False, True, True, True, False]
    np.testing.assert_allclose(ids[9][b_id].box, [200, 59, 250, 109], atol=1e-4)  # linear fill
    assert len(ids[15]) == 3 and len({f.track_id for f in ids[15].values()}) == 3


def test_tracker_gap_too_long_is_left_empty():
    frames = [(t, _dets((10, 10, 40)) if t < 3 or t > 10 else _dets()) for t in range(14)]
    out = list(track(iter(frames), TrackConfig(max_gap=3)))
    assert [len(faces) for _, faces in out] == [1, 1, 1] + [0] * 8 + [1, 1, 1]
    assert out[0][1][0].track_id != out[-1][1][0].track_id


def test_tracker_memory_is_bounded():
    tracker = FaceTracker(TrackConfig(max_gap=4, smooth_radius=3))
    for t in range(200):
        tracker.push(t, _dets((10, 10, 40)))
        assert len(tracker.pending) <= 7 and len(tracker.history) <= 4


@pytest.mark.slow
def test_carphone_track_is_stable_and_smoothing_reduces_jitter(carphone_detections):
    frames, detections = carphone_detections
    assert sum(len(d) for d in detections) >= 115  # MTCNN finds the face in (nearly) every frame at 176x144
    out = list(track(iter(enumerate(detections)), TrackConfig()))
    assert [i for i, _ in out] == list(range(120))
    assert all(len(faces) == 1 and faces[0].track_id == 0 for _, faces in out)

    def jitter(landmarks):
        boxes = np.stack([crop_box(ffhq_affine(lm, 256), 256)[:3] for lm in landmarks])
        return float(np.abs(np.diff(boxes, axis=0)).mean())

    raw = jitter([d.landmarks[0] for d in detections if len(d)])
    smooth = jitter([faces[0].landmarks for _, faces in out])
    assert smooth < 0.75 * raw


# ------------------------------------------------------------------------------------------- paste


def test_paste_back_own_crop_is_nearly_identity(carphone_detections):
    frames, detections = carphone_detections
    frame = frames[10].copy()
    affine = ffhq_affine(detections[10].landmarks[0], 128)
    crop = warp_crop(frame, affine, 128)
    out = paste_head(frame.copy(), crop, affine, original=crop)
    assert np.abs(out.astype(int) - frame).mean() < 1.0


def test_paste_changes_face_only(carphone_detections):
    frames, detections = carphone_detections
    frame = frames[10].copy()
    affine = ffhq_affine(detections[10].landmarks[0], 64)
    crop = warp_crop(frame, affine, 64)
    head = np.full_like(crop, 255)  # a white head: colour matching pulls it to the face's statistics
    out = paste_head(frame.copy(), head, affine, original=crop)
    x0, y0, x1, y1 = detections[10].boxes[0].astype(int)
    inner = (slice(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4))
    assert np.abs(out[inner].astype(int) - frame[inner]).mean() > 10
    cx, cy, side, _ = crop_box(affine, 64)
    far = np.ones(frame.shape[:2], bool)
    far[max(0, int(cy - side)):int(cy + side), max(0, int(cx - side)):int(cx + side)] = False
    np.testing.assert_array_equal(out[far], frame[far])


def test_colour_match_moves_statistics(astronaut):
    rng = np.random.default_rng(0)
    reference = astronaut[100:164, 200:264]
    generated = rng.integers(0, 255, reference.shape, dtype=np.uint8)
    weight = face_mask(64)
    matched = match_colour(generated, reference, weight)
    lab = lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2LAB).astype(np.float32)  # noqa: E731
    w = weight[..., None] / weight.sum()
    mean = lambda im: (lab(im) * w).sum((0, 1))  # noqa: E731
    assert np.abs(mean(matched) - mean(reference)).max() < 4
    assert np.abs(mean(generated) - mean(reference)).max() > 10
