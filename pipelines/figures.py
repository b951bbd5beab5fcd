"""The paper's figures from photos: identity x attribute grids (Fig. 2/4) and interpolations (Fig. 11/12/16/17).

Both take any photos: each is detected and aligned with `deid.faces.alignment.align_photo`, the same code the video
pipeline uses, and run through a trained `Disentangler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from deid.atomic import atomic_output, check_output_path
from deid.errors import DeidError
from deid.faces.alignment import align_photo_file
from deid.faces.detection import FaceDetector
from deid.grid import GRID_GAP, grid_image, to_cells
from deid.media.images import load_image, save_image
from deid.media.video import EncodeOptions, VideoInfo, VideoWriter
from deid.nets.model import mix_grid
from deid.devices import Precision

CPU = torch.device("cpu")


@dataclass(frozen=True)
class MixJob:
    """`deid mix`: identities along the top, attribute sources down the left."""

    identities: tuple[Path, ...]
    attributes: tuple[Path, ...]
    output: Path
    cell_size: int | None = None  # None: the generator's resolution
    labels: bool = True
    overwrite: bool = False

    def check(self) -> None:
        """Refuse bad options and paths before any model is loaded (DeidError)."""
        if not self.identities or not self.attributes:
            raise DeidError("give at least one --identity and one --attributes photo.")
        if self.output.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            raise DeidError(f"{self.output}: the grid is an image. Use a .png or .jpg output path.")
        check_output_path(self.output, self.overwrite)
        for photo in dict.fromkeys(self.identities + self.attributes):
            load_image(photo)  # a missing or unreadable photo is named now, not after the model loaded


@dataclass(frozen=True)
class InterpolateJob:
    """`deid interpolate`: vary one code from `start` to `end` while `fixed` supplies the other."""

    vary: Literal["identity", "attributes"]
    space: Literal["w", "z"]
    start: Path
    end: Path
    fixed: Path
    output: Path
    steps: int = 9  # images in a .png/.jpg strip
    fps: float = 25.0
    seconds: float = 3.0  # video length for .mp4/.gif outputs
    cell_size: int | None = None
    overwrite: bool = False

    def check(self) -> None:
        """Refuse bad options and paths before any model is loaded (DeidError)."""
        if self.vary not in ("identity", "attributes") or self.space not in ("w", "z"):
            raise DeidError(f"--vary {self.vary} --space {self.space}: use --vary identity|attributes and --space w|z.")
        if self.output.suffix.lower() not in STRIP_SUFFIXES + CLIP_SUFFIXES:
            raise DeidError(f"{self.output}: use a .png/.jpg (a strip of --steps images) or .mp4/.gif (a video) output path.")
        interpolation_weights(self.steps)  # at least 2
        check_output_path(self.output, self.overwrite)
        for photo in dict.fromkeys((self.start, self.end, self.fixed)):
            load_image(photo)  # a missing or unreadable photo is named now, not after the model loaded


STRIP_SUFFIXES = (".png", ".jpg", ".jpeg")
CLIP_SUFFIXES = (".mp4", ".gif")


def aligned_heads(paths: Sequence[Path], resolution: int) -> torch.Tensor:
    """Detect and align the largest face of each photo (a photo without one is named in the error).
    Returns [N, 3, R, R] float in [-1, 1]."""

    detector = FaceDetector()
    return torch.stack([align_photo_file(p, resolution, detector=detector).tensor for p in paths])


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


def run_mix(job: MixJob, model, device: torch.device = CPU, precision: Precision = Precision()) -> Path:
    """Write the identity x attribute grid of `job` and return its path. `model` lives on `device`; its
    networks run in `precision` (autocast)."""
    job.check()
    ids = aligned_heads(job.identities, model.resolution)
    attrs = aligned_heads(job.attributes, model.resolution)
    cells = mix_grid(model, ids.to(device), attrs.to(device), precision).float()
    grid = grid_image(cells, ids, attrs, job.cell_size,
                      [p.stem for p in job.identities] if job.labels else None,
                      [p.stem for p in job.attributes] if job.labels else None)
    save_image(grid, job.output, job.overwrite)
    return job.output


def run_interpolate(job: InterpolateJob, model, device: torch.device = CPU, precision: Precision = Precision()) -> Path:
    """Write the interpolation of `job`: a strip (.png/.jpg), or a smooth eased video (.mp4/.gif).
    `model` lives on `device`; its networks run in `precision` (autocast)."""
    job.check()
    suffix = job.output.suffix.lower()
    start, end, fixed = aligned_heads([job.start, job.end, job.fixed], model.resolution).to(device)
    size = job.cell_size or model.resolution
    if suffix in STRIP_SUFFIXES:
        t = interpolation_weights(job.steps)
        with torch.no_grad():
            with precision.encoding(device):
                w = interpolation_codes(model, job.vary, job.space, start, end, fixed, t)
            with precision.generating(device):
                images = to_cells(model.generate(w), size)
        strip = np.concatenate([np.pad(im, ((0, 0), (0, GRID_GAP), (0, 0)), constant_values=255) for im in images], axis=1)
        save_image(strip[:, :-GRID_GAP], job.output, job.overwrite)
        return job.output
    frames = max(2, round(job.fps * job.seconds))
    t = interpolation_weights(frames, ease=True)
    with torch.no_grad(), precision.encoding(device):
        path_w = interpolation_codes(model, job.vary, job.space, start, end, fixed, t)
    options = EncodeOptions(codec="gif", pix_fmt="rgb8") if suffix == ".gif" else EncodeOptions()
    clip = VideoInfo.for_frames(size, size, Fraction(job.fps).limit_denominator(1001))
    with torch.no_grad(), precision.generating(device):
        with atomic_output(job.output, job.overwrite) as tmp, VideoWriter(tmp, clip, options) as writer:
            for index, w in enumerate(path_w):
                writer.write(to_cells(model.generate(w[None]), size)[0], pts=index)
    return job.output
