"""`deid make-dataset`: sample the pretrained generator, keeping every image (lossless PNG) and its w.

Truncation (`truncation`, ψ) pulls every sample's w toward the mapping network's average, w_avg + ψ (w − w_avg),
on every style row the synthesis reads. StyleGAN's truncation can stop after the first K rows (the official
code's latest generate_fake_data.py: ψ 0.7 on the first 8); deid refuses that with ψ ≠ 1 (see
`truncated_rows`), and records ψ and K in the manifest. The default, ψ = 1 (no truncation), is the official
code's first version (the paper gives no value).

Sample i depends only on (seed, i): its z comes from its own torch.Generator seeded with (seed << 32) + i,
and batches are aligned to multiples of the batch size (kept in run.json), so a resumed run writes exactly
the files an uninterrupted one would. Under torchrun each rank generates every WORLD_SIZE-th batch and rank 0
writes the one manifest. The dataset layout is described in deid/dataset.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from rich.progress import ProgressColumn
from rich.text import Text

from deid.atomic import TEMPORARY_GLOB, write_bytes_atomic
from deid.console import info, progress
from deid.dataset import FORMAT, MANIFEST, RUN_FILE, image_relpath, read_manifest, truncation_text, verify_dataset
from deid.errors import DatasetError
from deid.media.images import to_uint8
from deid.distributed import Dist, init_distributed
from deid.stylegan.loading import load_generator
from deid.stylegan.network import Generator
from deid.weights import resolve, source_sha256

# Settings that define the samples; a run or dataset with other values is a different dataset.
IDENTITY_KEYS = ("format", "generator_fingerprint", "seed", "truncation", "truncation_cutoff", "noise_mode", "count",
                 "resolution", "w_dim")


@dataclass(frozen=True)
class MakeDatasetConfig:
    out: Path                                  # dataset directory (new, empty, or an interrupted run with resume)
    n: int = 70000                             # number of samples
    generator: str = "stylegan2-ffhq-256"      # registry name or generator file
    seed: int = 0
    truncation: float = 1.0                    # psi; 1.0 = no truncation
    truncation_cutoff: int | None = None       # truncate the first K style rows; None = all (see truncated_rows)
    batch_size: int | None = None              # None = pick from device and resolution
    device: str = "auto"
    resume: bool = False                       # continue an interrupted run in `out`
    noise_mode: str = "const"                  # the checkpoint's stored noise: samples depend on z only


def truncated_rows(psi: float, cutoff: int | None, num_ws: int) -> int:
    """How many of the generator's `num_ws` style rows truncation reaches: the first `cutoff` (None: all).

    deid's mapper M outputs one w that every row reads (W, not W+), and the dataset keeps for each image the one
    w that made it: D_W's real samples, and the code M must reproduce. With ψ ≠ 1 and K < num_ws the rows
    after K keep the untruncated w, so an image is made by two different w's: M, whose w is the same on every
    row, could not reproduce it, and no single stored w would be the one that made it (the official code
    stores every row and gives D_W row 0, a truncated w that did not make the fine rows). That is refused; with
    ψ = 1 every cutoff gives the same samples and is accepted."""
    rows = num_ws if cutoff is None else min(cutoff, num_ws)
    if cutoff is not None and cutoff < 1:
        raise DatasetError(f"--truncation-cutoff {cutoff}: give a number of style rows, at least 1.")
    if psi != 1 and rows < num_ws:
        raise DatasetError(
            f"--truncation-cutoff {cutoff}: truncating only the first {cutoff} of the generator's {num_ws} style rows "
            "makes each image from two w's (W+), but deid's mapper outputs one w for every row, so it could not "
            f"reproduce these images. Omit --truncation-cutoff (all {num_ws} rows), or use --truncation 1.")
    return rows


def sample_z(seed: int, index: int, z_dim: int) -> torch.Tensor:
    """z of sample `index`: [z_dim] float32, from its own generator (independent of batching and ranks)."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed((seed << 32) + index))


def png_threads() -> int:
    """PNG encoders running beside the generator: every core (OpenCV releases the GIL while it compresses)."""
    return max(2, os.cpu_count() or 2)


