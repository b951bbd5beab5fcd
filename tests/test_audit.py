"""No face leaves `deid anonymize` recognisable: rolled faces are found and replaced, every output is audited by
networks independent of the pipeline, and the fail-safe covers what the audit still recognises."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from deid import cli
from deid.evaluation.audit import AuditConfig, FaceAuditor, audit_path, cover_region, head_region
from deid.faces.detection import Detections, FaceDetector
from deid.faces.orientation import RollRobustDetector, face_roll, merge_views, rotate_view
from deid.media.images import load_image, save_image
from deid.media.video import read_frames
from deid.pipelines.anonymize import AnonymizeJob, run_anonymize
from deid.pipelines.engines import HeadSynthesizer
from deid.pipelines.reenact import ReenactJob, run_reenact


@functools.lru_cache(maxsize=1)
def _dlib_check():
    """dlib's own networks, set up here without deid's audit code: the independent reference of these tests.
    (HOG detector, {points: shape predictor}, recogniser): the recogniser is checked under both of dlib's
    alignments, 5 points (dlib's pairing for it, the audit's) and 68 (the evaluation's)."""
    import dlib
    import face_recognition_models as models

    shapes = {5: dlib.shape_predictor(models.pose_predictor_five_point_model_location()),
              68: dlib.shape_predictor(models.pose_predictor_model_location())}
    recognizer = dlib.face_recognition_model_v1(models.face_recognition_model_location())
    return dlib.get_frontal_face_detector(), shapes, recognizer


def _describe(image, rect) -> dict[int, np.ndarray]:
    """{points: descriptor [128]} of the face at dlib rectangle `rect` in image, aligned with each shape predictor."""
    _, shapes, recognizer = _dlib_check()
    return {points: np.array(recognizer.compute_face_descriptor(image, shape(image, rect)))
            for points, shape in shapes.items()}


def _faces(image):
    """(area, {points: descriptor [128]}) of each face dlib's HOG (with its own 2x upsampling) finds on any quarter
    turn."""
    detector = _dlib_check()[0]
    for turns in range(4):
        view = np.ascontiguousarray(np.rot90(image, turns))
        for rect in detector(view, 1):
            yield rect.area(), _describe(view, rect)


def _recognised(source: np.ndarray, outputs) -> list[bool]:
    """Per output frame: does dlib find a face there that its recogniser, under either alignment, matches (distance
    < 0.6) to the person of `source` (its largest face)? Matching the person, not the same place: an unchanged
    background patch that HOG takes for a face would otherwise match itself."""
    _, person = max(_faces(source), key=lambda f: f[0])
    return [any(np.linalg.norm(d[points] - person[points]) < 0.6 for _, d in _faces(output) for points in person)
            for output in outputs]


@pytest.fixture
def leaky(monkeypatch):
    """A head synthesizer that failed: it returns each input crop unchanged (the test double of a broken model)."""
    monkeypatch.setattr(HeadSynthesizer, "__call__", lambda self, crops, identities: np.array(crops, copy=True))


def _anonymize(tiny_model, source: Path, output: Path, **kwargs):
    (report,) = run_anonymize(AnonymizeJob(inputs=(source,), output=output, **kwargs), tiny_model)
    return report


def _frames(path: Path) -> list[np.ndarray]:
    return [frame.image for frame in read_frames(path)]


# ------------------------------------------------------------------------------------------- rolled faces


@pytest.mark.slow
@pytest.mark.parametrize("angle", [0, 45, 90, 135, 180, 250, 300])
def test_roll_robust_detector_finds_a_turned_face_with_its_landmarks(astronaut_png, angle):
    image = load_image(astronaut_png)
    upright = FaceDetector()([image])[0]
    turned, affine = rotate_view(image, angle)  # the content turned counter-clockwise by `angle`
    found = RollRobustDetector(FaceDetector())([turned])[0]
    assert len(upright) == 1 and len(found) == 1
    # the upright landmarks carried through the known turn: an independent reference of where they must be
    expected = upright.landmarks[0] @ affine[:, :2].T + affine[:, 2]
    assert np.abs(found.landmarks[0] - expected).max() < 6  # pixels, on a ~100-pixel face
    assert (face_roll(found.landmarks[0]) - face_roll(upright.landmarks[0]) + angle + 180) % 360 - 180 == pytest.approx(0, abs=6)
    centre = (found.boxes[0, :2] + found.boxes[0, 2:]) / 2
    assert np.linalg.norm(centre - expected.mean(0)) < 20


def test_a_box_that_holds_two_other_faces_is_not_a_face():
    """merge_views drops a (turned-view) detection whose box spans the centres of two other faces, and keeps a
    duplicate of one face as one face."""
    def found(boxes, scores):
        boxes = np.asarray(boxes, np.float64)
        return Detections(boxes, np.asarray(scores, np.float32), np.zeros((len(boxes), 5, 2)))

    upright = found([[10, 50, 40, 90], [60, 50, 90, 90], [110, 50, 140, 90]], [1.0, 1.0, 1.0])
    turned = found([[0, 0, 100, 120], [112, 52, 141, 91]], [0.984, 0.99])
    merged = merge_views([(0, upright), (45, turned)], 0.3)
    np.testing.assert_array_equal(merged.boxes, upright.boxes)
    assert len(merge_views([(45, turned)], 0.3)) == 2  # alone, neither box holds two others


@pytest.mark.slow
def test_rolled_video_every_face_replaced(short_rolled_clip, tiny_model, tmp_path):
    clip, angle = short_rolled_clip
    out = tmp_path / "out.mp4"
    report = _anonymize(tiny_model, clip, out)
    assert (report.frames, report.faces, report.frames_without_faces, report.persons) == (12, 12, 0, {0})
    detector = FaceDetector()
    turns = angle // 90  # np.rot90 turns counter-clockwise: this many quarter turns make the content upright again
    for source, output in list(zip(_frames(clip), _frames(out)))[::3]:
        src, dst = np.rot90(source, turns), np.rot90(output, turns)
        (x0, y0, x1, y1), = detector([np.ascontiguousarray(src)])[0].boxes.astype(int)
        inner = (slice(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4))
        assert np.abs(src[inner].astype(int) - dst[inner]).mean() > 8, "the face must change"


@pytest.mark.slow
def test_rolled_photo_and_reenact_driving_video(rolled_clip, astronaut_png, tiny_model, tmp_path):
    clip, angle = rolled_clip
    report = run_reenact(ReenactJob(astronaut_png, clip, tmp_path / "reenacted.mp4"), tiny_model)
    assert (report.frames, report.frames_without_face) == (24, 0)
    photo = tmp_path / "rolled.png"
    save_image(np.ascontiguousarray(np.rot90(load_image(astronaut_png), -angle // 90)), photo)
    report = _anonymize(tiny_model, photo, tmp_path / "rolled_out.png")
    assert (report.frames, report.faces, report.frames_without_faces) == (1, 1, 0)


@pytest.mark.slow
def test_rolled_stream_searches_few_views(rolled_clip):
    clip, angle = rolled_clip
    stream = RollRobustDetector(FaceDetector()).stream()
    frames = _frames(clip)
    found = [d for k in range(0, len(frames), 8) for d in stream(frames[k:k + 8])]
    assert [len(d) for d in found] == [1] * len(frames)
    rolls = face_roll(np.stack([d.landmarks[0] for d in found]))
    # carphone's head is rolled about -14 degrees upright; the content turned clockwise by `angle` adds it
    assert np.all(np.abs((rolls - (angle - 14) + 180) % 360 - 180) < 20)
    # sweeps (all 8 views) every 8th frame, otherwise upright + the face's own view (+ at most a neighbour)
    assert stream.searched <= 3 * 8 + (len(frames) - 3) * 3


# ------------------------------------------------------------------------------------------- audit + fail-safe


@pytest.mark.slow
def test_default_blur_defeats_the_recogniser(carphone, astronaut_png):
    """The fail-safe's strength, checked against dlib directly: every covered face is another person to it, aligned
    with 5 points as the audit measures, and with 68. Measured minima: blur 0.742 (5 points) and 0.738 (68),
    pixelate 0.698 and 0.722."""
    detector = _dlib_check()[0]
    images = [cv2.resize(f.image, (352, 288)) for f in list(read_frames(carphone))[::20]] + [load_image(astronaut_png)]
    config = AuditConfig()
    for method in ("blur", "pixelate"):
        distances = {5: [], 68: []}
        for image in images:
            rect = max(detector(image, 0), key=lambda r: r.area())
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()])
            covered = image.copy()
            cover_region(covered, head_region(box, config.head_scale, image.shape), method, config)
            before, after = _describe(image, rect), _describe(covered, rect)
            for points in distances:
                distances[points].append(np.linalg.norm(before[points] - after[points]))
        for points, measured in distances.items():
            assert len(measured) == 7 and min(measured) > 0.65, (method, points, measured)


@pytest.mark.slow
def test_leaky_model_on_rolled_video_is_caught_and_covered(short_rolled_clip, tiny_model, tmp_path, leaky):
    clip, _ = short_rolled_clip
    sources = _frames(clip)
    results = {}
    for fail_safe in ("blur", "none"):
        out = tmp_path / f"{fail_safe}.mp4"
        report = _anonymize(tiny_model, clip, out, audit=AuditConfig(fail_safe=fail_safe))
        audit = json.loads(audit_path(out).read_text())
        totals = audit["totals"]
        assert totals == report.audit.record() and audit["fail_safe"] == fail_safe
        assert totals["frames"] == 12 and totals["frames_with_faces"] >= 11  # 12 measured at both rolls
        # every face the audit finds is flagged: replaced, yet still the source person
        assert totals["leaks"] == totals["faces"] and totals["leaked_frames"] == totals["frames_with_faces"]
        faces = [face for frame in audit["frames"] for face in frame["faces"]]
        assert all(face["replaced"] and face["distance"] < 0.6 for face in faces)
        results[fail_safe] = (_recognised(sources[0], _frames(out)), totals)
    recognised, totals = results["blur"]
    assert sum(recognised) == 0
    assert totals["covered_frames"] == totals["leaked_frames"] and totals["residual_leaked_frames"] == 0
    recognised, totals = results["none"]
    assert sum(recognised) > 6  # most of the 12 frames show the source person (11 and 12 measured)
    assert totals["covered_frames"] == 0 and totals["residual_leaked_frames"] == totals["leaked_frames"] >= 11


@pytest.mark.slow
def test_leaky_model_on_a_photo(astronaut_png, tiny_model, tmp_path, leaky):
    source = load_image(astronaut_png)
    for fail_safe, expected in (("blur", False), ("none", True)):
        out = tmp_path / f"{fail_safe}.png"
        report = _anonymize(tiny_model, astronaut_png, out, audit=AuditConfig(fail_safe=fail_safe))
        audit = json.loads(audit_path(out).read_text())
        (frame,) = audit["frames"]
        face = min((f for f in frame["faces"] if f["replaced"]), key=lambda f: f["distance"])
        assert face["leak"] and face["distance"] < 0.6
        assert audit["totals"]["leaked_frames"] == 1 == report.audit.leaked_frames
        assert len(frame["covered"]) == (0 if fail_safe == "none" else frame["leaks"])
        assert _recognised(source, [load_image(out)]) == [expected]


def test_clean_output_has_no_leaks_and_no_audit_means_no_file(carphone, tiny_model, tmp_path):
    """A face replaced by something dlib does not match is no leak, and nothing is covered."""
    auditor = FaceAuditor()
    source = next(iter(read_frames(carphone))).image
    box = FaceDetector()([source])[0].boxes[0]
    output = source.copy()
    x0, y0, x1, y1 = head_region(box, 1.2, source.shape)
    output[y0:y1, x0:x1] = np.linspace(0, 255, x1 - x0, dtype=np.uint8)[None, :, None]  # a smooth ramp: no face
    audit = auditor.check(0, source, output, replaced=box[None])
    assert audit.faces == [] and audit.covered == [] and not audit.residual
    # the same frame unreplaced is a leak even though nothing was compared
    audit = auditor.check(0, source, source.copy(), replaced=np.zeros((0, 4)))
    assert [(f.replaced, f.leak, f.distance) for f in audit.faces] == [(False, True, None)]


@pytest.mark.slow
def test_cli_fail_safe_and_no_audit(astronaut_png, tiny_model_path, tmp_path):
    base = ["-q", "anonymize", str(astronaut_png), "--model", str(tiny_model_path), "--device", "cpu"]
    cli.main(base + ["-o", str(tmp_path / "a.png"), "--fail-safe", "pixelate"])
    assert json.loads((tmp_path / "a.png.audit.json").read_text())["fail_safe"] == "pixelate"
    cli.main(base + ["-o", str(tmp_path / "b.png"), "--no-audit"])
    assert (tmp_path / "b.png").is_file() and not (tmp_path / "b.png.audit.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["-o", str(tmp_path / "c.png"), "--fail-safe", "smudge"])
    assert exit_info.value.code == 2 and not (tmp_path / "c.png").exists()
