"""Paste generated heads back into frames: inverse warp, feathered mask, colour matched to the original face."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np


@dataclass(frozen=True)
class PasteConfig:
    # The pasted region is an ellipse in crop coordinates (fractions of the crop side): the face and the
    # hairline, not the crop's background, which the generator invents and would show as a square seam.
    centre: tuple[float, float] = (0.5, 0.55)
    axes: tuple[float, float] = (0.33, 0.42)
    feather: float = 0.06  # width of the soft edge, fraction of the crop side
    colour_match: bool = True  # match mean/std (LAB) of the generated face to the original face
    fill_sigma: float = 0.08  # `fill_head`'s Gaussian sigma, fraction of the crop side (the audit's blur strength)


@lru_cache(maxsize=8)
def face_mask(size: int, config: PasteConfig = PasteConfig()) -> np.ndarray:
    """[size, size] float32 in [0, 1]: 1 inside the face ellipse, falling off smoothly across its edge."""
    mask = np.zeros((size, size), np.float32)
    centre = (round(config.centre[0] * size), round(config.centre[1] * size))
    axes = (round(config.axes[0] * size), round(config.axes[1] * size))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, thickness=-1)
    sigma = max(config.feather * size / 2, 0.5)
    # Erode before blurring so the blurred edge stays inside the ellipse rather than spilling past it.
    inset = int(round(config.feather * size / 2))
    if inset > 0:
        mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * inset + 1, 2 * inset + 1)))
    return cv2.GaussianBlur(mask, (0, 0), sigma)


def match_colour(generated: np.ndarray, original: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Shift the generated crop's LAB mean and std (weighted by `weight` [S, S]) to the original crop's.

    generated, original: [S, S, 3] uint8 RGB. Returns [S, S, 3] uint8 RGB. Keeps the scene's skin tone and light.
    """
    gen = cv2.cvtColor(generated, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref = cv2.cvtColor(original, cv2.COLOR_RGB2LAB).astype(np.float32)
    w = weight[..., None] / max(float(weight.sum()), 1e-6)
    mean_g, mean_r = (gen * w).sum((0, 1)), (ref * w).sum((0, 1))
    std_g = np.sqrt(((gen - mean_g) ** 2 * w).sum((0, 1))) + 1e-3
    std_r = np.sqrt(((ref - mean_r) ** 2 * w).sum((0, 1)))
    gain = np.clip(std_r / std_g, 0.5, 2.0)  # bounded: a flat original must not blow up the generated texture
    out = (gen - mean_g) * gain + mean_r
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def paste_head(frame: np.ndarray, head: np.ndarray, affine: np.ndarray, original: np.ndarray | None = None,
               config: PasteConfig = PasteConfig()) -> np.ndarray:
    """Blend a generated head into the frame, in place, and return the frame.

    frame: [H, W, 3] uint8 RGB; head: [S, S, 3] uint8 RGB (the generator's output for this crop);
    affine: [2, 3] frame -> crop (as used to cut the crop); original: the original crop [S, S, 3] uint8 for colour
    matching (None: no matching). Only the bounding rectangle of the crop in the frame is touched.
    """
    size = head.shape[0]
    mask = face_mask(size, config)
    if original is not None and config.colour_match:
        head = match_colour(head, original, mask)
    affine = np.asarray(affine, np.float64)
    inverse = cv2.invertAffineTransform(affine)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
    height, width = frame.shape[:2]
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return frame
    # frame -> crop for the region only: shift the origin to (x0, y0).
    local = affine.copy()
    local[:, 2] += affine[:, :2] @ np.array([x0, y0], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    region = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(head, local, region, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, local, region, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
    roi = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = np.clip(roi + alpha * (warped.astype(np.float32) - roi) + 0.5, 0, 255).astype(np.uint8)
    return frame


def fill_head(frame: np.ndarray, crop: np.ndarray, affine: np.ndarray,
              config: PasteConfig = PasteConfig()) -> np.ndarray:
    """Cover where a face is predicted but not seen, in place, and return the frame: the crop blurred (Gaussian,
    sigma = fill_sigma x its side) and blended back under the same feathered ellipse as a head. The place is
    covered (the face may be there, missed by the detector) and no head is invented (there may be nobody).

    frame: [H, W, 3] uint8 RGB; crop: [S, S, 3] uint8, cut from the frame with affine [2, 3] frame -> crop."""
    sigma = max(config.fill_sigma * crop.shape[0], 0.5)
    blurred = cv2.GaussianBlur(crop, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    return paste_head(frame, blurred, affine, original=None, config=config)
