"""Photos as users hand them, kept in their own format: grayscale stays grayscale, alpha stays, 16 bits stay 16.

The networks see [H, W, 3] uint8 RGB (`Still.rgb`); `save_still` writes the result back in the photo's own
channels and bit depth, every pixel the face replacement left alone keeping its exact original value (so a
16-bit photo keeps 16 bits outside the faces). Files with several frames (animated WebP/PNG/GIF, multi-page
TIFF) are refused: deid would otherwise write their first frame alone. HEIC needs the optional pillow-heif.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deid.errors import MediaError

# Photo types deid reads as stills (never as videos, though libav opens some of them). HEIC/HEIF open only with the
# pillow-heif plugin; AVIF with Pillow's own (11.3 and later). A GIF or PNG with several frames is refused.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".gif", ".apng")
HEIF_EXTENSIONS = (".heic", ".heif")
# EXIF orientation -> the numpy transform that shows the stored pixels upright (as ImageOps.exif_transpose does).
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}
# PIL modes kept as they are, and the ones read through a conversion (what `Still.mode` becomes).
_KEPT = ("1", "L", "LA", "RGB", "RGBA", "CMYK")
_CONVERTED = {"I;16": "L16", "I;16L": "L16", "I;16B": "L16", "I;16N": "L16", "I": "L16", "RGBX": "RGB", "RGBa": "RGBA",
              "La": "LA", "PA": "RGBA"}


@dataclass
class Still:
    """A photo, upright. rgb: [H, W, 3] uint8 (what detection and the networks see); pixels: the same picture in the
    file's own format ([H, W] or [H, W, C]; bool, uint8 or uint16); mode: 1, L, LA, L16, RGB, RGBA, RGB16, RGBA16
    or CMYK; info: what is written back (ICC profile, resolution)."""

    rgb: np.ndarray
    pixels: np.ndarray
    mode: str
    info: dict = field(default_factory=dict)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of [..., 3] uint8 RGB as float in [0, 255] (PIL's own RGB -> L weights)."""
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _open(path: Path) -> Image.Image:
    if path.suffix.lower() in HEIF_EXTENSIONS:
        try:
            import pillow_heif  # lazy: optional (pip install pillow-heif), only HEIC/HEIF photos need it
        except ImportError:
            raise MediaError(f"{path}: reading HEIC/HEIF photos needs the pillow-heif package (pip install pillow-heif). "
                             "Or convert it to JPEG or PNG first.") from None
        pillow_heif.register_heif_opener()
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable image ({exc.__class__.__name__}). Check that the file is complete, "
                         "or convert it to PNG or JPEG.") from None


