"""Bounded batch shapes.

oneDNN (CPU) compiles and caches a primitive for every input shape it meets, and cuDNN autotuning and CUDA
graphs pay once per shape too. A batch that follows the number of faces (or of MTCNN's candidate boxes) in a
frame would make that cache grow with the length of a video. Each batch is therefore run as consecutive parts
whose sizes are among a few bucket sizes (17 faces: 16 + 1), which bounds the set of shapes (and so the memory)
without computing a single padding row (padding 17 up to 32 spent 47 % of the work on zeros).
"""

from __future__ import annotations

from typing import Sequence

import torch

FACE_BUCKETS = (1, 2, 4, 8, 16, 32)  # faces per generation batch; more run in chunks of 32
CANDIDATE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images or candidate boxes per MTCNN stage call


def bucket_parts(count: int, buckets: Sequence[int]) -> list[slice]:
    """Consecutive slices that cover range(count), each exactly a bucket size: the largest bucket that fits what
    is left, then the next, down to 1 (`buckets` ascending, starting at 1). With powers of two that is at most one
    part per bucket size beyond the parts of the largest."""
    if not buckets or buckets[0] != 1:
        raise ValueError(f"buckets must start at 1 to cover every count, got {tuple(buckets)}")
    parts, start = [], 0
    for size in sorted(buckets, reverse=True):
        while count - start >= size:
            parts.append(slice(start, start + size))
            start += size
    return parts


class BucketedBatch(torch.nn.Module):
    """`module` run on its input's batch in parts of bucket sizes (`bucket_parts`), the outputs concatenated.

    Exact for modules that treat samples independently (no batch statistics), such as MTCNN's three nets.
    forward: x [N, ...] -> what `module` returns (a tensor or a tuple of tensors), each [N, ...]."""

    def __init__(self, module: torch.nn.Module, buckets: Sequence[int] = CANDIDATE_BUCKETS):
        super().__init__()
        self.module, self.buckets = module, tuple(buckets)

    def forward(self, x: torch.Tensor):
        if not len(x):  # one zero row gives the outputs' shapes, cut to none
            out = self.module(x.new_zeros((1, *x.shape[1:])))
            return tuple(o[:0] for o in out) if isinstance(out, tuple) else out[:0]
        parts = [self.module(x[part]) for part in bucket_parts(len(x), self.buckets)]
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)
