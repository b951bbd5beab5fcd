"""Bounded batch shapes.

oneDNN (CPU) compiles and caches a primitive for every input shape it meets, and cuDNN autotuning and CUDA
graphs pay once per shape too. A batch that follows the number of faces (or of MTCNN's candidate boxes) in a
frame would make that cache grow with the length of a video; padding each batch up to the next of a few sizes
bounds the set of shapes (and so the memory), at the cost of some zero rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

FACE_BUCKETS = (1, 2, 4, 8, 16, 32)  # faces per generation batch; more run in chunks of 32
CANDIDATE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images or candidate boxes per MTCNN stage call


def bucket_size(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `count` items (at most the largest bucket)."""
    for size in buckets:
        if size >= count:
            return size
    raise ValueError(f"{count} items exceed the largest bucket, {buckets[-1]}")


def bucket_chunks(count: int, buckets: Sequence[int]) -> list[slice]:
    """Slices of at most the largest bucket that cover range(count)."""
    return [slice(start, min(start + buckets[-1], count)) for start in range(0, count, buckets[-1])]


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """x [N, ...] -> [size, ...]: x, then zero rows."""
    if len(x) == size:
        return x
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


class BucketedBatch(torch.nn.Module):
    """`module` run on its input's batch padded up to a bucket size, its outputs cut back to the real rows.

    Exact for modules that treat samples independently (no batch statistics), such as MTCNN's three nets.
    forward: x [N, ...] -> what `module` returns (a tensor or a tuple of tensors), each [N, ...]."""

    def __init__(self, module: torch.nn.Module, buckets: Sequence[int] = CANDIDATE_BUCKETS):
        super().__init__()
        self.module, self.buckets = module, tuple(buckets)

    def forward(self, x: torch.Tensor):
        parts = []
        for part in bucket_chunks(len(x), self.buckets) or [slice(0, 0)]:
            n = part.stop - part.start
            out = self.module(pad_batch(x[part], bucket_size(max(n, 1), self.buckets)))
            parts.append(tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n])
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)
