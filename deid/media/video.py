"""Video I/O: probe, streaming decode and encode with exact timestamps, audio and metadata passthrough.

Everything runs on PyAV (its bundled libav), not on the ffmpeg binary: PyAV gives the exact rational frame rate,
every frame's pts (so VFR timing survives), the display matrix (rotation), the SAR, and packet-level stream copy of
the audio in the same pass as the video encode. The ffmpeg binary (`ffmpeg_exe`) is only used to make test clips.
Frames are handled as stored (not rotated); `to_display`/`points_to_stored` convert for face detection.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import os
import shutil
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from deid.atomic import target_of
from deid.errors import MediaError
from deid.media.containers import container_for, keeps_sar, resolve_codec, takes_audio
from deid.media.stills import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")


def ffmpeg_exe() -> str:
    """The ffmpeg binary: $DEID_FFMPEG, else `ffmpeg` on PATH, else the one bundled with imageio-ffmpeg."""
    if os.environ.get("DEID_FFMPEG"):
        return os.environ["DEID_FFMPEG"]
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    # lazy: optional, only when neither $DEID_FFMPEG nor PATH has ffmpeg
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


# ------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class AudioInfo:
    index: int  # stream index in the container
    codec: str
    sample_rate: int
    channels: int
    duration: float | None  # seconds


@dataclass(frozen=True)
class ColorTags:
    """A video's colour description, as libav numbers it (AVColorPrimaries, AVColorTransferCharacteristic,
    AVColorSpace, AVColorRange); 2 (0 for the range) means unspecified."""

    primaries: int = 2
    transfer: int = 2
    matrix: int = 2
    range: int = 0


@dataclass(frozen=True)
class HdrMetadata:
    """HDR10's static metadata, in the units x264 and x265 take: the mastering display's primaries and white point
    (CIE xy in 0.00002) and luminance range (0.0001 cd/m2) as "G(x,y)B(x,y)R(x,y)WP(x,y)L(max,min)", and the content
    light levels (MaxCLL, MaxFALL in cd/m2). Either may be missing."""

    master_display: str | None = None
    light_level: tuple[int, int] | None = None

    @classmethod
    def of(cls, frame: av.VideoFrame) -> HdrMetadata | None:
        """A decoded frame's (HEVC and H.264 carry them in SEI messages), or None."""
        found = {}
        for side in frame.side_data:
            if side.type.name == "MASTERING_DISPLAY_METADATA":
                found["master_display"] = _master_display(bytes(side))
            elif side.type.name == "CONTENT_LIGHT_LEVEL":
                found["light_level"] = struct.unpack("<2I", bytes(side)[:8])
        return cls(**found) if any(found.values()) else None


def _master_display(data: bytes) -> str | None:
    """libav's AVMasteringDisplayMetadata (rationals: R, G, B primaries, white point, min and max luminance; then
    has_primaries, has_luminance) as x265's master-display string; None when it holds neither part."""
    values = struct.unpack("<22i", data[:88])
    ratio = [values[i] / values[i + 1] if values[i + 1] else 0.0 for i in range(0, 20, 2)]
    has_primaries, has_luminance = values[20], values[21]
    if not (has_primaries and has_luminance):
        return None
    xy = [round(r * 50000) for r in ratio[:8]]  # R, G, B, white point, as (x, y)
    r, g, b, wp = (f"({xy[i]},{xy[i + 1]})" for i in range(0, 8, 2))
    return f"G{g}B{b}R{r}WP{wp}L({round(ratio[9] * 10000)},{round(ratio[8] * 10000)})"


