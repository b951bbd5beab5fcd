"""The paper's picture layout: result cells with their identity inputs along the top and attribute inputs
down the left, optionally labelled. Shared by `deid mix` and the training sample grids.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from deid.media.images import to_uint8

GRID_GAP = 4  # pixels of white between cells


def to_cells(images: torch.Tensor, size: int | None = None) -> np.ndarray:
    """[N, 3, R, R] in [-1, 1] -> [N, size, size, 3] uint8 RGB (area-filtered when smaller than R)."""

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
