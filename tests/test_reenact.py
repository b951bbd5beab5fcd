"""`deid reenact` with the tiny random-weight model: size, timing, audio, paste, preview, errors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from deid import cli
from deid.errors import MediaError, NoFaceError
from deid.faces.detection import FaceDetector
from deid.faces.tracking import Face
from deid.media.images import load_image
from deid.media.video import audio_duration, ffmpeg_exe, frame_times, probe, read_frames
from deid.pipelines.reenact import ReenactJob, _MainFace, run_reenact


def _reenact(model, portrait, driving, output, **kwargs):
    return run_reenact(ReenactJob(portrait=Path(portrait), driving=Path(driving), output=Path(output), **kwargs), model)


@pytest.mark.slow
def test_heads_keep_driving_timing_and_audio(tmp_path, astronaut_png, ntsc_clip, tiny_model):
    out = tmp_path / "heads.mp4"
    report = _reenact(tiny_model, astronaut_png, ntsc_clip, out, preview=True)
    src, dst = probe(ntsc_clip), probe(out)
    size = tiny_model.resolution
    assert (dst.width, dst.height, dst.rotation) == (size, size, 0)
    assert dst.frame_rate == Fraction(30000, 1001) and dst.frame_count == 36
    np.testing.assert_allclose(frame_times(out), frame_times(ntsc_clip), atol=1e-6)
    assert len(dst.audio) == 1
    assert audio_duration(out, dst.audio[0].index) == pytest.approx(audio_duration(ntsc_clip, src.audio[0].index), abs=1e-6)
    assert (report.frames, report.frames_without_face) == (36, 0)
    preview = probe(tmp_path / "heads.preview.mp4")
    assert (preview.width, preview.height, preview.frame_count) == (2 * size, size, 36)
    # The heads follow the driving frames: they are not all the same picture.
    heads = np.stack([f.image for f in read_frames(out)]).astype(int)
    assert np.abs(heads[1:] - heads[:-1]).mean() > 0.5


@pytest.mark.slow
def test_paste_into_portrait(tmp_path, astronaut_png, ntsc_clip, tiny_model):
    out = tmp_path / "pasted.mp4"
    _reenact(tiny_model, astronaut_png, ntsc_clip, out, paste=True)
    portrait = load_image(astronaut_png)
    dst = probe(out)
    assert (dst.width, dst.height, dst.frame_count) == (512, 512, 36)
    frame = next(read_frames(out)).image.astype(int)
    x0, y0, x1, y1 = FaceDetector()([portrait])[0].boxes[0]
    w, h = x1 - x0, y1 - y0
    inner = (slice(int(y0 + h / 4), int(y1 - h / 4)), slice(int(x0 + w / 4), int(x1 - w / 4)))
    assert np.abs(frame[inner] - portrait[inner]).mean() > 8
    far = np.ones(portrait.shape[:2], bool)
    far[max(0, int(y0 - h)):int(y1 + h), max(0, int(x0 - w)):int(x1 + w)] = False
    assert np.abs(frame[far] - portrait[far]).mean() < 3


def test_main_face_follows_its_track():
    def face(tid, side):
        return Face(tid, np.array([0, 0, side, side], np.float32), np.zeros((5, 2), np.float32), False)

    pick = _MainFace()
    assert pick([face(0, 10), face(1, 30)]).track_id == 1  # the largest first
    assert pick([face(0, 50), face(1, 30)]).track_id == 1  # then the same person while it lasts
    assert pick([face(0, 50)]).track_id == 0
    assert pick([]) is None


def test_errors_leave_no_output(tmp_path, astronaut_png, no_face_png, ntsc_clip, not_a_video, tiny_model):
    with pytest.raises(NoFaceError, match="gradient.png: no face"):
        _reenact(tiny_model, no_face_png, ntsc_clip, tmp_path / "a.mp4")
    with pytest.raises(MediaError, match="not a readable video"):
        _reenact(tiny_model, astronaut_png, not_a_video, tmp_path / "b.mp4")
    with pytest.raises(MediaError, match="still image"):
        _reenact(tiny_model, astronaut_png, astronaut_png, tmp_path / "c.mp4")
    faceless = tmp_path / "testsrc.mp4"
    import ffmpeg

    ffmpeg.input("testsrc2=size=96x64:rate=10", f="lavfi", t=1).output(str(faceless), vcodec="libx264").global_args(
        "-loglevel", "error").run(cmd=ffmpeg_exe())
    with pytest.raises(MediaError, match="no face found in any frame"):
        _reenact(tiny_model, astronaut_png, faceless, tmp_path / "d.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["testsrc.mp4"]


@pytest.mark.slow
def test_cli_reenact(tmp_path, astronaut_png, ntsc_clip, tiny_model_path, capsys):
    out = tmp_path / "cli.mp4"
    cli.main(["-q", "reenact", str(astronaut_png), str(ntsc_clip), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu"])
    assert probe(out).frame_count == 36
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reenact", str(astronaut_png), str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "x.mp4"), "--model", str(tiny_model_path)])
    assert exit_info.value.code == 1
    assert "missing.mp4: no such file" in capsys.readouterr().err
