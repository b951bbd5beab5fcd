"""Training batches that keep a GPU fed: PNGs decode in DataLoader worker processes into pinned host memory, a
few batches ahead, and go to the device asynchronously, as uint8 (a quarter of the bytes of float32).

The loader reads ahead with its own copy of the run's DataOrder; the run's order advances only when a batch is
consumed, so a checkpoint records what training used, never what was merely prefetched, and a resumed run
draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from deid.dataset import GeneratedDataset
from deid.errors import DatasetError


def default_workers(device: torch.device, world: int = 1) -> int:
    """Decoding processes per training process: a GPU step is milliseconds, so use the cores (leaving one per
    rank for its own thread); a CPU step takes seconds and needs the cores itself, so one worker suffices."""
    if device.type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // max(world, 1) - 1))


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A small host tensor (w's) on `device` without the host waiting for the GPU's queue: a copy from pageable
    memory would; one from pinned memory (PyTorch's caching host allocator) runs asynchronously."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class _Images(Dataset):
    """Image uint8 [3, R, R] of a GeneratedDataset. Only images cross from the workers: each tensor that crosses
    costs the training thread milliseconds of shared-memory bookkeeping, and the w's are a memory-mapped read."""

    def __init__(self, dataset: GeneratedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.dataset.image_uint8(index))).permute(2, 0, 1)


class _Ahead(Sampler):
    """The run's batch sequence, drawn from a private copy of its DataOrder (endless: epochs follow each other)."""

    def __init__(self, order):
        self.order = order

    def __iter__(self):
        while True:
            yield self.order.next_indices()


@dataclass
class LoaderStats:
    """Host seconds spent waiting for batches (the loader had none ready), and the batches consumed."""

    wait_seconds: float = 0.0
    batches: int = 0


class TrainBatches:
    """next() -> (images [B, 3, R, R] float32 in [-1, 1], w [B, w_dim] float32) on `device`, the batches of `order`
    (a train.trainer.DataOrder, advanced as batches are consumed). Close it (or use `with`) to stop the workers."""

    def __init__(self, dataset: GeneratedDataset, order, device: torch.device, workers: int, prefetch: int = 4):
        self.dataset, self.order, self.device, self.workers = dataset, order, device, workers
        self.stats = LoaderStats()
        # the loader yields batches in the sampler's order, which is the order's own sequence
        loader = DataLoader(_Images(dataset), batch_sampler=_Ahead(copy.deepcopy(order)), num_workers=workers,
                            pin_memory=device.type == "cuda", prefetch_factor=prefetch if workers else None,
                            persistent_workers=False)
        self._batches = iter(loader)

    def next(self) -> tuple[Tensor, Tensor]:
        start = time.perf_counter()
        try:
            images = next(self._batches)
        except DatasetError as exc:  # re-raised from a worker with its traceback: keep the one line users act on
            raise DatasetError(str(exc).strip().splitlines()[-1].split("Error: ", 1)[-1]) from None
        self.stats.wait_seconds += time.perf_counter() - start
        self.stats.batches += 1
        ws = torch.from_numpy(np.asarray(self.dataset.ws[self.order.next_indices()], dtype=np.float32))
        images = images.to(self.device, non_blocking=True)
        return images.float() / 127.5 - 1, to_device(ws, self.device)

    def close(self) -> None:
        self._batches = None  # the iterator's finaliser stops the worker processes

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["TrainBatches", "LoaderStats", "default_workers", "to_device"]
