"""What each output container takes: its muxer, the video encoders that work in it (the default first), the audio
it can hold by stream copy, and what other audio is re-encoded to.

libav's own answer (`OutputContainer.supported_codecs`) is incomplete for muxers without a codec table: MPEG-TS
claims to hold only MPEG-2 video and no AAC, so its audio used to be re-encoded and lost its timing. The table
below is checked, pair by pair, by tests/test_containers.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import av

from deid.errors import MediaError


@dataclass(frozen=True)
class ContainerSpec:
    format: str  # libav muxer name
    codecs: tuple[str, ...]  # video encoders it holds, the default first
    audio_encoder: str | None  # what audio it cannot hold as it is becomes (None: the container holds no audio)
    copy_audio: tuple[str, ...] | None = None  # audio codecs copied as they are (None: ask the muxer)
    reorder: bool = True  # False: no presentation timestamps in the file (AVI): encode without B-frames
    # False: the muxer writes the pixel aspect ratio only from a stream field PyAV cannot set (Matroska, WebM, AVI),
    # so it survives only inside codecs that carry it themselves (SAR_IN_BITSTREAM).
    writes_sar: bool = True


_MP4 = ContainerSpec("mp4", ("libx264", "libx265", "libsvtav1", "libvpx-vp9", "mpeg4", "mjpeg"), "aac")
CONTAINERS: dict[str, ContainerSpec] = {
    ".mp4": _MP4,
    ".m4v": _MP4,
    ".mov": ContainerSpec("mov", ("libx264", "libx265", "prores_ks", "mpeg4", "mjpeg"), "aac"),
    ".mkv": ContainerSpec("matroska", ("libx264", "libx265", "libvpx-vp9", "libsvtav1", "ffv1", "prores_ks", "mpeg4",
                                       "mjpeg"), "aac", writes_sar=False),
    ".webm": ContainerSpec("webm", ("libvpx-vp9", "libsvtav1", "libvpx"), "libopus", writes_sar=False),
    # AVI stores no presentation times: reordered (B-) frames would shift the video against the audio, and even
    # without B-frames an H.264 stream in AVI reads back one frame late, so MPEG-4 part 2 is the default.
    ".avi": ContainerSpec("avi", ("mpeg4", "mjpeg", "ffv1", "libvpx-vp9", "msmpeg4v2"), "pcm_s16le",
                          copy_audio=("pcm_s16le", "pcm_u8", "pcm_mulaw", "pcm_alaw", "mp3", "mp2", "ac3"), reorder=False,
                          writes_sar=False),
    ".ts": ContainerSpec("mpegts", ("libx264", "libx265", "mpeg2video"), "aac",
                         copy_audio=("aac", "mp2", "mp3", "ac3", "eac3", "opus")),
    ".mpg": ContainerSpec("mpeg", ("mpeg2video",), "mp2", copy_audio=("mp2", "mp3", "ac3")),
    ".mpeg": ContainerSpec("mpeg", ("mpeg2video",), "mp2", copy_audio=("mp2", "mp3", "ac3")),
    ".flv": ContainerSpec("flv", ("libx264",), "aac", copy_audio=("aac", "mp3")),
    ".wmv": ContainerSpec("asf", ("wmv2", "msmpeg4v2", "libx264"), "wmav2"),
    ".3gp": ContainerSpec("3gp", ("libx264", "mpeg4"), "aac", copy_audio=("aac",)),
    ".gif": ContainerSpec("gif", ("gif",), None),  # animated GIF: no audio
}


# Encoders whose bitstream holds the pixel aspect ratio (H.264/HEVC VUI, MPEG-4 VOL, MPEG-2 sequence header, JFIF).
SAR_IN_BITSTREAM = ("libx264", "libx265", "mpeg4", "mpeg2video", "mjpeg")


def keeps_sar(spec: ContainerSpec, codec: str) -> bool:
    """Whether an output of this container and encoder keeps a non-square pixel aspect ratio."""
    return spec.writes_sar or codec in SAR_IN_BITSTREAM


@lru_cache(maxsize=None)
def encoder_name(codec: str) -> str | None:
    """The video encoder `codec` names in this build of libav (`h264` -> `libx264`), or None if there is none."""
    try:
        found = av.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - av raises several kinds for an unknown name
        return None
    return found.name if found.type == "video" else None


def container_for(path) -> ContainerSpec:
    """The spec of an output path's container, by its suffix. Raises MediaError for a suffix deid cannot write."""
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        raise MediaError(f"{path}: deid cannot write {suffix or 'files without a suffix'} videos. "
                         f"Use one of {', '.join(CONTAINERS)}.")
    return CONTAINERS[suffix]


def usable_codecs(spec: ContainerSpec) -> list[str]:
    """The container's encoders that this build of libav has, the default first."""
    return [c for c in spec.codecs if encoder_name(c) == c]


def resolve_codec(requested: str | None, path) -> str:
    """The video encoder for an output path: `requested` (checked against the container) or the container's default.

    Raises MediaError naming the encoders that would work, before anything is opened."""
    spec = container_for(path)
    usable = usable_codecs(spec)
    suffix = f".{str(path).rsplit('.', 1)[-1].lower()}"
    if not usable:
        raise MediaError(f"{path}: this build of PyAV has no encoder for {suffix} ({', '.join(spec.codecs)}). "
                         "Choose another output type, e.g. .mkv.")
    if requested is None:
        return usable[0]
    name = encoder_name(requested)
    if name is None:
        raise MediaError(f"--codec {requested}: no such video encoder here. For {suffix} use one of: {', '.join(usable)}.")
    if name not in spec.codecs:
        raise MediaError(f"--codec {requested}: a {suffix} file cannot hold it. For {suffix} use one of: "
                         f"{', '.join(usable)} (or an output type that takes {requested}).")
    return name


def takes_audio(spec: ContainerSpec, codec: str, supported: set[str] | frozenset[str] | None) -> bool:
    """Whether the container holds an audio stream of `codec` as it is (stream copy)."""
    if spec.copy_audio is not None:
        return codec in spec.copy_audio
    return supported is None or codec in supported