def auto_batch_size(device: torch.device, resolution: int) -> int:
    if device.type != "cuda":
        return 4
    return int(max(1, min(64, 32 * (256 * 256) // (resolution * resolution))))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """[R, R, 3] uint8 RGB -> PNG bytes (lossless)."""

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:6.1f} img/s" if task.speed else "  -.- img/s")


def generator_identity(G: Generator) -> dict:
    """Source, fingerprint (content hash) and the file's sha256 (None for seeded random weights)."""

    return {"generator": G.source, "generator_fingerprint": G.fingerprint, "generator_sha256": source_sha256(G.source)}


class DatasetWriter:
    """One run: checks/creates the directory, writes batches, consolidates the manifest."""

    def __init__(self, config: MakeDatasetConfig, G: Generator, dist: Dist):
        self.config, self.G, self.dist = config, G, dist
        self.root = Path(config.out)
        self.parts = self.root / "parts"
        self.settings = {
            "format": FORMAT, **generator_identity(G), "seed": config.seed, "truncation": float(config.truncation),
            "truncation_cutoff": truncated_rows(config.truncation, config.truncation_cutoff, G.num_ws),
            "noise_mode": config.noise_mode, "count": config.n, "resolution": G.resolution, "w_dim": G.w_dim,
            "num_ws": G.num_ws, "z_dim": G.z_dim, "z_seeding": "torch.Generator seed (seed << 32) + index",
            "image_layout": "images/{index // 1000:05d}/{index:08d}.png",
        }

    # ------------------------------------------------------------------------------------ directory

    def _differences(self, other: dict) -> list[str]:
        # runs and datasets recorded before the cutoff was a setting truncated every row
        other = {"truncation_cutoff": self.G.num_ws, **other}
        return [f"{k} {other.get(k)!r} (asked: {self.settings[k]!r})" for k in IDENTITY_KEYS if other.get(k) != self.settings[k]]

    def prepare(self, batch_size: int) -> int | None:
        """Rank 0: validate or create the directory. Returns the batch size to use, or None when the dataset
        is already complete."""
        root = self.root
        if (root / MANIFEST).is_file():
            diffs = self._differences(read_manifest(root))
            if diffs:
                raise DatasetError(f"{root} holds a different dataset ({'; '.join(diffs[:3])}). Choose another --out.")
            return None
        if (root / RUN_FILE).is_file():
            run = json.loads((root / RUN_FILE).read_text())
            diffs = self._differences(run)
            if diffs:
                raise DatasetError(f"{root} holds an interrupted run of a different dataset ({'; '.join(diffs[:3])}). "
                                   "Repeat its settings with --resume, or choose another --out.")
            if not self.config.resume:
                raise DatasetError(f"{root} holds an interrupted run of this dataset. Add --resume to continue it.")
            for stale in root.rglob(TEMPORARY_GLOB):  # left by a killed process
                stale.unlink(missing_ok=True)
            return int(run["batch_size"])
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DatasetError(f"{root} is not empty and is not a generated dataset. Choose a new or empty --out.")
        self.parts.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(root / RUN_FILE, json.dumps({**self.settings, "batch_size": batch_size}, indent=1).encode())
        return batch_size

    # -------------------------------------------------------------------------------------- batches

    def pending(self, batch_size: int) -> list[int]:
        starts = list(range(0, self.config.n, batch_size))[self.dist.rank::self.dist.world]
        return [s for s in starts if not (self.parts / f"{s:08d}.npz").is_file()]

    @torch.no_grad()
    def generate(self, start: int, stop: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Images [B, R, R, 3] uint8 and w [B, w_dim] float32 of samples start..stop-1."""
        z = torch.stack([sample_z(self.config.seed, i, self.G.z_dim) for i in range(start, stop)]).to(device)
        w = self.G.mapping(z, truncation_psi=self.config.truncation)
        img = self.G.synthesis(w, noise_mode=self.config.noise_mode)
        return to_uint8(img), w.float().cpu().numpy()

    def write_batch(self, start: int, blobs: list[bytes], ws: np.ndarray) -> None:
        """PNG files first (each atomically), then the part file that marks the batch done."""
        for offset, blob in enumerate(blobs):
            path = self.root / image_relpath(start + offset)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, blob)
        buf = io.BytesIO()
        np.savez(buf, w=ws.astype(np.float32),
                 sha256=np.stack([np.frombuffer(hashlib.sha256(b).digest(), np.uint8) for b in blobs]),
                 nbytes=np.array([len(b) for b in blobs], dtype=np.int64))
        write_bytes_atomic(self.parts / f"{start:08d}.npz", buf.getvalue())

    # ------------------------------------------------------------------------------------- finalize

    def finalize(self, batch_size: int) -> dict:
        n = self.config.n
        ws = np.zeros((n, self.G.w_dim), np.float32)
        sha = np.zeros((n, 32), np.uint8)
        nbytes = np.zeros(n, np.int64)
        for start in range(0, n, batch_size):
            part = self.parts / f"{start:08d}.npz"
            if not part.is_file():
                raise DatasetError(f"{self.root}: batch {start} was not generated (a rank failed?). Run again with --resume.")
            with np.load(part) as data:
                stop = start + len(data["w"])
                ws[start:stop], sha[start:stop], nbytes[start:stop] = data["w"], data["sha256"], data["nbytes"]
        ws_blob = _npy_bytes(ws)
        write_bytes_atomic(self.root / "ws.npy", ws_blob)
        write_bytes_atomic(self.root / "image_sha256.npy", _npy_bytes(sha))
        write_bytes_atomic(self.root / "image_bytes.npy", _npy_bytes(nbytes))
        manifest = {**self.settings, "batch_size": batch_size, "ws_sha256": hashlib.sha256(ws_blob).hexdigest()}
        write_bytes_atomic(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())  # last: marks completion
        shutil.rmtree(self.parts, ignore_errors=True)
        (self.root / RUN_FILE).unlink(missing_ok=True)
        return manifest


def make_dataset(config: MakeDatasetConfig, generator: Generator | None = None) -> dict:
    """Generate (or complete, with config.resume) a dataset; returns its manifest. `generator` overrides
    config.generator with an already loaded network."""
    if config.n < 1:
        raise DatasetError(f"--n {config.n}: need at least one sample.")
    dist, device = init_distributed(config.device)
    with _exact_arithmetic():
        return _make(config, generator, dist, device)


@contextlib.contextmanager
def _exact_arithmetic() -> Iterator[None]:
    """Bit-for-bit reproducible convolutions and full fp32 (no TF32) for dataset fidelity, for this run only: the
    flags are process-wide, so the caller's values come back afterwards."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def _make(config: MakeDatasetConfig, generator: Generator | None, dist: Dist, device: torch.device) -> dict:
    # Failures are shared across ranks (deid.distributed.Dist.failures_shared): when one rank cannot go on (rank 0
    # alone prepares the directory and writes the manifest), every rank stops at once with its message instead
    # of waiting in the next collective until the timeout.
    if generator is None and dist.world > 1:  # downloaded once per node, not by every rank into one cache
        dist.first_on_each_node(lambda: resolve(config.generator))
    with dist.failures_shared():
        G = (generator if generator is not None else load_generator(config.generator, device=device)).to(device).eval()
        writer = DatasetWriter(config, G, dist)
        batch_size = config.batch_size or auto_batch_size(device, G.resolution)
    decision = dist.from_main(lambda: writer.prepare(batch_size))
    if decision is None:
        info(f"{config.out}: already complete ({config.n} samples).")
        return read_manifest(writer.root)
    batch_size = int(decision)
    if config.batch_size and config.batch_size != batch_size:
        info(f"resuming with the run's batch size {batch_size} (results depend on it), not {config.batch_size}.")

    todo = writer.pending(batch_size)
    mine = [s for s in range(0, config.n, batch_size)][dist.rank::dist.world]
    size = lambda s: min(batch_size, config.n - s)  # noqa: E731
    if todo and len(todo) < len(mine):
        info(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches already done.")
    with dist.failures_shared(), ThreadPoolExecutor(max_workers=png_threads()) as pool, progress(RateColumn()) as bar:
        task = bar.add_task(f"samples (rank {dist.rank})" if dist.world > 1 else "samples",
                            total=sum(map(size, mine)), completed=sum(map(size, mine)) - sum(map(size, todo)))
        encoding = None  # the previous batch's PNGs encode in threads while the next batch generates
        for start in todo + [None]:
            generated = writer.generate(start, start + size(start), device) if start is not None else None
            if encoding is not None:
                prev_start, futures, prev_ws = encoding
                writer.write_batch(prev_start, [f.result() for f in futures], prev_ws)
                bar.advance(task, len(futures))
            if generated is not None:
                images, ws = generated
                encoding = (start, [pool.submit(encode_png, im) for im in images], ws)
    return dist.from_main(lambda: writer.finalize(batch_size))


def verify_with_progress(root: Path) -> dict:
    """`deid make-dataset --verify`: the deep check (every image hashed), with a progress bar."""
    manifest = read_manifest(root)
    with progress(RateColumn()) as bar:
        task = bar.add_task("verifying", total=int(manifest["count"]))
        manifest = verify_dataset(root, deep=True, on_progress=lambda done: bar.update(task, completed=done))
    info(f"{root}: complete and intact ({manifest['count']} samples, {manifest['resolution']} px, "
         f"generator {manifest['generator']}, {truncation_text(manifest)}).")
    return manifest