@dataclass(frozen=True)
class VideoInfo:
    path: Path | None  # None: frames made in memory (see `for_frames`)
    width: int  # stored frame size (before the display rotation)
    height: int
    frame_rate: Fraction  # average frame rate, exact (30000/1001 stays that)
    time_base: Fraction
    frame_count: int
    duration: float  # seconds of video, first frame's start to last frame's end
    rotation: int  # display rotation, degrees counter-clockwise (0, 90, 180, 270)
    sar: Fraction  # sample (pixel) aspect ratio
    codec: str
    start_pts: int
    constant_rate: bool  # every frame starts within a time_base tick of the frame_rate grid
    audio: tuple[AudioInfo, ...] = field(default=())
    pix_fmt: str = "yuv420p"  # the decoder's pixel format, e.g. yuv420p10le
    bits: int = 8  # bits per sample of that pixel format
    color: ColorTags = ColorTags()
    hdr: HdrMetadata | None = None  # HDR10's mastering display and light levels, when the source has them
    field_order: int = 1  # libav's AVFieldOrder: 0 unknown, 1 progressive, 2 top field first, 3 bottom first, ...
    dropped: tuple[str, ...] = ()  # streams an output does not carry: "1 extra video stream", "2 subtitle streams"

    @property
    def start(self) -> Fraction:
        """Seconds at which the first video frame starts (broadcast TS clips often start at 1.4 s or later)."""
        return self.start_pts * self.time_base

    @classmethod
    def for_frames(cls, width: int, height: int, frame_rate: Fraction) -> VideoInfo:
        """The timing of frames made in memory (no source file, no audio): frame i starts at i / frame_rate."""
        return cls(path=None, width=width, height=height, frame_rate=frame_rate, time_base=1 / frame_rate, frame_count=0,
                   duration=0.0, rotation=0, sar=Fraction(1), codec="", start_pts=0, constant_rate=True)

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown, after the rotation."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)


def _open(path: Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file. Check the path.")
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"{path}: not a readable video ({_reason(exc)}). Check that the file is complete and a video.") from None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or exc.__class__.__name__


def _video_stream(container, path: Path):
    # libav opens HEIC and AVIF photos as one-frame videos; an animated GIF is both, and reads well as a video.
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS and Path(path).suffix.lower() != ".gif":
        container.close()
        raise MediaError(f"{path}: is a still image, not a video. Pass a video file.")
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: has no video stream. Pass a video file.")
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        container.close()
        raise MediaError(f"{path}: is a still image, not a video. Pass a video file.")
    return container.streams.video[0]


