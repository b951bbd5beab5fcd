"""`deid anonymize` end to end on real faces with the tiny random-weight model: timing, audio, rotation, pixels, jobs."""

from __future__ import annotations

import errno
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from deid import cli
from deid.devices import Precision
from deid.errors import DeidError, MediaError, NoFaceError
from deid.evaluation.audit import audit_path
from deid.faces.detection import FaceDetector
from deid.media.images import load_image
from deid.media.video import VideoWriter, audio_duration, ffmpeg_exe, frame_times, probe, read_frames, to_display
from deid.pipelines.anonymize import AnonymizeJob, run_anonymize
from deid.pipelines.engines import HeadSynthesizer
from deid.pipelines.inputs import expand_inputs
from deid.pipelines.sharding import parse_shard, shard
from deid.weights import file_sha256
from deid.distributed import rank_device


def _anonymize(tiny_model, inputs, output, **kwargs):
    inputs = tuple(Path(p) for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs]))
    return run_anonymize(AnonymizeJob(inputs=inputs, output=Path(output), **kwargs), tiny_model)


def _face_and_far_masks(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the inner half of each detected face box, and of everything a face box's side away."""
    inner, far = np.zeros(image.shape[:2], bool), np.ones(image.shape[:2], bool)
    for x0, y0, x1, y1 in FaceDetector()([image])[0].boxes:
        w, h = x1 - x0, y1 - y0
        inner[int(y0 + h / 4):int(y1 - h / 4), int(x0 + w / 4):int(x1 - w / 4)] = True
        far[max(0, int(y0 - h)):int(y1 + h), max(0, int(x0 - w)):int(x1 + w)] = False
    return inner, far


def _covered_mask(output: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Where the audit's fail-safe covered something in an output image (per OUTPUT.audit.json): on the astronaut,
    dlib's HOG takes a patch of the suit for a face (score 0.12), which, being unreplaced, is covered."""
    mask = np.zeros(shape[:2], bool)
    for frame in json.loads(audit_path(output).read_text())["frames"]:
        for cover in frame["covered"]:
            x0, y0, x1, y1 = cover["box"]
            mask[y0:y1, x0:x1] = True
    # a patch, not the picture (the suit's flag patch, found as a 96-pixel face and covered at twice its side: 14 %)
    assert mask.mean() < 0.2
    return mask


def _assert_faces_replaced(source: Path, output: Path, rotation: int = 0, frames: int = 6):
    for a, b in list(zip(read_frames(source), read_frames(output)))[:frames]:
        src, dst = to_display(a.image, rotation), to_display(b.image, rotation)
        inner, far = _face_and_far_masks(src)
        assert inner.any() and far.any()
        diff = np.abs(src.astype(int) - dst)
        assert diff[inner].mean() > 8, "the face must change"
        assert diff[far].mean() < 3, "far from faces the frame stays (up to the codec)"


@pytest.fixture(scope="session")
def anonymized_ntsc(tmp_path_factory, ntsc_clip, tiny_model):
    out = tmp_path_factory.mktemp("anon") / "ntsc.mp4"
    (report,) = _anonymize(tiny_model, ntsc_clip, out, preview=True, save_crops=True)
    return out, report


@pytest.mark.slow
def test_video_keeps_timing_audio_and_replaces_faces(ntsc_clip, anonymized_ntsc):
    out, report = anonymized_ntsc
    src, dst = probe(ntsc_clip), probe(out)
    assert dst.frame_rate == Fraction(30000, 1001) and dst.frame_count == src.frame_count == 36
    np.testing.assert_allclose(frame_times(out), frame_times(ntsc_clip), atol=1e-6)
    assert dst.duration == pytest.approx(src.duration, abs=1e-6)
    assert (dst.width, dst.height, dst.sar) == (src.width, src.height, src.sar)
    assert len(dst.audio) == 1 and dst.audio[0].codec == "aac"
    assert audio_duration(out, dst.audio[0].index) == pytest.approx(audio_duration(ntsc_clip, src.audio[0].index), abs=1e-6)
    assert (report.frames, report.faces, report.frames_without_faces, report.persons) == (36, 36, 0, {0})
    _assert_faces_replaced(ntsc_clip, out)


@pytest.mark.slow
def test_preview_and_crops(anonymized_ntsc, tiny_model):
    out, _ = anonymized_ntsc
    preview = probe(out.with_name("ntsc.preview.mp4"))
    assert (preview.width, preview.height, preview.frame_count) == (352, 144, 36)
    crops = sorted((out.parent / "ntsc_crops").glob("*.png"))
    assert len(crops) == 72 and crops[0].name == "000000_p0_in.png"
    assert load_image(crops[0]).shape == (tiny_model.resolution, tiny_model.resolution, 3)


@pytest.mark.slow
def test_vfr_timestamps_kept(tmp_path, vfr_clip, tiny_model):
    out = tmp_path / "vfr.mp4"
    _anonymize(tiny_model, vfr_clip, out)
    np.testing.assert_allclose(frame_times(out), frame_times(vfr_clip), atol=1e-6)
    assert probe(out).duration == pytest.approx(probe(vfr_clip).duration, abs=1e-6)


@pytest.mark.slow
def test_rotated_video_detected_upright_and_rotation_kept(tmp_path, rotated_clip, tiny_model):
    out = tmp_path / "rotated.mp4"
    (report,) = _anonymize(tiny_model, rotated_clip, out)
    dst = probe(out)
    assert dst.rotation == 90 and (dst.width, dst.height) == (144, 176) and dst.frame_count == 36
    assert report.faces >= 34  # MTCNN sees the face only in the upright view
    _assert_faces_replaced(rotated_clip, out, rotation=90, frames=3)


@pytest.mark.slow
def test_odd_size_and_two_audio_streams(tmp_path, odd_clip, two_audio_clip, tiny_model):
    odd = tmp_path / "odd.mp4"
    _anonymize(tiny_model, odd_clip, odd)
    assert (probe(odd).width, probe(odd).height, probe(odd).frame_count) == (175, 143, 36)
    two = tmp_path / "two.mkv"
    _anonymize(tiny_model, two_audio_clip, two)
    assert [a.sample_rate for a in probe(two).audio] == [44100, 22050]


@pytest.fixture
def identity_spy(monkeypatch):
    """The identity codes the synthesizer is given, per call: a list of [N, 512] tensors."""
    calls = []
    original = HeadSynthesizer.__call__

    def spy(self, crops, identities):
        calls.append(identities.clone())
        return original(self, crops, identities)

    monkeypatch.setattr(HeadSynthesizer, "__call__", spy)
    return calls


@pytest.mark.slow
def test_image_identity_and_random_identities(tmp_path, astronaut_png, tiny_model, identity_spy):
    image = load_image(astronaut_png)
    inner, far = _face_and_far_masks(image)
    outputs, codes = {}, {}
    for name, kwargs in {"target_s0": dict(identity=astronaut_png, seed=0), "target_s1": dict(identity=astronaut_png, seed=1),
                         "random_s0": dict(seed=0), "random_s1": dict(seed=1)}.items():
        _anonymize(tiny_model, astronaut_png, tmp_path / f"{name}.png", **kwargs)
        outputs[name] = load_image(tmp_path / f"{name}.png").astype(int)
        (codes[name],) = identity_spy.pop()  # the astronaut: one face
        assert np.abs(outputs[name] - image)[inner].mean() > 8
        kept = far & ~_covered_mask(tmp_path / f"{name}.png", image.shape)
        np.testing.assert_array_equal(outputs[name][kept], image[kept])  # images: no codec, untouched exactly
    np.testing.assert_array_equal(outputs["target_s0"], outputs["target_s1"])  # --identity ignores the seed
    assert torch.equal(codes["target_s0"], codes["target_s1"])
    synth = HeadSynthesizer(tiny_model)
    for seed in (0, 1):  # a random identity is the seed's person 0 of this file
        key = f"{file_sha256(astronaut_png)}/random_s{seed}.png"  # the source's content and the output's place
        torch.testing.assert_close(codes[f"random_s{seed}"], synth.random_identity(seed, 0, key))
    # Other seeds pick other people. (Compared as codes: the random-weight tiny E_id maps every image to nearly the
    # same direction, cosine ~0.9997, so the pixels of two random identities barely differ.)
    assert not torch.equal(codes["random_s0"], codes["random_s1"])
    assert not torch.equal(codes["random_s0"], codes["target_s0"])


@pytest.mark.slow
def test_random_identities_differ_across_the_files_of_a_batch_unless_shared(tmp_path, astronaut_png, tiny_model, identity_spy):
    """Track ids restart in every file; person 0 of two files must still be two people (unless asked otherwise)."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        (src / name).write_bytes(astronaut_png.read_bytes())
    _anonymize(tiny_model, src, tmp_path / "distinct", seed=3)
    first, second = (call[0] for call in identity_spy)
    assert not torch.equal(first, second)
    synth = HeadSynthesizer(tiny_model)
    torch.testing.assert_close(torch.stack([first, second]),
                               torch.stack([synth.random_identity(3, 0, f"{file_sha256(src / name)}/in/{name}") for name in ("a.png", "b.png")]))
    identity_spy.clear()
    _anonymize(tiny_model, src, tmp_path / "shared", seed=3, shared_identities=True)
    first, second = (call[0] for call in identity_spy)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, synth.random_identity(3, 0))


@pytest.mark.slow
def test_bf16_precision(tmp_path, astronaut_png, tiny_model):
    out = tmp_path / "bf16.png"
    run_anonymize(AnonymizeJob(inputs=(astronaut_png,), output=out), tiny_model, precision=Precision(torch.bfloat16, torch.bfloat16))
    image = load_image(astronaut_png)
    inner, far = _face_and_far_masks(image)
    result = load_image(out).astype(int)
    assert np.abs(result - image)[inner].mean() > 8
    kept = far & ~_covered_mask(out, image.shape)
    np.testing.assert_array_equal(result[kept], image[kept])


def test_random_identity_is_fixed_per_person_and_distinct(tiny_model):
    synth = HeadSynthesizer(tiny_model)
    a, b, a_again = synth.random_identity(0, 0), synth.random_identity(0, 1), synth.random_identity(0, 0)
    torch.testing.assert_close(a, a_again)
    assert a.shape == (512,) and float(torch.linalg.vector_norm(a)) == pytest.approx(1, abs=1e-4)
    assert not torch.equal(a, b)  # (the random-weight tiny E_id puts every image at cosine ~0.9998)


@pytest.mark.slow
def test_two_people_get_two_tracks_and_two_fixed_identities(tmp_path, carphone, tiny_model, monkeypatch):
    import ffmpeg

    used = []  # identity codes per generated head, in order
    original = HeadSynthesizer.__call__

    def spy(self, crops, identities):
        used.extend(identities.clone())
        return original(self, crops, identities)

    monkeypatch.setattr(HeadSynthesizer, "__call__", spy)

    clip = tmp_path / "two_people.mp4"
    left = ffmpeg.input(str(carphone)).video.trim(end_frame=12).setpts("PTS-STARTPTS")
    right = ffmpeg.input(str(carphone)).video.trim(start_frame=60, end_frame=72).setpts("PTS-STARTPTS").hflip()
    ffmpeg.output(ffmpeg.filter([left, right], "hstack"), str(clip), vcodec="libx264", crf=18).overwrite_output().global_args(
        "-loglevel", "error").run(cmd=ffmpeg_exe())
    (report,) = _anonymize(tiny_model, clip, tmp_path / "out.mp4", seed=7)
    assert report.persons == {0, 1} and report.faces == 24
    codes = torch.unique(torch.stack(used), dim=0)
    assert len(used) == 24 and len(codes) == 2  # one fixed code per person, all video long
    synth = HeadSynthesizer(tiny_model)
    key = f"{file_sha256(clip)}/out.mp4"
    expected = torch.stack([synth.random_identity(7, 0, key), synth.random_identity(7, 1, key)])
    torch.testing.assert_close(torch.sort(codes, dim=0).values, torch.sort(expected, dim=0).values)


@pytest.mark.slow
def test_batch_mirrors_tree_skips_existing_and_shards(tmp_path, astronaut_png, short_ntsc_clip, tiny_model):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(astronaut_png.read_bytes())
    (src / "sub" / "b.png").write_bytes(astronaut_png.read_bytes())
    (src / "sub" / "c.mp4").write_bytes(short_ntsc_clip.read_bytes())
    (src / "notes.txt").write_text("not media")
    out = tmp_path / "out"
    reports = _anonymize(tiny_model, src, out)
    expected = [out / "in" / "a.png", out / "in" / "sub" / "b.png", out / "in" / "sub" / "c.mp4"]
    assert sorted(r.target for r in reports) == expected and all(p.is_file() for p in expected)
    assert probe(expected[2]).frame_count == 12
    stamps = [p.stat().st_mtime_ns for p in expected]
    again = _anonymize(tiny_model, src, out)
    assert all(r.skipped for r in again) and [p.stat().st_mtime_ns for p in expected] == stamps
    redo = _anonymize(tiny_model, [src / "a.png"], out, overwrite=True)  # one file into a directory: out/a.png
    assert not redo[0].skipped and redo[0].target == out / "a.png" and (out / "a.png").is_file()
    (out / "in" / "sub" / "c.mp4").unlink()  # a killed run's missing output is redone, the rest skipped
    again = _anonymize(tiny_model, src, out)
    assert [r.skipped for r in sorted(again, key=lambda r: r.target)] == [True, True, False]
    # Shards split the inputs deterministically: disjoint and complete.
    tasks = expand_inputs([src], out)
    parts = [shard(tasks, k, 3) for k in range(3)]
    assert sorted(t.target for part in parts for t in part) == expected
    assert parse_shard("2/3") == (2, 3)
    with pytest.raises(DeidError, match="K/N"):
        parse_shard("3")


def test_shard_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (1, 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto") == "cuda:1" and rank_device("cpu") == "cpu"


def test_bad_inputs_leave_nothing(tmp_path, not_a_video, truncated_clip, no_face_png, ntsc_clip, tiny_model):
    with pytest.raises(MediaError, match="no such file"):
        _anonymize(tiny_model, tmp_path / "missing.mp4", tmp_path / "o1.mp4")
    with pytest.raises(MediaError, match="not a readable video"):
        _anonymize(tiny_model, not_a_video, tmp_path / "o2.mp4")
    with pytest.raises(MediaError):
        _anonymize(tiny_model, truncated_clip, tmp_path / "o3.mp4")
    with pytest.raises(NoFaceError, match="gradient.png: no face"):
        _anonymize(tiny_model, ntsc_clip, tmp_path / "o4.mp4", identity=no_face_png)
    with pytest.raises(MediaError, match="does not exist"):
        _anonymize(tiny_model, ntsc_clip, tmp_path / "missing_dir" / "o5.mp4")
    (tmp_path / "exists.mp4").write_bytes(b"keep me")
    with pytest.raises(MediaError, match="--overwrite"):
        _anonymize(tiny_model, ntsc_clip, tmp_path / "exists.mp4")
    assert (tmp_path / "exists.mp4").read_bytes() == b"keep me"
    with pytest.raises(MediaError, match="is a video, so the output must be one too"):
        _anonymize(tiny_model, ntsc_clip, tmp_path / "o6.png")
    with pytest.raises(MediaError, match="is an image, so the output must be one too"):
        _anonymize(tiny_model, no_face_png, tmp_path / "o7.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.mp4"]


@pytest.mark.slow
def test_interrupt_and_full_disk_remove_partial_output(tmp_path, ntsc_clip, tiny_model, monkeypatch):
    calls = {"n": 0}
    original = VideoWriter.write

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(VideoWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _anonymize(tiny_model, ntsc_clip, tmp_path / "out.mp4")
    assert calls["n"] == 10 and list(tmp_path.iterdir()) == []

    def disk_full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(VideoWriter, "write", disk_full)
    with pytest.raises(MediaError, match="disk is full"):
        _anonymize(tiny_model, ntsc_clip, tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_anonymize(tmp_path, short_ntsc_clip, astronaut_png, tiny_model_path, capsys):
    out = tmp_path / "cli.mp4"
    cli.main(["-q", "anonymize", str(short_ntsc_clip), "-o", str(out), "--identity", str(astronaut_png),
              "--model", str(tiny_model_path), "--device", "cpu", "--crf", "23"])
    assert probe(out).frame_count == 12
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["anonymize", str(short_ntsc_clip), "-o", str(out), "--model", str(tiny_model_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--overwrite" in err


def test_cli_shared_identities_reaches_the_job(monkeypatch, tmp_path, astronaut_png):
    from click.testing import CliRunner

    jobs = []
    monkeypatch.setattr(cli, "run_anonymize", lambda job, *a, **k: jobs.append(job))
    monkeypatch.setattr(cli, "load_model_from_options", lambda *a, **k: (None, None, None))
    for flags in ([], ["--shared-identities"]):
        result = CliRunner().invoke(cli.cli, ["anonymize", str(astronaut_png), "-o", str(tmp_path / "o.png"), *flags])
        assert result.exit_code == 0, result.output
    assert [job.shared_identities for job in jobs] == [False, True]
