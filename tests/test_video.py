"""Video I/O: probe facts, streaming decode, encode with exact timing, rotation, audio passthrough, errors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deid.errors import MediaError
from deid.media.video import (
    EncodeOptions,
    VideoWriter,
    audio_duration,
    ffmpeg_exe,
    frame_times,
    points_to_stored,
    probe,
    read_frames,
    to_display,
)
from deid.media import video

from tests.fixtures.inputs import run_ffmpeg
from tests.fixtures.media import BFRAME_AVI_FRAMES


def _roundtrip(source, target):
    info = probe(source)
    with VideoWriter(target, info) as writer:
        for frame in read_frames(source):
            writer.write(frame.image, frame.pts, frame.duration)
    return info, probe(target)


def test_probe_carphone(carphone):
    info = probe(carphone)
    assert (info.width, info.height) == (176, 144)
    assert info.frame_rate == Fraction(30000, 1001) and info.frame_count == 120
    assert info.sar == Fraction(128, 117) and info.rotation == 0 and info.constant_rate
    assert info.duration == pytest.approx(120 * 1001 / 30000)
    assert info.audio == ()


def test_probe_clips(ntsc_clip, two_audio_clip, vfr_clip, rotated_clip, odd_clip):
    ntsc = probe(ntsc_clip)
    assert ntsc.frame_rate == Fraction(30000, 1001) and ntsc.frame_count == 36 and len(ntsc.audio) == 1
    assert len(probe(two_audio_clip).audio) == 2
    vfr = probe(vfr_clip)
    assert not vfr.constant_rate and vfr.frame_count == 36
    rotated = probe(rotated_clip)
    assert rotated.rotation == 90 and (rotated.width, rotated.height) == (144, 176) and rotated.display_size == (176, 144)
    assert (probe(odd_clip).width, probe(odd_clip).height) == (175, 143)


def test_decode_streams_every_frame(carphone):
    frames = read_frames(carphone)
    first = next(frames)
    assert first.index == 0 and first.pts == 0 and first.image.shape == (144, 176, 3) and first.image.dtype == np.uint8
    rest = [(f.index, f.pts) for f in frames]
    assert len(rest) == 119 and rest[-1] == (119, 119 * 1001)


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_display_points_map_back_to_stored(rotation):
    rng = np.random.default_rng(rotation)
    stored = rng.integers(0, 255, (7, 11, 3), dtype=np.uint8)
    view = to_display(stored, rotation)
    assert view.shape[:2] == ((11, 7) if rotation % 180 else (7, 11))
    ys, xs = np.mgrid[0 : view.shape[0], 0 : view.shape[1]]
    points = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
    back = points_to_stored(points, rotation, (11, 7)).astype(int)
    np.testing.assert_array_equal(stored[back[:, 1], back[:, 0]], view[ys.ravel(), xs.ravel()])


def test_roundtrip_keeps_ntsc_timing_and_audio(tmp_path, ntsc_clip):
    src, dst = _roundtrip(ntsc_clip, tmp_path / "out.mp4")
    assert dst.frame_rate == Fraction(30000, 1001) and dst.frame_count == src.frame_count
    assert dst.duration == pytest.approx(src.duration, abs=1e-6)
    np.testing.assert_allclose(frame_times(tmp_path / "out.mp4"), frame_times(ntsc_clip), atol=1e-6)
    assert dst.sar == src.sar
    import av

    with av.open(str(ntsc_clip)) as container:
        assert container.metadata.get("location") == "+48.8577+002.2950/"
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert "title" not in container.metadata  # only the allow-listed tags are passed on
        assert not any("location" in key for key in container.metadata)  # where it was shot is not passed on
    assert [a.codec for a in dst.audio] == ["aac"]
    assert audio_duration(tmp_path / "out.mp4", dst.audio[0].index) == pytest.approx(audio_duration(ntsc_clip, src.audio[0].index), abs=1e-6)


def test_roundtrip_keeps_vfr_timestamps(tmp_path, vfr_clip):
    src, dst = _roundtrip(vfr_clip, tmp_path / "out.mp4")
    np.testing.assert_allclose(frame_times(tmp_path / "out.mp4"), frame_times(vfr_clip), atol=1e-6)
    assert dst.duration == pytest.approx(src.duration, abs=1e-6)


def test_roundtrip_keeps_rotation_odd_size_and_two_audio_streams(tmp_path, rotated_clip, odd_clip, two_audio_clip):
    _, rotated = _roundtrip(rotated_clip, tmp_path / "rotated.mp4")
    assert rotated.rotation == 90 and (rotated.width, rotated.height) == (144, 176)
    src, odd = _roundtrip(odd_clip, tmp_path / "odd.mp4")
    assert (odd.width, odd.height) == (175, 143) and odd.frame_count == 36
    assert odd.frame_rate == Fraction(30000, 1001)  # the MKV's millisecond timestamps snap back to the exact grid
    src, two = _roundtrip(two_audio_clip, tmp_path / "two.mkv")
    assert [(a.sample_rate, a.codec) for a in two.audio] == [(44100, "aac"), (22050, "aac")]
    for a, b in zip(src.audio, two.audio):
        # Stream copy: the same packets; MKV rounds the last one's duration to its millisecond clock.
        assert _packet_sizes(tmp_path / "two.mkv", b.index) == _packet_sizes(two_audio_clip, a.index)
        assert audio_duration(tmp_path / "two.mkv", b.index) == pytest.approx(audio_duration(two_audio_clip, a.index), abs=0.01)


def _packet_sizes(path, index):
    import av

    with av.open(str(path)) as container:
        return [p.size for p in container.demux(container.streams[index]) if p.size]


def test_roundtrip_pixels_close(tmp_path, ntsc_clip):
    _roundtrip(ntsc_clip, tmp_path / "out.mp4")
    src = np.stack([f.image for f in read_frames(ntsc_clip)]).reshape(36, -1).astype(np.float32)
    dst = np.stack([f.image for f in read_frames(tmp_path / "out.mp4")]).reshape(36, -1).astype(np.float32)
    error = np.stack([np.abs(src - frame).mean(axis=1) for frame in dst], axis=1)  # [source frame, output frame]
    assert np.all(np.diag(error) < 4)
    assert np.all(np.argmin(error, axis=0) == np.arange(len(src)))  # each output frame is its own source frame


def test_audio_codec_mp4_refuses_is_reencoded(tmp_path, carphone):
    import ffmpeg

    src = tmp_path / "ulaw.mov"  # G.711 mu-law: MOV takes it, MP4 does not
    video = ffmpeg.input(str(carphone)).video.trim(end_frame=10).setpts("PTS-STARTPTS")
    audio = ffmpeg.input("sine=frequency=300:sample_rate=16000", f="lavfi", t=10 * 1001 / 30000).audio
    ffmpeg.output(video, audio, str(src), vcodec="libx264", acodec="pcm_mulaw").overwrite_output().global_args(
        "-loglevel", "error").run(cmd=ffmpeg_exe())
    _, dst = _roundtrip(src, tmp_path / "out.mp4")
    assert [a.codec for a in dst.audio] == ["aac"]
    assert audio_duration(tmp_path / "out.mp4", dst.audio[0].index) == pytest.approx(10 * 1001 / 30000, abs=0.07)


def test_bad_inputs_raise_media_error(tmp_path, not_a_video, truncated_clip, astronaut_png):
    with pytest.raises(MediaError, match="no such file"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match="not a readable video"):
        probe(not_a_video)
    with pytest.raises(MediaError, match="not a readable video|corrupt"):
        probe(truncated_clip)
    with pytest.raises(MediaError, match="still image"):
        probe(astronaut_png)


def test_ffmpeg_exe_prefers_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEID_FFMPEG", str(tmp_path / "my-ffmpeg"))
    assert ffmpeg_exe() == str(tmp_path / "my-ffmpeg")
    monkeypatch.delenv("DEID_FFMPEG")
    assert ffmpeg_exe()  # PATH or the bundled binary


@pytest.fixture(scope="module")
def tagged_clip(tmp_path_factory) -> Path:
    """A short MKV whose tags name the person (title, comment), locate them under a vendor key no deny-list
    knows, and say when (creation_time) and in what language it was shot."""
    import av

    path = tmp_path_factory.mktemp("tagged") / "tagged.mkv"
    with av.open(str(path), "w") as container:
        container.metadata.update({"title": "Alice Example at home", "comment": "filmed by Bob",
                                   "com.example.position": "+48.8577+002.2950/",
                                   "creation_time": "2024-05-01T10:00:00.000000Z", "language": "eng"})
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("keep", [False, True])
def test_container_tags_are_an_allow_list_unless_keep_metadata(tmp_path, tagged_clip, keep):
    import av

    out = tmp_path / "out.mkv"
    with VideoWriter(out, probe(tagged_clip), EncodeOptions(keep_metadata=keep)) as writer:
        for frame in read_frames(tagged_clip):
            writer.write(frame.image, frame.pts, frame.duration)
    with av.open(str(out)) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}
    assert tags["creation_time"] == "2024-05-01T10:00:00.000000Z" and tags["language"] == "eng"
    named = {"title": "Alice Example at home", "comment": "filmed by Bob", "com.example.position": "+48.8577+002.2950/"}
    if keep:
        assert all(tags.get(k) == v for k, v in named.items())
    else:
        assert not set(named) & set(tags) and "Alice" not in str(tags) and "48.8577" not in str(tags)


@pytest.fixture(scope="module")
def stream_tagged_clip(tmp_path_factory) -> Path:
    """An MKV whose streams are tagged: video "eng" titled "Alice cam", audio 1 "fra" titled "Commentary by Alice",
    audio 2 "deu"."""
    path = tmp_path_factory.mktemp("stream_tags") / "streams.mkv"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
               "-t", "0.4", "-map", "0:v", "-map", "1:a", "-map", "1:a", "-c:v", "libx264", "-c:a", "aac",
               "-metadata:s:v:0", "language=eng", "-metadata:s:v:0", "title=Alice cam", "-metadata:s:a:0", "language=fra",
               "-metadata:s:a:0", "title=Commentary by Alice", "-metadata:s:a:1", "language=deu", str(path))
    return path


@pytest.mark.parametrize("keep", [False, True])
def test_stream_tags_follow_the_same_allow_list(tmp_path, stream_tagged_clip, keep):
    """Stream tags (an audio track's language) used to be dropped, even with --keep-metadata; now each stream keeps
    its language, and its title only with --keep-metadata (a track title can name someone)."""
    import av

    for suffix in (".mkv", ".mp4"):
        out = tmp_path / f"out{suffix}"
        with VideoWriter(out, probe(stream_tagged_clip), EncodeOptions(keep_metadata=keep)) as writer:
            for frame in read_frames(stream_tagged_clip):
                writer.write(frame.image, frame.pts, frame.duration)
        with av.open(str(out)) as container:
            tags = [{k.lower(): v for k, v in stream.metadata.items()} for stream in container.streams]
        assert [t.get("language") for t in tags] == ["eng", "fra", "deu"], suffix
        titles = [t.get("title", t.get("name")) for t in tags]  # MP4 stores a track title as its name
        assert titles == (["Alice cam", "Commentary by Alice", None] if keep else [None, None, None]), suffix


def test_cli_passes_keep_metadata_to_the_writer(monkeypatch, tmp_path, tagged_clip):
    from click.testing import CliRunner

    from deid import cli

    seen = []
    monkeypatch.setattr(cli, "run_anonymize", lambda job, *a, **k: seen.append(job.encode))
    monkeypatch.setattr(cli, "load_model_from_options", lambda *a, **k: (None, None, None))
    for flags, expected in (([], False), (["--keep-metadata"], True)):
        result = CliRunner().invoke(cli.cli, ["anonymize", str(tagged_clip), "-o", str(tmp_path / "o.mkv"), *flags])
        assert result.exit_code == 0, result.output
        assert seen.pop().keep_metadata is expected


def test_presentation_order_sorts_misplaced_labels_and_keeps_vfr_times():
    """Frames come out of the decoder in presentation order; AVI labels them in decode order. Each frame takes the
    smallest label among itself and the next REORDER_DEPTH frames: the set of times (VFR gaps included) is kept."""
    labels = [(0, 1), (3, 2), (5, 1), (1, 2), (9, 4), (13, 1), (6, 3), (14, 1), (None, 0)]  # (pts, duration)
    frames = [SimpleNamespace(pts=p, duration=d, name=i) for i, (p, d) in enumerate(labels)]
    out = list(video._presentation_order(iter(frames), step=1))
    assert [f.name for f, _, _ in out] == list(range(len(labels)))  # the frames keep their order
    assert [(p, d) for _, p, d in out] == [(0, 1), (1, 2), (3, 2), (5, 1), (6, 3), (9, 4), (13, 1), (14, 1), (15, 0)]
    # Deeper than REORDER_DEPTH: time still never goes backwards (the encoder would refuse the frame).
    deep = [SimpleNamespace(pts=p, duration=0) for p in (0, 10, 11, 12, 13, 14, 15, 1)]
    times = [p for _, p, _ in video._presentation_order(iter(deep), step=1)]
    assert all(b > a for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("codec", ["mpeg4", "h264"])
def test_avi_with_b_frames_reads_and_writes_in_presentation_order(tmp_path, bframes_avis, codec):
    """DivX/XviD-style AVIs (B-frames, MP3 or AC3 audio) used to crash the encoder: `avcodec_send_frame() returned
    22` writing .avi, `returned 22` muxing .mp4. Every frame is kept, at its presentation time, with the audio."""
    clip = bframes_avis[codec]
    times = frame_times(clip)
    tb = float(probe(clip).time_base)
    np.testing.assert_allclose([f.pts * tb for f in read_frames(clip)], times, atol=1e-9)
    for suffix in (".avi", ".mp4", ".mkv"):
        out = tmp_path / f"{codec}{suffix}"
        src, dst = _roundtrip(clip, out)
        assert dst.frame_count == src.frame_count == BFRAME_AVI_FRAMES
        exact = 5e-4 if suffix == ".mkv" else 1e-6  # Matroska stores milliseconds
        np.testing.assert_allclose(frame_times(out) - frame_times(out)[0], times - times[0], atol=exact)
        assert len(dst.audio) == 1 and dst.duration == pytest.approx(src.duration, abs=exact)