def probe(path: str | Path) -> VideoInfo:
    """Read a video's timing, geometry, rotation and audio streams, demuxing packets (no full decode).

    Raises MediaError for a missing, unreadable or frameless file.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        tb = stream.time_base
        pts, ends = [], []
        rotation, hdr = 0, None
        try:
            for packet in filter(_shown, container.demux(stream)):
                pts.append(packet.pts)
                ends.append(packet.pts + (packet.duration or 0))
            container.seek(0)
            for frame in container.decode(stream):
                rotation = int(round(frame.rotation or 0)) % 360
                hdr = HdrMetadata.of(frame)
                break
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: corrupt video ({_reason(exc)}). Re-export or repair the file.") from None
        if not pts:
            raise MediaError(f"{path}: holds no video frames. Check that the file is complete.")
        first, last_end = min(pts), max(ends)
        rate, constant_rate = _frame_rate(stream, np.array(sorted(pts), np.float64) * float(tb), float(tb))
        audio = tuple(
            AudioInfo(
                index=a.index,
                codec=a.codec_context.name,
                sample_rate=a.codec_context.sample_rate or 0,
                channels=a.codec_context.channels if hasattr(a.codec_context, "channels") else a.codec_context.layout.nb_channels,
                duration=float(a.duration * a.time_base) if a.duration is not None else None,
            )
            for a in container.streams.audio
        )
        cc = stream.codec_context
        return VideoInfo(
            path=path,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            frame_rate=rate,
            time_base=Fraction(tb),
            frame_count=len(pts),
            duration=float((last_end - first) * tb),
            rotation=rotation,
            sar=Fraction(stream.sample_aspect_ratio or 1) if stream.sample_aspect_ratio else Fraction(1),
            codec=stream.codec_context.name,
            start_pts=first,
            constant_rate=constant_rate,
            audio=audio,
            pix_fmt=cc.pix_fmt or "yuv420p",
            bits=max((c.bits for c in cc.format.components), default=8) if cc.format else 8,
            color=ColorTags(cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range),
            hdr=hdr,
            field_order=cc.field_order,
            dropped=_dropped_streams(container),
        )
    finally:
        container.close()


# Rates a constant-rate clip is tried on after the stream's own (libav's guess, then the average).
_COMMON_RATES = tuple(Fraction(r) for r in ("24000/1001", "24", "25", "30000/1001", "30", "48", "50", "60000/1001", "60"))


def _frame_rate(stream, times: np.ndarray, tick: float) -> tuple[Fraction, bool]:
    """(frame rate, constant): the first rate on whose grid every frame starts within a timestamp tick of its own
    place, else the average rate and False (variable rate). times: sorted frame start times, seconds.

    The average alone misleads on short clips whose time base cannot hold the rate: 1.5 s of 30000/1001 at a
    1/600 time base averages 27000/901, and a slightly long last frame pushes the grid off by the end."""
    own = [Fraction(r) for r in (stream.guessed_rate, stream.average_rate) if r]
    for rate in dict.fromkeys(own + list(_COMMON_RATES)):
        place = (times - times[0]) * float(rate)
        if np.all(np.abs(place - np.arange(len(times))) / float(rate) <= tick + 1e-9):
            return rate, True
    return (own[-1] if own else Fraction(25)), False


def _dropped_streams(container) -> tuple[str, ...]:
    """What an output will not carry: video streams after the first (cover art included), subtitles, data."""
    counts = {"extra video stream": len(container.streams.video) - 1, "subtitle stream": len(container.streams.subtitles),
              "data stream": len(container.streams.data)}
    return tuple(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items() if n > 0)


def _shown(packet: av.Packet) -> bool:
    """Whether a packet holds something the viewer sees: not empty, timed, and not an edit list's pre-roll (a .mov
    cut with `ffmpeg -ss 0.5 -c copy` keeps the packets from the keyframe before the cut, flagged for the decoder
    to decode and drop)."""
    return bool(packet.size) and packet.pts is not None and not packet.is_discard


def frame_times(path: str | Path) -> np.ndarray:
    """Presentation times (seconds, sorted) of every video frame, from the packets."""
    container = _open(Path(path))
    try:
        stream = _video_stream(container, Path(path))
        pts = sorted(p.pts for p in filter(_shown, container.demux(stream)))
        return np.array(pts, np.float64) * float(stream.time_base)
    finally:
        container.close()


def audio_duration(path: str | Path, index: int) -> float:
    """Seconds of audio in stream `index`, from its packets (first start to last end)."""
    container = _open(Path(path))
    try:
        stream = container.streams[index]
        spans = [(p.pts, p.pts + (p.duration or 0)) for p in filter(_shown, container.demux(stream))]
        return float((max(e for _, e in spans) - min(s for s, _ in spans)) * stream.time_base) if spans else 0.0
    finally:
        container.close()


# ------------------------------------------------------------------------------------------- rotation


def to_display(image: np.ndarray, rotation: int) -> np.ndarray:
    """A stored frame [H, W, 3] as shown: rotated `rotation` degrees counter-clockwise."""
    return np.ascontiguousarray(np.rot90(image, k=(rotation // 90) % 4))


def points_to_stored(points: np.ndarray, rotation: int, stored_size: tuple[int, int]) -> np.ndarray:
    """Map pixel points [..., 2] (x, y) from the display view back to the stored frame of size (W, H)."""
    width, height = stored_size
    x, y = points[..., 0], points[..., 1]
    k = (rotation // 90) % 4
    # np.rot90 by k turns stored (x, y) into: k=1 (y, W-1-x); k=2 (W-1-x, H-1-y); k=3 (H-1-y, x). Invert those.
    if k == 0:
        sx, sy = x, y
    elif k == 1:
        sx, sy = width - 1 - y, x
    elif k == 2:
        sx, sy = width - 1 - x, height - 1 - y
    else:
        sx, sy = y, height - 1 - x
    return np.stack([sx, sy], axis=-1).astype(points.dtype)


# ------------------------------------------------------------------------------------------- decode


@dataclass
class Frame:
    index: int  # 0-based decode order
    pts: int  # presentation time in the stream's time_base
    duration: int  # how long it shows, in the stream's time_base (0: unknown)
    image: np.ndarray  # [H, W, 3] uint8 RGB as stored


def read_frames(path: str | Path) -> Iterator[Frame]:
    """Decode a video one frame at a time (memory stays flat), timestamps in presentation order (see
    `_presentation_order`). Raises MediaError on corrupt data."""
    path = Path(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        step = max(1, round(1 / (stream.average_rate or 25) / stream.time_base)) if stream.time_base else 1
        fmt = stream.codec_context.format
        accurate = bool(fmt) and max((c.bits for c in fmt.components), default=8) > 8
        index = 0
        try:
            for frame, pts, duration in _presentation_order(container.decode(stream), step):
                yield Frame(index, pts, duration, _to_rgb(frame, accurate))
                index += 1
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: corrupt video at frame {index} ({_reason(exc)}). Re-export or repair the file.") from None
        if index == 0:
            raise MediaError(f"{path}: holds no decodable video frames. Check that the file is complete.")
    finally:
        container.close()


# How many frames a decoded frame's timestamp may sit away from its place. A decoder returns its frames in
# presentation order, but AVI stores no presentation times: libav guesses them from the decode order, so DivX/XviD
# and H.264 files with B-frames come out labelled 1, 3, 4, 2, 6, 7, 5, ... (2 B-frames: 2 places off; x264's
# pyramid of 3: 3). The labels are right as a set, only misplaced.
REORDER_DEPTH = 4


def _presentation_order(frames: Iterator[av.VideoFrame], step: int,
                        depth: int = REORDER_DEPTH) -> Iterator[tuple[av.VideoFrame, int, int]]:
    """(frame, pts, duration) in the decoder's order, each frame given the smallest timestamp among itself and the
    `depth` frames after it: sorted timestamps, the same set (so VFR stays exact), whatever order they were
    labelled in. Holds `depth` decoded frames (memory stays flat). A frame without a timestamp takes the previous
    one's plus `step`; a timestamp that still does not advance (a displacement deeper than `depth`) does the same,
    so an encoder never sees time go backwards."""
    pending: collections.deque[av.VideoFrame] = collections.deque()
    times: list[tuple[int, int]] = []  # heap of (pts, duration) of the pending frames
    last = None

    def emit() -> tuple[av.VideoFrame, int, int]:
        nonlocal last
        pts, duration = heapq.heappop(times)
        if last is not None and pts <= last:
            pts = last + step
        last = pts
        return pending.popleft(), pts, duration

    guessed = None
    for frame in frames:
        pts = frame.pts if frame.pts is not None else (0 if guessed is None else guessed + step)
        guessed = pts
        pending.append(frame)
        heapq.heappush(times, (pts, int(frame.duration or 0)))
        if len(pending) > depth:
            yield emit()
    while pending:
        yield emit()


# YUV -> RGB with accurate rounding and full-resolution chroma interpolation, for sources deeper than 8 bits:
# swscale's fast path darkens a 10-bit round trip by about 1.5 levels in 8-bit terms (measured; 1 level for 8-bit
# sources). It costs about 10x the fast path (35 vs 3 ms per 1080p frame here), so 8-bit video keeps the fast one.
_ACCURATE = (av.video.reformatter.Interpolation.BILINEAR | av.video.reformatter.Interpolation.ACCURATE_RND
             | av.video.reformatter.Interpolation.FULL_CHR_H_INT)


def _to_rgb(frame: av.VideoFrame, accurate: bool) -> np.ndarray:
    """[H, W, 3] uint8 RGB, converted with the frame's own matrix and range (a full-range frame stays full)."""
    return frame.to_ndarray(format="rgb24", src_color_range=frame.color_range or None,
                            interpolation=_ACCURATE if accurate else None)


