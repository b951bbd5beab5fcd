"""Generated datasets (images of the pretrained generator and their w): layout, reader and verification.

Layout of a dataset directory (written by train/make_dataset.py):

    manifest.json                 written last (atomically): generator identity, seed, truncation (ψ) and
                                  truncation_cutoff (the style rows it reaches), count, ...
    images/00000/00000000.png     sample i as lossless 8-bit RGB PNG, 1000 per folder
    ws.npy                        float32 [count, w_dim]: the w fed to the synthesis for each sample
    image_sha256.npy              uint8 [count, 32]: sha256 of each PNG file
    image_bytes.npy               int64 [count]: size of each PNG file

While a run is in progress the directory holds `run.json` (its settings) and `parts/` (w and hashes of
finished batches); the final step consolidates them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from deid.errors import DatasetError
from deid.weights import file_sha256

FORMAT = "deid-generated-v1"
SHARD_SIZE = 1000
MANIFEST = "manifest.json"
RUN_FILE = "run.json"


def image_relpath(index: int) -> str:
    return f"images/{index // SHARD_SIZE:05d}/{index:08d}.png"


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = ("an interrupted run: continue it with `deid make-dataset ... --resume`"
                if (Path(root) / RUN_FILE).is_file() else "make one with `deid make-dataset`")
        raise DatasetError(f"{root}: not a complete generated dataset (no {MANIFEST}); {hint}.")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable ({exc}). Re-create the dataset with `deid make-dataset`.") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}. Re-create the dataset.")
    return manifest


def truncation_text(manifest: dict) -> str:
    """A dataset's truncation in words. deid truncates every style row or none (train/make_dataset.py
    `truncated_rows`); datasets recorded before `truncation_cutoff` existed truncated every row too."""
    psi = float(manifest.get("truncation", 1.0))
    return "no truncation" if psi == 1 else f"truncation ψ {psi:g} on every style row"


def decode_png(path: Path) -> np.ndarray:
    """[R, R, 3] uint8 RGB."""

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: unreadable image. Check the dataset with `deid make-dataset --verify`.")
    return img[:, :, ::-1]


class GeneratedDataset(torch.utils.data.Dataset):
    """(image float32 [3, R, R] in [-1, 1], w float32 [w_dim]) pairs of a finished dataset.

    w's are memory-mapped (no per-item file opens); images decode with OpenCV. Safe in DataLoader workers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.count = int(self.manifest["count"])
        self._ws = None  # opened lazily, once per process (DataLoader workers fork)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ws": None}  # spawned workers re-open the memory map instead of copying it

    @property
    def ws(self) -> np.ndarray:
        if self._ws is None:
            self._ws = np.load(self.root / "ws.npy", mmap_mode="r")
        return self._ws

    def image_uint8(self, index: int) -> np.ndarray:
        """Sample `index` as [R, R, 3] uint8 RGB."""
        return decode_png(self.root / image_relpath(index))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        img = torch.from_numpy(np.ascontiguousarray(self.image_uint8(index))).permute(2, 0, 1).float() / 127.5 - 1
        return img, torch.from_numpy(np.array(self.ws[index], dtype=np.float32))


def verify_dataset(root: str | Path, deep: bool = False, on_progress=None) -> dict:
    """Check that a dataset is complete and uncorrupted; returns its manifest, raises DatasetError.

    Always: manifest, ws.npy (shape, dtype, sha256), every image present with its recorded size.
    deep=True also hashes every image against its recorded sha256. `on_progress(n_done)` is called as
    images are checked."""
    root = Path(root)
    manifest = read_manifest(root)
    count, w_dim = int(manifest["count"]), int(manifest["w_dim"])
    problems: list[str] = []
    for name in ("ws.npy", "image_sha256.npy", "image_bytes.npy"):
        if not (root / name).is_file():
            raise DatasetError(f"{root}: {name} is missing. Re-create the dataset with `deid make-dataset`.")
    if file_sha256(root / "ws.npy") != manifest["ws_sha256"]:
        problems.append("ws.npy does not match its recorded sha256")
    try:
        ws = np.load(root / "ws.npy", mmap_mode="r")
        hashes = np.load(root / "image_sha256.npy")
        sizes = np.load(root / "image_bytes.npy")
    except ValueError as exc:
        raise DatasetError(f"{root}: damaged index files ({exc}). Re-create the dataset.") from None
    if ws.shape != (count, w_dim) or ws.dtype != np.float32 or hashes.shape != (count, 32) or sizes.shape != (count,):
        raise DatasetError(f"{root}: index files do not hold {count} samples. Re-create the dataset.")
    for i in range(count):
        path = root / image_relpath(i)
        if not path.is_file():
            problems.append(f"{image_relpath(i)} is missing")
        elif path.stat().st_size != int(sizes[i]):
            problems.append(f"{image_relpath(i)} has {path.stat().st_size} bytes, expected {int(sizes[i])} (truncated?)")
        elif deep and hashlib.sha256(path.read_bytes()).digest() != hashes[i].tobytes():
            problems.append(f"{image_relpath(i)} is corrupted (sha256 mismatch)")
        if len(problems) >= 5:
            break
        if on_progress is not None:
            on_progress(i + 1)
    if problems:
        raise DatasetError(f"{root}: {'; '.join(problems[:5])}. Re-create it: runs are reproducible, so the same "
                           "`deid make-dataset` command into a new folder gives the same samples.")
    return manifest
