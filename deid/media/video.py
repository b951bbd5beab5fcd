"""Video I/O: probe, streaming decode and encode with exact timestamps, audio and metadata passthrough.

Everything runs on PyAV (its bundled libav), not on the ffmpeg binary: PyAV gives the exact rational frame rate,
every frame's pts (so VFR timing survives), the display matrix (rotation), the SAR, and packet-level stream copy of
the audio in the same pass as the video encode. The ffmpeg binary (`ffmpeg_exe`) is only used to make test clips.
Frames are handled as stored (not rotated); `to_display`/`points_to_stored` convert for face detection.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from deid.errors import MediaError

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
        rotation = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue
                pts.append(packet.pts)
                ends.append(packet.pts + (packet.duration or 0))
            container.seek(0)
            for frame in container.decode(stream):
                rotation = int(round(frame.rotation or 0)) % 360
                break
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: corrupt video ({_reason(exc)}). Re-export or repair the file.") from None
        if not pts:
            raise MediaError(f"{path}: holds no video frames. Check that the file is complete.")
        first, last_end = min(pts), max(ends)
        rate = Fraction(stream.average_rate or stream.guessed_rate or 25)
        grid = (np.array(sorted(pts), np.float64) - first) * float(tb) * float(rate)
        constant_rate = bool(np.all(np.abs(grid - np.arange(len(grid))) * float(1 / rate) <= float(tb) + 1e-9))
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
        )
    finally:
        container.close()


def frame_times(path: str | Path) -> np.ndarray:
    """Presentation times (seconds, sorted) of every video frame, from the packets."""
    container = _open(Path(path))
    try:
        stream = _video_stream(container, Path(path))
        pts = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
        return np.array(pts, np.float64) * float(stream.time_base)
    finally:
        container.close()


def audio_duration(path: str | Path, index: int) -> float:
    """Seconds of audio in stream `index`, from its packets (first start to last end)."""
    container = _open(Path(path))
    try:
        stream = container.streams[index]
        spans = [(p.pts, p.pts + (p.duration or 0)) for p in container.demux(stream) if p.size and p.pts is not None]
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
    """Decode a video one frame at a time (memory stays flat). Raises MediaError on corrupt data."""
    path = Path(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        index, last_pts = 0, None
        step = max(1, round(1 / (stream.average_rate or 25) / stream.time_base)) if stream.time_base else 1
        try:
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else (0 if last_pts is None else last_pts + step)
                last_pts = pts
                yield Frame(index, pts, int(frame.duration or 0), frame.to_ndarray(format="rgb24"))
                index += 1
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: corrupt video at frame {index} ({_reason(exc)}). Re-export or repair the file.") from None
        if index == 0:
            raise MediaError(f"{path}: holds no decodable video frames. Check that the file is complete.")
    finally:
        container.close()


# ------------------------------------------------------------------------------------------- encode


@dataclass(frozen=True)
class EncodeOptions:
    codec: str = "libx264"
    crf: int = 18
    pix_fmt: str = "yuv420p"  # odd-sized frames fall back to yuv444p: 4:2:0 needs even sides
    preset: str = "medium"
    # Container tags: only when and in what language (KEPT_TAGS) unless True, when every tag of the source is
    # copied (title, comment, artist, vendor keys, GPS...): those can name or locate the people filmed.
    keep_metadata: bool = False


class VideoWriter:
    """Encode frames with the source's exact timestamps, copying the source's audio and metadata alongside.

    `source` is a probed video, or `VideoInfo.for_frames(...)` for frames made in memory (figures, clips).

    Audio packets are copied (no re-encode) when the output container takes the codec, else re-encoded to AAC;
    they are interleaved with the video as it is written, so memory stays flat. Use as a context manager; on an
    exception the file is closed and left for the caller (who writes to a temporary path) to delete.
    """

    def __init__(self, path: str | Path, source: VideoInfo, options: EncodeOptions = EncodeOptions(),
                 size: tuple[int, int] | None = None, keep_audio: bool = True, rotation: int | None = None):
        self.path = Path(path)
        self.source = source
        width, height = size or (source.width, source.height)
        self.container = av.open(str(self.path), mode="w", format=_format_for(self.path))
        if source.path is not None:
            self.container.metadata.update(_container_metadata(source.path, keep_all=options.keep_metadata))
        stream = self.container.add_stream(options.codec, rate=source.frame_rate)
        stream.width, stream.height = width, height
        odd = width % 2 or height % 2
        stream.pix_fmt = "yuv444p" if odd and options.pix_fmt == "yuv420p" else options.pix_fmt
        # Constant-rate sources are written on the exact frame grid (time_base 1/rate), so 30000/1001 stays exact
        # even when the source container rounded its timestamps (MKV's milliseconds); VFR keeps every pts.
        self.time_base = 1 / source.frame_rate if source.constant_rate else source.time_base
        stream.codec_context.time_base = self.time_base
        stream.time_base = self.time_base
        self.durations: dict[int, int] = {}  # pts -> duration of frames inside the encoder
        if source.sar != 1 and size is None:
            stream.codec_context.sample_aspect_ratio = source.sar
        if options.codec in ("libx264", "libx265"):
            stream.options = {"crf": str(options.crf), "preset": options.preset}
        elif options.codec.startswith("libvpx"):
            stream.options = {"crf": str(options.crf), "b": "0"}
        rotation = source.rotation if rotation is None else rotation
        if rotation:
            stream.set_display_rotation(rotation)
        self.video = stream
        self.audio = _AudioPassthrough(source.path, self.container) if keep_audio and source.audio else None
        self.frames = 0

    def write(self, image: np.ndarray, pts: int, duration: int = 0) -> None:
        """image: [H, W, 3] uint8 RGB; pts and duration (0: unknown) in the source's time_base."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        if self.source.constant_rate:
            frame.pts = round(pts * self.source.time_base * self.source.frame_rate)
            self.durations[frame.pts] = 1
        else:
            frame.pts = pts
            if duration:
                self.durations[pts] = duration
        frame.time_base = self.time_base
        self._mux(self.video.encode(frame))
        self.frames += 1

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
        self._mux(self.video.encode(None))
        if self.audio is not None:
            self.audio.copy_until(float("inf"))
            self.audio.close()
        self.container.close()

    def abort(self) -> None:
        try:
            if self.audio is not None:
                self.audio.close()
            self.container.close()
        except Exception:  # noqa: BLE001 - the file is being discarded; its trailer does not matter
            pass

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _AudioPassthrough:
    """The source's audio streams, demuxed lazily and muxed into the output up to a given time."""

    def __init__(self, source: Path, output: av.container.OutputContainer):
        self.input = av.open(str(source), mode="r")
        self.output = output
        self.map = {}
        self.encoders = {}
        supported = getattr(output, "supported_codecs", None)
        for stream in self.input.streams.audio:
            if supported is None or stream.codec_context.name in supported:
                self.map[stream.index] = output.add_stream_from_template(stream)
            else:
                # The container refuses this codec (e.g. PCM in MP4): re-encode it to AAC.
                out = output.add_stream("aac", rate=stream.codec_context.sample_rate, layout=stream.codec_context.layout)
                self.map[stream.index] = out
                self.encoders[stream.index] = stream
        self.packets = self.input.demux(*self.input.streams.audio)
        self.pending = None

    def copy_until(self, seconds: float) -> None:
        while True:
            if self.pending is None:
                self.pending = next(self.packets, None)
                if self.pending is None:
                    return
            packet = self.pending
            if packet.dts is not None and float(packet.dts * packet.time_base) > seconds:
                return
            self.pending = None
            self._write(packet)

    def _write(self, packet) -> None:
        index = packet.stream.index
        out = self.map[index]
        if index in self.encoders:
            frames = packet.decode() if packet.size else packet.stream.decode(None)
            for frame in frames:
                frame.pts = None  # the encoder counts samples itself; the stream starts with the video
                self.output.mux(out.encode(frame))
            return
        if packet.dts is None or not packet.size:
            return
        packet.stream = out
        self.output.mux(packet)

    def close(self) -> None:
        for index in self.encoders:
            self.output.mux(self.map[index].encode(None))
        self.input.close()


def _format_for(path: Path) -> str | None:
    return {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".gif": "gif"}.get(path.suffix.lower())


# Container tags that the muxer writes itself (never copied), and the only source tags an anonymized video keeps by
# default: they say when and in what language, not who or where. A deny-list would let through a title that names
# the person filmed, a comment, or any vendor's location key it does not know.
_MUXER_TAGS = ("encoder", "major_brand", "minor_version", "compatible_brands")
KEPT_TAGS = ("creation_time", "language")


def _container_metadata(path: Path, keep_all: bool = False) -> dict:
    """The source's container tags to copy: those in KEPT_TAGS, or (keep_all) every one the muxer does not write."""
    with av.open(str(path)) as container:
        return {k: v for k, v in container.metadata.items()
                if k.lower() not in _MUXER_TAGS and (keep_all or k.lower() in KEPT_TAGS)}