# ------------------------------------------------------------------------------------------- encode


@dataclass(frozen=True)
class EncodeOptions:
    codec: str | None = None  # None: the output container's default (H.264 for MP4, VP9 for WebM, ...)
    crf: int = 18
    # Odd-sized frames fall back to yuv444p (4:2:0 needs even sides); >8-bit sources keep their depth where the
    # codec allows (see choose_pix_fmt).
    pix_fmt: str = "yuv420p"
    preset: str = "medium"
    # Container tags: only when and in what language (KEPT_TAGS) unless True, when every tag of the source is
    # copied (title, comment, artist, vendor keys, GPS...): those can name or locate the people filmed.
    keep_metadata: bool = False


# Pixel formats an encoder is tried with first: MJPEG wants full-range "j" formats, ProRes is 4:2:2 10-bit at least.
_PIX_FMT_FIRST = {"mjpeg": ("yuvj420p", "yuvj444p"), "prores_ks": ("yuv422p10le", "yuv444p10le"), "gif": ("rgb8", "pal8")}
# Encoders that write interlaced pictures in a given field order when told to. (MPEG-2 takes the order from a frame
# flag that PyAV cannot set: it would write every clip bottom field first.)
_INTERLACED_CODECS = ("libx264",)
# libav's AVColorSpace -> swscale's matrix numbering (they differ for SMPTE 170M and BT.2020 CL).
_SWS_MATRIX = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}


