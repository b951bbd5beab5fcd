"""The paper's figures from photos: identity x attribute grids (Fig. 2/4) and interpolations (Fig. 11/12/16/17).

Both take any photos: each is detected and aligned with `deid.faces.align_photo`, the same code the video
pipeline uses, and run through a trained `Disentangler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import cv2
import numpy as np
import torch

from deid.atomic import atomic_output
from deid.errors import DeidError
from deid.runtime import autocast

CPU = torch.device("cpu")

GRID_GAP = 4  # pixels of white between cells


@dataclass(frozen=True)
class MixJob:
    """`deid mix`: identities along the top, attribute sources down the left."""

    identities: tuple[Path, ...]
    attributes: tuple[Path, ...]
    output: Path
    cell_size: int | None = None  # None: the generator's resolution
    labels: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class InterpolateJob:
    """`deid interpolate`: vary one code from `start` to `end` while `fixed` supplies the other."""

    vary: Literal["identity", "attributes"]
    space: Literal["w", "z"]
    start: Path
    end: Path
    fixed: Path
    steps: int
    output: Path
    fps: float = 25.0
    seconds: float = 3.0  # video length for .mp4/.gif outputs
    cell_size: int | None = None
    overwrite: bool = False


# ------------------------------------------------------------------------------------------ tensors


def aligned_heads(paths: Sequence[Path], resolution: int) -> torch.Tensor:
    """Detect and align the largest face of each photo (a photo without one is named in the error).
    Returns [N, 3, R, R] float in [-1, 1]."""
    from deid.faces import FaceDetector, align_photo_file

    detector = FaceDetector()
    return torch.stack([align_photo_file(p, resolution, detector=detector) for p in paths])


@torch.no_grad()
def mix_grid(model, identity_heads: torch.Tensor, attribute_heads: torch.Tensor) -> torch.Tensor:
    """Every (attribute source, identity) pair through the model.

    identity_heads: [C, 3, R, R], attribute_heads: [Rows, 3, R, R], both in [-1, 1].
    Returns [Rows, C, 3, R, R]: cell (r, c) has identity c and the attributes of row r.
    """
    id_codes = model.encode_identity(identity_heads)
    attr_codes = model.encode_attributes(attribute_heads)
    rows, cols = attr_codes.shape[0], id_codes.shape[0]
    w = model.map(id_codes.repeat(rows, 1), attr_codes.repeat_interleave(cols, dim=0))
    images = model.generate(w)
    return images.reshape(rows, cols, *images.shape[1:])


def interpolation_weights(steps: int, ease: bool = False) -> torch.Tensor:
    """`steps` points from 0 to 1 inclusive; with `ease`, slow at both ends (cosine ease-in-out)."""
    if steps < 2:
        raise DeidError(f"--steps {steps}: an interpolation needs at least 2 steps.")
    t = torch.linspace(0.0, 1.0, steps)
    return (1 - torch.cos(math.pi * t)) / 2 if ease else t


@torch.no_grad()
def interpolation_codes(model, vary: str, space: str, start: torch.Tensor, end: torch.Tensor, fixed: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
    """The w of every interpolation point.

    start, end, fixed: aligned heads [3, R, R] in [-1, 1]; t: [K] in [0, 1]. Returns w [K, w_dim].
    In W (Fig. 11/12) the endpoints are mapped once and their w's are blended; in Z (Fig. 16/17) the varied
    code (identity or attributes) is blended and every point goes through the mapper, which is what shows
    that M is not linear.
    """
    if vary not in ("identity", "attributes") or space not in ("w", "z"):
        raise DeidError(f"--vary {vary} --space {space}: use --vary identity|attributes and --space w|z.")
    heads = torch.stack([start, end, fixed])
    if vary == "identity":
        codes = model.encode_identity(heads[:2])
        other = model.encode_attributes(heads[2:]).expand(2, -1)
        endpoints = (codes, other)
    else:
        codes = model.encode_attributes(heads[:2])
        other = model.encode_identity(heads[2:]).expand(2, -1)
        endpoints = (other, codes)
    t = t.to(codes.dtype).to(codes.device)[:, None]
    if space == "w":
        w_ends = model.map(*endpoints)
        return torch.lerp(w_ends[0:1], w_ends[1:2], t)
    blended = torch.lerp(codes[0:1], codes[1:2], t)
    fixed_code = other[:1].expand(len(t), -1)
    return model.map(blended, fixed_code) if vary == "identity" else model.map(fixed_code, blended)


# ------------------------------------------------------------------------------------------ pictures


def to_cells(images: torch.Tensor, size: int | None = None) -> np.ndarray:
    """[N, 3, R, R] in [-1, 1] -> [N, size, size, 3] uint8 RGB (area-filtered when smaller than R)."""
    from deid.faces import to_uint8

    array = to_uint8(images)
    if size is None or size == array.shape[1]:
        return array
    interpolation = cv2.INTER_AREA if size < array.shape[1] else cv2.INTER_CUBIC
    return np.stack([cv2.resize(a, (size, size), interpolation=interpolation) for a in array])


def label_height(width: int) -> int:
    """Height of the label strips under cells `width` pixels wide."""
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, _label_scale(width), 1)
    return th + base + 8


def _label_scale(width: int) -> float:
    return max(0.3, min(0.6, width / 260))


def label_strip(text: str, width: int) -> np.ndarray:
    """A white strip [label_height(width), width, 3] uint8 with `text` centred in black (cut short if too long)."""
    scale = _label_scale(width)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    while tw > width - 4 and len(text) > 4:
        text = text[:-4] + "..."
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    strip = np.full((label_height(width), width, 3), 255, np.uint8)
    cv2.putText(strip, text, (max(2, (width - tw) // 2), th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def compose_grid(cells: np.ndarray, top: np.ndarray, left: np.ndarray, top_labels: Sequence[str] | None = None,
                 left_labels: Sequence[str] | None = None) -> np.ndarray:
    """The paper's layout: identity inputs along the top, attribute inputs down the left, results inside.

    cells: [Rows, C, S, S, 3], top: [C, S, S, 3], left: [Rows, S, S, 3], all uint8. With labels, each input
    carries its name under it. Returns [H, W, 3] uint8 on white.
    """
    rows, cols, size = cells.shape[0], cells.shape[1], cells.shape[2]
    label_h = label_height(size) if (top_labels or left_labels) else 0
    pitch = size + GRID_GAP
    height = (size + label_h + GRID_GAP) + rows * (pitch + label_h) - GRID_GAP
    width = (cols + 1) * pitch - GRID_GAP
    canvas = np.full((height, width, 3), 255, np.uint8)

    def put(image, y, x, label=None):
        canvas[y : y + size, x : x + size] = image
        if label is not None:
            canvas[y + size : y + size + label_h, x : x + size] = label_strip(label, size)

    for c in range(cols):
        put(top[c], 0, (c + 1) * pitch, top_labels[c] if top_labels else None)
    y0 = size + label_h + GRID_GAP
    for r in range(rows):
        y = y0 + r * (pitch + label_h)
        put(left[r], y, 0, left_labels[r] if left_labels else None)
        for c in range(cols):
            put(cells[r, c], y, (c + 1) * pitch)
    return canvas


def grid_image(cells: torch.Tensor, identity_heads: torch.Tensor, attribute_heads: torch.Tensor, size: int | None = None,
               identity_labels: Sequence[str] | None = None, attribute_labels: Sequence[str] | None = None) -> np.ndarray:
    """The picture of a `mix_grid` result with its inputs on the top and the left (see `compose_grid`).

    cells: [Rows, C, 3, R, R]; identity_heads: [C, 3, R, R]; attribute_heads: [Rows, 3, R, R]; all in [-1, 1].
    size: cell side in pixels (default R). Returns [H, W, 3] uint8 RGB."""
    size = size or cells.shape[-1]
    rows, cols = cells.shape[:2]
    return compose_grid(to_cells(cells.flatten(0, 1), size).reshape(rows, cols, size, size, 3),
                        to_cells(identity_heads, size), to_cells(attribute_heads, size), identity_labels, attribute_labels)


def write_image(path: Path, rgb: np.ndarray, overwrite: bool) -> None:
    with atomic_output(path, overwrite) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise DeidError(f"{path}: could not write the image. Use a .png or .jpg output path.")


# ------------------------------------------------------------------------------------------- runs


def run_mix(job: MixJob, model, device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> Path:
    """Write the identity x attribute grid of `job` and return its path. `model` lives on `device`; its
    networks run in `dtype` (autocast)."""
    if not job.identities or not job.attributes:
        raise DeidError("give at least one --identity and one --attributes photo.")
    if job.output.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise DeidError(f"{job.output}: the grid is an image. Use a .png or .jpg output path.")
    from deid.atomic import check_output_path

    check_output_path(job.output, job.overwrite)
    ids = aligned_heads(job.identities, model.resolution)
    attrs = aligned_heads(job.attributes, model.resolution)
    with autocast(device, dtype):
        cells = mix_grid(model, ids.to(device), attrs.to(device)).float()
    grid = grid_image(cells, ids, attrs, job.cell_size,
                      [p.stem for p in job.identities] if job.labels else None,
                      [p.stem for p in job.attributes] if job.labels else None)
    write_image(job.output, grid, job.overwrite)
    return job.output


def run_interpolate(job: InterpolateJob, model, device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> Path:
    """Write the interpolation of `job`: a strip (.png/.jpg), or a smooth eased video (.mp4/.gif).
    `model` lives on `device`; its networks run in `dtype` (autocast)."""
    suffix = job.output.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".mp4", ".gif"):
        raise DeidError(f"{job.output}: use a .png/.jpg (a strip of --steps images) or .mp4/.gif (a video) output path.")
    from deid.atomic import check_output_path

    check_output_path(job.output, job.overwrite)
    start, end, fixed = aligned_heads([job.start, job.end, job.fixed], model.resolution).to(device)
    size = job.cell_size or model.resolution
    if suffix in (".png", ".jpg", ".jpeg"):
        t = interpolation_weights(job.steps)
        with torch.no_grad(), autocast(device, dtype):
            images = to_cells(model.generate(interpolation_codes(model, job.vary, job.space, start, end, fixed, t)), size)
        strip = np.concatenate([np.pad(im, ((0, 0), (0, GRID_GAP), (0, 0)), constant_values=255) for im in images], axis=1)
        write_image(job.output, strip[:, :-GRID_GAP], job.overwrite)
        return job.output
    frames = max(2, round(job.fps * job.seconds))
    t = interpolation_weights(frames, ease=True)
    with torch.no_grad(), autocast(device, dtype):
        path_w = interpolation_codes(model, job.vary, job.space, start, end, fixed, t)
        with atomic_output(job.output, job.overwrite) as tmp:
            write_clip(tmp, job.fps, (to_cells(model.generate(w[None]), size)[0] for w in path_w))
    return job.output


def write_clip(path: Path, fps: float, frames) -> None:
    """Encode RGB uint8 frames [S, S, 3] as H.264 MP4 or GIF (by suffix) with PyAV, one frame at a time."""
    import av
    from fractions import Fraction

    rate = Fraction(fps).limit_denominator(1001)
    gif = path.suffix.lower() == ".gif"
    with av.open(str(path), "w", format="gif" if gif else "mp4") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("gif" if gif else "libx264", rate=rate)
                stream.width, stream.height = frame.shape[1] - frame.shape[1] % 2, frame.shape[0] - frame.shape[0] % 2
                stream.pix_fmt = "rgb8" if gif else "yuv420p"
                if not gif:
                    stream.options = {"crf": "18"}
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
