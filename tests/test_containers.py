"""Output containers and codecs (issue 15, items 5, 8, 10, 12; issue 13's --codec): every container's encoders
work, defaults fit the container, bad codecs are refused up front, audio stays in sync whatever the input's start,
colour tags, bit depth and field order survive, dropped streams are named."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from deid.errors import MediaError
import deid.media.video as video
from deid.media.containers import CONTAINERS, resolve_codec, usable_codecs
from deid.media.video import (VIDEO_EXTENSIONS, ColorTags, EncodeOptions, HdrMetadata, VideoWriter, audio_duration, probe,
                              read_frames)

from tests.fixtures.inputs import FRAMES, HDR_MASTER_DISPLAY, lavfi_clip


def _roundtrip(source: Path, target: Path, **options) -> VideoWriter:
    info = probe(source)
    with VideoWriter(target, info, EncodeOptions(**options)) as writer:
        for frame in read_frames(source):
            writer.write(frame.image, frame.pts, frame.duration)
    return writer


def _starts(path: Path) -> dict[str, float]:
    """Seconds at which the first decoded video frame and the first audio frame start."""
    starts = {}
    with av.open(str(path)) as container:
        for kind in ("video", "audio"):
            streams = getattr(container.streams, kind)
            if streams:
                container.seek(0)
                frame = next(container.decode(streams[0]))
                starts[kind] = float(frame.pts * frame.time_base)
    return starts


@pytest.fixture(scope="session")
def small_clip(matrix_dir) -> Path:
    """64x48 with 4:3 pixels (as DV and anamorphic DVD sources have), H.264 and AAC."""
    return lavfi_clip(matrix_dir / "small.mp4", "-vf", "setsar=4/3", "-c:v", "libx264", "-c:a", "aac")


@pytest.mark.parametrize("suffix", sorted(set(CONTAINERS)))
def test_every_encoder_of_every_container_writes_a_readable_video(tmp_path, small_clip, suffix):
    codecs = usable_codecs(CONTAINERS[suffix])
    assert codecs, f"no encoder for {suffix} in this build"
    for codec in codecs:
        out = tmp_path / f"{codec}{suffix}"
        writer = _roundtrip(small_clip, out, codec=codec)
        dst = probe(out)
        assert dst.frame_count == FRAMES and (dst.width, dst.height) == (64, 48), (suffix, codec)
        # The audio is kept (copied or re-encoded) in every container that holds audio (GIF holds none).
        assert len(dst.audio) == (0 if suffix == ".gif" else 1), (suffix, codec)
        assert writer.codec == codec
        # The pixel aspect ratio is kept (GIF to 1/64), or the summary says it was not (VP9 in WebM).
        kept = abs(float(dst.sar) - 4 / 3) < 1 / 64
        assert kept != any("pixel aspect ratio 4:3 not kept" in note for note in writer.notes), (suffix, codec, dst.sar)


def test_default_codec_fits_the_container(tmp_path, small_clip):
    """A .webm output used to end in "'webm' format does not support 'libx264' codec"."""
    expected = {".mp4": "h264", ".webm": "vp9", ".avi": "mpeg4", ".ts": "h264", ".mpg": "mpeg2video", ".mkv": "h264"}
    for suffix, codec in expected.items():
        out = tmp_path / f"out{suffix}"
        _roundtrip(small_clip, out)
        assert probe(out).codec == codec and probe(out).frame_count == FRAMES


def test_explicit_codec_is_checked_against_the_container():
    assert set(VIDEO_EXTENSIONS) <= set(CONTAINERS)  # every video type deid reads, it can also write
    assert resolve_codec(None, Path("x.webm")) == "libvpx-vp9"
    assert resolve_codec("h264", Path("x.mp4")) == "libx264"  # libav's aliases name the encoder
    assert resolve_codec("prores_ks", Path("x.mov")) == "prores_ks"
    with pytest.raises(MediaError) as refused:
        resolve_codec("gif", Path("x.mp4"))
    assert str(refused.value).startswith("--codec gif: a .mp4 file cannot hold it. For .mp4 use one of: libx264, ")
    with pytest.raises(MediaError, match=r"^--codec prores_ks: a \.mp4 file cannot hold it"):
        resolve_codec("prores_ks", Path("x.mp4"))
    with pytest.raises(MediaError, match=r"^--codec nonesuch: no such video encoder here\. For \.webm use one of: libvpx-vp9"):
        resolve_codec("nonesuch", Path("x.webm"))
    with pytest.raises(MediaError, match=r"^--codec aac: no such video encoder"):  # an audio encoder is no answer
        resolve_codec("aac", Path("x.mkv"))


def _open_files() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return found


def test_failed_writer_closes_every_container(tmp_path, small_clip, monkeypatch):
    """A constructor that fails (bad codec, or an encoder that cannot start) leaves no file open, input or output."""
    info = probe(small_clip)
    before = _open_files()
    with pytest.raises(MediaError, match="--codec nonesuch"):
        VideoWriter(tmp_path / "a.mp4", info, EncodeOptions(codec="nonesuch"))
    # Fail once the output container is open (setting up the encoder), then once the audio input is open too.
    def broken(*args, **kwargs):
        raise av.error.ArgumentError(22, "Invalid argument")

    with monkeypatch.context() as patch:
        patch.setattr(video, "_codec_options", broken)
        with pytest.raises(av.error.ArgumentError):
            VideoWriter(tmp_path / "b.mp4", info)
    monkeypatch.setattr(video, "takes_audio", broken)
    with pytest.raises(av.error.ArgumentError):
        VideoWriter(tmp_path / "c.mp4", info)
    leaked = {f for f in _open_files() - before if str(tmp_path) in f or str(small_clip) in f}
    assert leaked == set()


def _av_offset(path: Path) -> float:
    starts = _starts(path)
    return starts["video"] - starts["audio"]


@pytest.mark.parametrize("suffix", [".ts", ".avi", ".mp4", ".mkv"])
def test_late_start_keeps_audio_with_video(tmp_path, late_ts_clip, suffix):
    """A TS clip that starts at 2.8 s: audio and video used to come out 1.4-5 s apart in TS and AVI outputs."""
    src = probe(late_ts_clip)
    assert float(src.start) == pytest.approx(2.8)
    out = tmp_path / f"out{suffix}"
    _roundtrip(late_ts_clip, out)
    frame = 1 / 25
    assert abs(_av_offset(out) - _av_offset(late_ts_clip)) < frame
    assert probe(out).duration == pytest.approx(src.duration, abs=frame)
    assert _starts(out)["video"] < 0.2  # the output's clock starts at its first frame (plus the TS muxer's delay)


def test_mjpeg_avi_roundtrip_keeps_sync(tmp_path, mjpeg_avi_clip):
    """MJPEG + PCM in AVI at 30 fps: the video used to come out 67 ms (two frames) after the audio."""
    assert _starts(mjpeg_avi_clip) == {"video": 0.0, "audio": 0.0}
    out = tmp_path / "out.avi"
    _roundtrip(mjpeg_avi_clip, out)
    assert abs(_av_offset(out)) < 1 / 30 / 2
    assert probe(out).frame_count == FRAMES and probe(out).audio[0].codec == "pcm_s16le"  # copied as it is
    assert abs(_av_offset(_roundtrip_path(tmp_path, mjpeg_avi_clip, ".ts"))) < 1 / 30  # PCM re-encoded for TS


@pytest.mark.parametrize("suffix", [".webm", ".ts"])
def test_re_encoded_audio_keeps_its_start(tmp_path, late_audio_clip, suffix):
    """Audio that starts 0.5 s after the video, re-encoded (Opus for WebM, AAC for TS), used to start with it."""
    assert _starts(late_audio_clip) == {"video": 0.0, "audio": 0.5}
    out = tmp_path / f"out{suffix}"
    _roundtrip(late_audio_clip, out)
    assert probe(out).audio[0].codec == {".webm": "opus", ".ts": "aac"}[suffix]
    assert abs(_av_offset(out) - _av_offset(late_audio_clip)) < 1 / 25


@pytest.mark.parametrize("suffix", [".avi", ".mkv"])
def test_audio_before_the_first_frame_is_cut(tmp_path, early_audio_ts, suffix):
    """Audio that starts 0.2 s before the video (TS): the output's clock starts at the first frame, and the sound
    before it is cut, not moved to 0 (it came out late by that much in AVI). AVI re-encodes the AAC to PCM (cut to
    the sample), MKV copies it (cut to the AAC frame of 1024 samples, 21 ms, that holds the first frame's start)."""
    src = probe(early_audio_ts)
    starts = _starts(early_audio_ts)
    assert starts["video"] - starts["audio"] == pytest.approx(0.2, abs=0.03)
    audio_end = starts["audio"] + audio_duration(early_audio_ts, src.audio[0].index)
    out = tmp_path / f"out{suffix}"
    _roundtrip(early_audio_ts, out)
    kept = audio_duration(out, probe(out).audio[0].index)
    frame = 1024 / 48000 if suffix == ".mkv" else 1 / 48000
    early = 0 if suffix == ".avi" else frame
    assert -early - 1e-3 <= _starts(out)["audio"] - _starts(out)["video"] <= 1e-3
    assert audio_end - starts["video"] - 1e-3 <= kept <= audio_end - starts["video"] + early + 1e-3


@pytest.mark.parametrize("suffix", [".mov", ".avi"])
def test_edit_list_keeps_the_visible_start_and_duration(tmp_path, edit_list_mov, suffix):
    """An edit-listed .mov (cut with `-ss 0.5 -c copy`) used to come out 0.5 s late and 0.5 s long: probe took the
    start, the frame count and the duration from the pre-roll packets the decoder drops."""
    src = probe(edit_list_mov)
    shown = [frame.pts * float(src.time_base) for frame in read_frames(edit_list_mov)]
    assert (src.start, src.frame_count) == (0, len(shown)) and len(shown) == 37  # 1.5 s at 25 fps, cut to the frame
    assert src.duration == pytest.approx(len(shown) / 25, abs=1e-9)
    out = tmp_path / f"out{suffix}"
    _roundtrip(edit_list_mov, out)
    np.testing.assert_allclose(video.frame_times(out), shown, atol=1e-6)
    assert probe(out).duration == pytest.approx(src.duration, abs=1e-6)
    assert _starts(out) == {"video": 0.0, "audio": 0.0}
    assert audio_duration(out, 1) == pytest.approx(audio_duration(edit_list_mov, 1), abs=1 / 25)


def test_short_ntsc_clip_in_a_coarse_time_base_stays_constant_rate(tmp_path, ntsc_600_mov):
    """It used to be taken for variable rate (or for 27000/901) and got a 600 fps AVI time base."""
    src = probe(ntsc_600_mov)
    assert (src.frame_rate, src.constant_rate, src.frame_count) == (Fraction(30000, 1001), True, 45)
    out = tmp_path / "out.avi"
    _roundtrip(ntsc_600_mov, out)
    dst = probe(out)
    assert (dst.frame_rate, dst.time_base, dst.frame_count) == (Fraction(30000, 1001), Fraction(1001, 30000), 45)
    np.testing.assert_allclose(video.frame_times(out), video.frame_times(ntsc_600_mov), atol=1 / 600)
    assert _starts(out) == {"video": 0.0, "audio": 0.0}


def _roundtrip_path(tmp_path, source, suffix):
    out = tmp_path / f"again{suffix}"
    _roundtrip(source, out)
    return out


def _luma_diff(output: Path, source: Path) -> tuple[float, float]:
    """Mean and mean absolute difference of the luma planes (output - source, in the source's levels): a wrong
    matrix on the way back to YUV shifts the mean, a wrong range the contrast; the codec's error averages out."""
    def planes(path):
        with av.open(str(path)) as container:
            frames = [f.to_ndarray().astype(np.float64) for f in container.decode(video=0)]
        return np.stack(frames)[:, : frames[0].shape[0] * 2 // 3]  # planar 4:2:0: luma is the top two thirds

    diff = planes(output) - planes(source)
    return float(diff.mean()), float(np.abs(diff).mean())


def test_hdr_tags_and_ten_bits_are_kept(tmp_path, hdr_clip):
    """A 10-bit HDR10 clip used to come out 8-bit yuv420p without colour tags (wrong colours in players)."""
    src = probe(hdr_clip)
    assert (src.bits, src.color.primaries, src.color.transfer, src.color.matrix, src.color.range) == (10, 9, 16, 9, 1)
    out = tmp_path / "out.mp4"
    writer = _roundtrip(hdr_clip, out)
    dst = probe(out)
    assert (dst.bits, dst.pix_fmt, dst.codec) == (10, "yuv420p10le", "h264")
    assert dst.color == src.color
    assert abs(_luma_diff(out, hdr_clip)[0]) < 0.8  # 10-bit levels; with BT.601 on the way back it is -1.5
    assert writer.notes == ["10-bit video processed at 8 bits per channel, written as 10-bit"]
    # The mastering display and light levels (HDR10's static metadata) are kept by x264 and x265 alike.
    assert src.hdr == HdrMetadata(HDR_MASTER_DISPLAY, (1000, 400)) and dst.hdr == src.hdr
    _roundtrip(hdr_clip, tmp_path / "hevc.mkv", codec="libx265")
    assert probe(tmp_path / "hevc.mkv").hdr == src.hdr
    # VP9 in this build takes 8-bit only: the tags stay, and the summary says what was lost.
    webm = tmp_path / "out.webm"
    writer = _roundtrip(hdr_clip, webm)
    assert probe(webm).bits == 8 and probe(webm).color == src.color
    assert [note.split(" (")[0] for note in writer.notes] == [
        "10-bit video processed at 8 bits per channel, written as 8-bit", "pixel aspect ratio 128:117 not kept",  # CIF's
        "HDR10 mastering display and light levels not kept"]


def test_full_range_stays_full(tmp_path, full_range_clip):
    src = probe(full_range_clip)
    assert src.color == ColorTags(primaries=1, transfer=1, matrix=1, range=2)
    out = tmp_path / "out.mkv"
    _roundtrip(full_range_clip, out)
    assert probe(out).color == src.color
    assert _luma_diff(out, full_range_clip)[1] < 2.5  # 1.2; written in limited range under a full tag: 6.7


def test_interlaced_field_order_is_kept(tmp_path, interlaced_clip):
    order = probe(interlaced_clip).field_order
    assert order == (2 if "tff" in interlaced_clip.name else 3)  # top field first, bottom field first
    out = tmp_path / "out.mp4"
    writer = _roundtrip(interlaced_clip, out)
    assert probe(out).field_order == order and writer.notes == []
    with av.open(str(out)) as container:
        assert next(container.decode(video=0)).interlaced_frame
    mpg = tmp_path / "out.mpg"  # MPEG-2 here cannot be told the field order: progressive, and said so
    writer = _roundtrip(interlaced_clip, mpg)
    assert probe(mpg).field_order in (0, 1)
    assert writer.notes == ["interlaced video written as progressive (mpeg2video cannot keep the field order; use libx264)"]


def test_dropped_streams_are_named(tmp_path, extra_streams_clip):
    src = probe(extra_streams_clip)
    assert src.dropped == ("1 extra video stream", "1 subtitle stream")
    out = tmp_path / "out.mkv"
    writer = _roundtrip(extra_streams_clip, out)
    assert writer.notes == ["1 extra video stream and 1 subtitle stream not carried over (only the first video stream "
                            "and the audio are)"]
    with av.open(str(out)) as container:
        assert (len(container.streams.video), len(container.streams.audio), len(container.streams.subtitles)) == (1, 1, 0)
    assert probe(out).frame_count == FRAMES and probe(out).frame_rate == Fraction(25)