def choose_pix_fmt(codec: str, wanted: str, source_bits: int, odd: bool) -> str:
    """The pixel format to encode with: `wanted` (4:4:4 for odd sizes), 10-bit when the source is deeper than
    8 bits and the encoder takes it, else the closest format the encoder takes."""
    formats = [f.name for f in av.Codec(codec, "w").video_formats or ()]
    chroma = "yuv444p" if odd and wanted == "yuv420p" else wanted
    candidates = list(_PIX_FMT_FIRST.get(codec, ()))
    if source_bits > 8:
        candidates.append(f"{chroma}10le")
    candidates += [chroma, "yuv444p" if odd else "yuv420p", "yuv444p"]
    return next((c for c in candidates if c in formats), formats[0] if formats else chroma)


def _bits(pix_fmt: str) -> int:
    return max(c.bits for c in av.VideoFormat(pix_fmt).components)


def _codec_options(codec: str, options: EncodeOptions, reorder: bool, interlaced: bool) -> dict[str, str]:
    if codec in ("libx264", "libx265"):
        result = {"crf": str(options.crf), "preset": options.preset}
        if codec == "libx265":
            result["x265-params"] = "log-level=error"  # x265 prints its settings to stderr by default
    elif codec.startswith("libvpx") or codec == "libsvtav1":
        result = {"crf": str(options.crf), "b": "0"}
    else:
        # Fixed quantiser for the older codecs (their default is a low bit rate): crf 18 -> q 5.
        result = {"flags": "+qscale", "global_quality": str(118 * (2 + options.crf // 6))}
    if not reorder:
        result["bf"] = "0"  # no B-frames where the container stores no presentation times (AVI)
    if interlaced:
        result["flags"] = result.get("flags", "") + "+ildct+ilme"
    return result


def _x264_field_order(field_order: int) -> dict[str, str]:
    """x264 takes the field order from its own parameters (the codec context's is not read): 2/4 top first,
    3/5 bottom first (libav's AVFieldOrder)."""
    return {"x264-params": "bff=1" if field_order in (3, 5) else "tff=1"}


def _x265_hdr(hdr: HdrMetadata) -> dict[str, str]:
    params = ["hdr10=1"] + [f"master-display={hdr.master_display}"] * bool(hdr.master_display)
    return {"x265-params": ":".join(params + [f"max-cll={','.join(map(str, hdr.light_level))}"] * bool(hdr.light_level))}


def _x264_hdr(hdr: HdrMetadata) -> dict[str, str]:
    params = [f"mastering-display={hdr.master_display}"] * bool(hdr.master_display)
    return {"x264-params": ":".join(params + [f"cll={','.join(map(str, hdr.light_level))}"] * bool(hdr.light_level))}


# Encoders that write HDR10's static metadata (SEI messages) when given it as parameters.
_HDR_PARAMS = {"libx265": _x265_hdr, "libx264": _x264_hdr}


def _add_params(options: dict[str, str], extra: dict[str, str]) -> None:
    """Merge encoder options; x264-params and x265-params are ':'-joined lists, so they are appended to."""
    for key, value in extra.items():
        options[key] = f"{options[key]}:{value}" if key in options else value


class VideoWriter:
    """Encode frames with the source's exact timestamps, copying the source's audio and metadata alongside.

    `source` is a probed video, or `VideoInfo.for_frames(...)` for frames made in memory (figures, clips).

    The codec is the container's default unless `options.codec` names one (checked against the container); the
    source's colour tags, bit depth (where the codec allows) and field order are kept, and the output's clock starts
    at the source's first frame, audio shifted with it. What the output cannot keep is listed in `notes`.
    Audio packets are copied (no re-encode) when the output container takes the codec, else re-encoded (AAC for
    MP4); they are interleaved with the video as it is written, so memory stays flat. Use as a context manager; on an
    exception the file is closed and left for the caller (who writes to a temporary path) to delete. A constructor
    that fails closes everything it opened.
    """

    def __init__(self, path: str | Path, source: VideoInfo, options: EncodeOptions = EncodeOptions(),
                 size: tuple[int, int] | None = None, keep_audio: bool = True, rotation: int | None = None):
        """path: the output file; its suffix names the container (a temporary name keeps the target's suffix)."""
        self.path = Path(path)
        self.source = source
        self.notes: list[str] = []  # what the output lost against the source, in words, for the summary
        self.container = None
        self.audio = None
        try:
            self._open(options, size, keep_audio, rotation)
        except BaseException:
            self.abort()
            raise

    def _open(self, options: EncodeOptions, size, keep_audio: bool, rotation: int | None) -> None:
        source = self.source
        spec = container_for(self.path)
        codec = resolve_codec(options.codec, self.path)
        width, height = size or (source.width, source.height)
        self.container = av.open(str(self.path), mode="w", format=spec.format)
        stream = self.container.add_stream(codec, rate=source.frame_rate)
        if source.path is not None:
            container_tags, video_tags = _source_tags(source.path, keep_all=options.keep_metadata)
            self.container.metadata.update(container_tags)
            stream.metadata.update(video_tags)
        stream.width, stream.height = width, height
        stream.pix_fmt = choose_pix_fmt(codec, options.pix_fmt, source.bits, bool(width % 2 or height % 2))
        if source.bits > 8:
            kept = f"written as {_bits(stream.pix_fmt)}-bit" if _bits(stream.pix_fmt) > 8 else f"written as 8-bit ({codec} takes no more here; libx265 or libx264 keep 10-bit)"
            self.notes.append(f"{source.bits}-bit video processed at 8 bits per channel, {kept}")
        # Constant-rate sources are written on the exact frame grid (time_base 1/rate), so 30000/1001 stays exact
        # even when the source container rounded its timestamps (MKV's milliseconds); VFR keeps every pts.
        self.time_base = 1 / source.frame_rate if source.constant_rate else source.time_base
        stream.codec_context.time_base = self.time_base
        stream.time_base = self.time_base
        # The output's clock starts at the first frame, and the audio moves with it: MPEG-TS and AVI muxers do not
        # shift streams to a common start, so an input that starts at 1.4 s put its audio 1.4 s off the video.
        self.first = (round(source.start_pts * source.time_base * source.frame_rate) if source.constant_rate
                      else source.start_pts)
        self.durations: dict[int, int] = {}  # pts -> duration of frames inside the encoder
        if source.sar != 1 and size is None:
            stream.codec_context.sample_aspect_ratio = source.sar
            if not keeps_sar(spec, codec):
                self.notes.append(f"pixel aspect ratio {source.sar.numerator}:{source.sar.denominator} not kept ({codec} "
                                  f"in {self.path.suffix} cannot carry it here): it shows with square pixels. Use .mp4, "
                                  "or --codec libx264 in .mkv")
        interlaced = source.field_order > 1
        if interlaced and codec not in _INTERLACED_CODECS:
            self.notes.append(f"interlaced video written as progressive ({codec} cannot keep the field order; use libx264)")
            interlaced = False
        if interlaced:
            stream.codec_context.field_order = source.field_order
        codec_options = _codec_options(codec, options, spec.reorder, interlaced)
        if interlaced and codec == "libx264":
            _add_params(codec_options, _x264_field_order(source.field_order))
        if source.hdr is not None:
            if codec in _HDR_PARAMS:
                _add_params(codec_options, _HDR_PARAMS[codec](source.hdr))
            else:
                self.notes.append(f"HDR10 mastering display and light levels not kept ({codec} cannot carry them; "
                                  "libx265 or libx264 do)")
        stream.options = codec_options
        self._set_colour(stream)
        rotation = source.rotation if rotation is None else rotation
        if rotation:
            stream.set_display_rotation(rotation)
        if source.dropped:
            self.notes.append(f"{' and '.join(source.dropped)} not carried over (only the first video stream and the audio are)")
        self.video = stream
        self.codec = codec
        if keep_audio and source.audio and spec.audio_encoder is None:
            self.notes.append(f"audio not carried over ({self.path.suffix} files hold none)")
        self.audio = (_AudioPassthrough(source.path, self.container, spec, source.start, options.keep_metadata)
                      if keep_audio and source.audio and spec.audio_encoder is not None else None)
        self.frames = 0

    def _set_colour(self, stream) -> None:
        """Copy the source's colour tags, and convert RGB to YUV with its matrix and range (decode used the same)."""
        colour, cc = self.source.color, stream.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace = colour.primaries, colour.transfer, colour.matrix
        full = stream.pix_fmt.startswith("yuvj")
        cc.color_range = 2 if full else colour.range
        self.reformat = {"format": stream.pix_fmt}
        if colour.matrix in _SWS_MATRIX:
            self.reformat["dst_colorspace"] = _SWS_MATRIX[colour.matrix]
        if colour.range and not full and stream.pix_fmt.startswith("yuv"):
            self.reformat["dst_color_range"] = colour.range

    def write(self, image: np.ndarray, pts: int, duration: int = 0) -> None:
        """image: [H, W, 3] uint8 RGB; pts and duration (0: unknown) in the source's time_base."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(**self.reformat)
        if self.source.constant_rate:
            frame.pts = round(pts * self.source.time_base * self.source.frame_rate) - self.first
            self.durations[frame.pts] = 1
        else:
            frame.pts = pts - self.first
            if duration:
                self.durations[frame.pts] = duration
        frame.time_base = self.time_base
        with self._encoding(f"frame {self.frames} (pts {pts})"):
            self._mux(self.video.encode(frame))
        self.frames += 1

    @contextlib.contextmanager
    def _encoding(self, what: str) -> Iterator[None]:
        """Turn an FFmpeg error (an encoder or muxer refusing a frame, a packet or the trailer) into a MediaError
        naming the output file."""
        try:
            yield
        except av.error.FFmpegError as exc:
            raise MediaError(f"{target_of(self.path)}: could not write {what} ({_reason(exc)}: {exc}). "
                             "Try another output type or --codec; run with --debug for the details.") from exc

    def _mux(self, packets) -> None:
        for packet in packets:
            # The encoder drops frame durations; the last frame's decides the file's duration, so restore them.
            duration = self.durations.pop(packet.pts, 0)
            if duration:
                packet.duration = duration
            if self.audio is not None and packet.dts is not None:
                self.audio.copy_until(float(packet.dts * packet.time_base))
            self.container.mux(packet)

    def close(self) -> None:
        try:
            with self._encoding("the end of the file"):
                self._mux(self.video.encode(None))
                if self.audio is not None:
                    self.audio.copy_until(float("inf"))
                    self.audio.close()
                self.container.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for closable in (self.audio, self.container):
            try:
                if closable is not None:
                    closable.close()
            except Exception:  # noqa: BLE001 - the file is being discarded; its trailer does not matter
                pass

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# Channel layouts for a channel count, where the source leaves its layout unspecified (PCM in AVI): the AAC and
# Opus encoders refuse an unspecified one.
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


class _AudioPassthrough:
    """The source's audio streams, demuxed lazily and muxed into the output up to a given time.

    origin: the source time (seconds) that becomes the output's 0, the video's first frame."""

    def __init__(self, source: Path, output: av.container.OutputContainer, spec, origin: Fraction = Fraction(0),
                 keep_all_tags: bool = False):
        """keep_all_tags: copy every tag of each audio stream, not only KEPT_TAGS (its language)."""
        self.input = av.open(str(source), mode="r")
        try:
            self._add_streams(output, spec, origin)
            for index, out in self.map.items():
                out.metadata.update(_kept_tags(self.input.streams[index].metadata, keep_all_tags))
        except BaseException:
            self.input.close()
            raise

    def _add_streams(self, output: av.container.OutputContainer, spec, origin: Fraction) -> None:
        self.output = output
        self.origin = Fraction(origin)
        # AVI stores no timestamps: its audio plays from the file's 0, so a packet cannot start before it.
        self.starts_before_origin = spec.reorder
        self.map = {}
        self.encoders = {}
        supported = getattr(output, "supported_codecs", None)
        for stream in self.input.streams.audio:
            if takes_audio(spec, stream.codec_context.name, supported):
                self.map[stream.index] = output.add_stream_from_template(stream)
            else:
                # The container refuses this codec (e.g. PCM in MP4): re-encode it (AAC for MP4).
                layout = stream.codec_context.layout
                if layout.name.endswith("channels"):  # unspecified order, e.g. "1 channels"
                    layout = _DEFAULT_LAYOUTS.get(layout.nb_channels, layout)
                out = output.add_stream(spec.audio_encoder, rate=stream.codec_context.sample_rate, layout=layout)
                self.map[stream.index] = out
                self.encoders[stream.index] = stream
        self.packets = self.input.demux(*self.input.streams.audio)
        self.pending = None
        self.next_sample: dict[int, int] = {}  # re-encoded stream -> its next frame's pts, in samples

    def _place(self, index: int, frame: av.AudioFrame) -> av.AudioFrame | None:
        """Time a decoded frame for its encoder: contiguous samples from where the stream starts on the output's
        clock (an audio track that starts 0.5 s after the video still does). Samples before the output's 0 (audio
        that starts before the first video frame, as in broadcast TS) are cut, not moved: None when all are."""
        rate = frame.sample_rate
        if index not in self.next_sample:
            start = round((frame.pts * frame.time_base - self.origin) * rate) if frame.pts is not None else 0
            if start < 0:
                if frame.samples <= -start:
                    return None
                frame, start = _drop_samples(frame, -start), 0
            self.next_sample[index] = start
        frame.pts = self.next_sample[index]
        frame.time_base = Fraction(1, rate)
        self.next_sample[index] += frame.samples
        return frame

    def copy_until(self, seconds: float) -> None:
        while True:
            if self.pending is None:
                self.pending = next(self.packets, None)
                if self.pending is None:
                    return
            packet = self.pending
            if packet.dts is not None and float(packet.dts * packet.time_base - self.origin) > seconds:
                return
            self.pending = None
            self._write(packet)

    def _write(self, packet) -> None:
        index = packet.stream.index
        out = self.map[index]
        if index in self.encoders:
            frames = packet.decode() if packet.size else packet.stream.decode(None)
            for frame in filter(None, (self._place(index, frame) for frame in frames)):
                self.output.mux(out.encode(frame))
            return
        if packet.dts is None or not packet.size:
            return
        if self._before_origin(packet):
            return
        shift = round(self.origin / packet.time_base)
        packet.dts -= shift
        if packet.pts is not None:
            packet.pts -= shift
        packet.stream = out
        self.output.mux(packet)

    def _before_origin(self, packet) -> bool:
        """Whether a copied packet is cut: the output's clock starts at the first video frame, so sound before it
        goes (see _place). A packet that ends there stays where the container can start a stream before 0 (an MP4
        AAC track's priming packet: the decoder needs it for the first samples, and the muxer's edit list hides it)."""
        if packet.pts is None:
            return False
        start = packet.pts * packet.time_base
        end = start + (packet.duration or 0) * packet.time_base
        return end < self.origin or (start < self.origin and not self.starts_before_origin)

    def close(self) -> None:
        for index in self.encoders:
            self.output.mux(self.map[index].encode(None))
        self.input.close()


def _drop_samples(frame: av.AudioFrame, count: int) -> av.AudioFrame:
    """The frame without its first `count` samples (0 < count < frame.samples)."""
    array = frame.to_ndarray()  # planar: [channels, samples]; packed: [1, samples * channels]
    step = 1 if frame.format.is_planar else frame.layout.nb_channels
    cut = av.AudioFrame.from_ndarray(np.ascontiguousarray(array[:, count * step:]), format=frame.format.name,
                                     layout=frame.layout)
    cut.sample_rate = frame.sample_rate
    return cut


# Container and stream tags that the muxer writes itself (never copied), and the only source tags an anonymized
# video keeps by default: they say when and in what language, not who or where. A deny-list would let through a
# title that names the person filmed ("Commentary by ..." on an audio track), a comment, or any vendor's location
# key it does not know.
_MUXER_TAGS = ("encoder", "major_brand", "minor_version", "compatible_brands", "duration", "handler_name", "vendor_id")
KEPT_TAGS = ("creation_time", "language")


def _kept_tags(tags, keep_all: bool) -> dict:
    """The tags to copy: those in KEPT_TAGS, or (keep_all) every one the muxer does not write."""
    return {k: v for k, v in tags.items() if k.lower() not in _MUXER_TAGS and (keep_all or k.lower() in KEPT_TAGS)}


def _source_tags(path: Path, keep_all: bool = False) -> tuple[dict, dict]:
    """The source's container tags and its (first) video stream's tags to copy (see _kept_tags); the audio
    streams' own are copied by _AudioPassthrough."""
    with av.open(str(path)) as container:
        return _kept_tags(container.metadata, keep_all), _kept_tags(container.streams.video[0].metadata, keep_all)
