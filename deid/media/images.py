"""Still images: read (upright per EXIF), write (atomically), and convert between uint8 HWC arrays and
float CHW tensors in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deid.atomic import atomic_output
from deid.errors import MediaError
from deid.media.stills import IMAGE_EXTENSIONS, load_still

__all__ = ["IMAGE_EXTENSIONS", "load_image", "save_image", "to_tensor", "to_uint8"]


def load_image(path: str | Path) -> np.ndarray:
    """Read a photo as [H, W, 3] uint8 RGB, upright per its EXIF orientation (16-bit and gray photos scaled and
    spread to RGB; a file with several frames is refused: see deid.media.stills). Raises MediaError."""
    return load_still(path).rgb


def save_image(image: np.ndarray, path: str | Path, overwrite: bool = False) -> Path:
    """Write [H, W, 3] uint8 RGB to `path`, atomically (format from its suffix). Returns the path.

    Refuses an existing file unless `overwrite`; raises MediaError naming the path when the format is unknown
    or the disk refuses."""
    path = Path(path)
    with atomic_output(path, overwrite) as tmp:
        try:
            Image.fromarray(np.ascontiguousarray(image)).save(tmp, format=Image.registered_extensions().get(path.suffix.lower()))
        except (ValueError, KeyError) as exc:
            raise MediaError(f"{path}: cannot write this image format ({exc}). Use a .png or .jpg output path.") from None
        except OSError as exc:
            raise MediaError(f"{path}: could not write the image ({exc.strerror or exc}). Check the disk and the folder's permissions.") from None
    return path


def to_tensor(crops: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """[N, S, S, 3] (or [S, S, 3]) uint8 RGB -> float [N, 3, S, S] (or [3, S, S]) in [-1, 1], on `device`.

    The bytes travel to the device as uint8 (a quarter of float32's) and are converted there."""
    t = torch.from_numpy(np.ascontiguousarray(crops)).to(device).float().div_(127.5).sub_(1.0)
    return t.movedim(-1, -3)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, S, S] (or [3, S, S]) in about [-1, 1] -> [N, S, S, 3] (or [S, S, 3]) uint8 RGB.

    The published StyleGAN convention (x * 127.5 + 128, clamped, truncated: round half up), so generated
    datasets, figures and videos quantise a generator's output alike."""
    t = images.detach().float().mul(127.5).add_(128).clamp_(0, 255).to(torch.uint8)
    return t.movedim(-3, -1).cpu().numpy()