def load_still(path: str | Path) -> Still:
    """Read a photo in its own format, upright per its EXIF orientation. Raises MediaError (missing, unreadable,
    several frames)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file. Check the path.")
    with _open(path) as image:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            kind = "pages" if image.format == "TIFF" else "frames"
            raise MediaError(f"{path}: holds {frames} {kind}; deid anonymizes single pictures and would keep only the first. "
                             f"Convert it to a video (e.g. ffmpeg -i {path.name} {path.stem}.mp4) or split it into single images.")
        info = {k: image.info[k] for k in ("icc_profile", "dpi") if k in image.info}
        # Before anything loads the pixels (getexif does, for PNG): the undecoded tile names the sample depth.
        deep = image.mode in ("RGB", "RGBA") and ";16" in str(image.tile[0].args if image.tile else "")
        try:
            if deep:
                return _load_deep_colour(path, image.getexif().get(0x0112, 1), info)
            image = ImageOps.exif_transpose(image)
            return _from_pil(image, info)
        except (OSError, ValueError) as exc:
            raise MediaError(f"{path}: not a readable image ({exc.__class__.__name__}). Check that the file is complete, "
                             "or convert it to PNG or JPEG.") from None


def _from_pil(image: Image.Image, info: dict) -> Still:
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    elif mode in _CONVERTED and _CONVERTED[mode] != "L16":
        image = image.convert(_CONVERTED[mode])
        mode = image.mode
    elif mode not in _KEPT and mode not in _CONVERTED:
        image = image.convert("RGB")  # e.g. YCbCr, LAB, HSV, F: written back as RGB
        mode = "RGB"
    if _CONVERTED.get(mode) == "L16":
        pixels = np.clip(np.array(image), 0, 65535).astype(np.uint16)
        gray = np.round(pixels / 257.0).astype(np.uint8)
        return Still(np.repeat(gray[..., None], 3, axis=-1), pixels, "L16", info)
    pixels = np.array(image)
    if mode in ("1", "L"):
        gray = pixels.astype(np.uint8) * (255 if mode == "1" else 1)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
    elif mode == "LA":
        rgb = np.repeat(pixels[..., :1], 3, axis=-1)
    elif mode == "CMYK":
        rgb = np.array(image.convert("RGB"))
    else:
        rgb = pixels[..., :3].copy()
    return Still(np.ascontiguousarray(rgb), pixels, mode, info)


def _load_deep_colour(path: Path, orientation: int, info: dict) -> Still:
    """16-bit RGB(A) PNG or TIFF, which PIL would cut to 8 bits: read with OpenCV, turned upright by hand."""
    stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if stored is None or stored.dtype != np.uint16 or stored.ndim != 3:
        raise OSError("unexpected layout")
    pixels = stored[..., [2, 1, 0, 3][: stored.shape[2]]]  # BGR(A) -> RGB(A)
    pixels = np.ascontiguousarray(_ORIENT.get(orientation, lambda a: a)(pixels))
    rgb = np.round(pixels[..., :3] / 257.0).astype(np.uint8)
    return Still(rgb, pixels, "RGBA16" if pixels.shape[2] == 4 else "RGB16", info)


def restore_format(still: Still, rgb: np.ndarray) -> np.ndarray:
    """The processed picture rgb [H, W, 3] uint8 in the still's own format; pixels equal to `still.rgb` keep their
    original values exactly (bit depth, gray levels, CMYK), changed ones take the new colour in that format."""
    changed = np.any(rgb != still.rgb, axis=-1)
    out = still.pixels.copy()
    mode = still.mode
    if mode == "RGB":
        return np.ascontiguousarray(rgb)
    if mode == "RGBA":
        out[..., :3] = rgb
    elif mode in ("RGB16", "RGBA16"):
        out[..., :3][changed] = rgb[changed].astype(np.uint16) * 257
    elif mode == "L16":
        out[changed] = np.round(_luma(rgb[changed]) * 257.0).astype(np.uint16)
    elif mode == "L":
        out[changed] = np.round(_luma(rgb[changed])).astype(np.uint8)
    elif mode == "LA":
        out[..., 0][changed] = np.round(_luma(rgb[changed])).astype(np.uint8)
    elif mode == "1":
        out[changed] = _luma(rgb[changed]) >= 128
    elif mode == "CMYK":
        out[changed] = np.array(Image.fromarray(rgb).convert("CMYK"))[changed]
    return out


def save_still(still: Still, rgb: np.ndarray, path: str | Path) -> list[str]:
    """Write the processed picture rgb [H, W, 3] uint8 to `path` (format from its suffix) in the still's own format
    (see `restore_format`). Returns what was lost, in words, when that format cannot hold it (e.g. alpha in JPEG)."""
    path = Path(path)
    pixels = restore_format(still, rgb)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    if still.mode in ("RGB16", "RGBA16"):
        if path.suffix.lower() in (".png", ".tif", ".tiff"):  # PIL cannot write 16-bit colour; OpenCV can
            ok, data = cv2.imencode(path.suffix.lower(), np.ascontiguousarray(pixels[..., [2, 1, 0, 3][: pixels.shape[2]]]))
            if ok:
                path.write_bytes(data.tobytes())
                return []
    elif not (jpeg and still.mode not in ("L", "RGB", "CMYK", "1")):
        image = (Image.frombytes("CMYK", (pixels.shape[1], pixels.shape[0]), pixels.tobytes()) if still.mode == "CMYK"
                 else Image.fromarray(pixels))
        try:
            image.save(path, **still.info, **({"quality": 95} if jpeg else {}))
            return []
        except (OSError, ValueError, KeyError):
            pass  # the format cannot hold this mode: 8-bit RGB below
    gray = still.mode in ("1", "L", "LA", "L16")
    Image.fromarray(np.round(_luma(rgb)).astype(np.uint8) if gray else rgb).save(
        path, **still.info, **({"quality": 95} if jpeg else {}))
    return [f"{path.suffix} cannot hold the photo's {still.mode} pixels: written as 8-bit {'gray' if gray else 'RGB'}"]
