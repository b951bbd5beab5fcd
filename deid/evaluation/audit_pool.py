"""The privacy audit beside synthesis: `FaceAuditor.check` in worker processes, fed through shared memory.

The audit costs about as much per frame as synthesis on a CPU (dlib's HOG on four turns, ResNet descriptors of
each face), on one thread: on the encoder thread it capped the whole pipeline. Here a
pool of processes (sized to the cores synthesis leaves free, at least one) audits groups of frames while the next
group is synthesised. A group's source and output frames are copied once into a shared-memory segment (reused, so
memory stays flat); the worker covers leaks in the segment in place and returns the `FrameAudit`s; `result()`
copies the covered outputs back, so the frames are written in order, audited, before encoding.

A group goes to one worker whole, and each worker keeps the source descriptors of each video's tracks
(`SourceFaces`), so consecutive frames of a face reuse them.
"""

from __future__ import annotations

import atexit
import collections
import functools
import multiprocessing
import os
import signal
import threading
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from deid.evaluation.audit import AuditConfig, FaceAuditor, FrameAudit, SourceFaces

STREAMS_KEPT = 8  # videos whose track descriptors a worker keeps (the pool outlives a video; memory stays flat)


def audit_workers(synthesis_threads: int, cores: int | None = None) -> int:
    """Worker processes for the audit: the cores synthesis leaves free, at least one. synthesis_threads: the CPU
    threads synthesis keeps busy (torch's intra-op threads on a CPU, about one feeding a GPU)."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores - synthesis_threads)


@dataclass(frozen=True)
class AuditItem:
    """One frame to audit: source and output [H, W, 3] uint8 RGB (same size), the faces the pipeline replaced in
    it (boxes [K, 4] frame pixels, their track ids [K] and rolls [K] in degrees)."""

    index: int
    source: np.ndarray
    output: np.ndarray
    replaced: np.ndarray
    tracks: tuple[int, ...]
    rolls: tuple[float, ...]


@dataclass(frozen=True)
class _Layout:
    """Where one item lives in a shared segment (byte offsets of its source and output) and what else it brings."""

    index: int
    shape: tuple[int, int, int]
    source_at: int
    output_at: int
    replaced: np.ndarray
    tracks: tuple[int, ...]
    rolls: tuple[float, ...]


class PendingAudit:
    """The audit of one submitted group: `result()` waits for it, writes the covered outputs back into the arrays
    that were submitted, and returns the `FrameAudit`s in order. Call it from one thread."""

    def __init__(self, future: Future, segment: SharedMemory, layouts: list[_Layout], outputs: list[np.ndarray],
                 release):
        self._future, self._segment, self._layouts, self._outputs = future, segment, layouts, outputs
        self._release = release
        self._audits: list[FrameAudit] | None = None

    def result(self) -> list[FrameAudit]:
        if self._audits is None:
            try:
                audits = self._future.result()
                for layout, output, audit in zip(self._layouts, self._outputs, audits):
                    if audit.covered:  # only covered frames changed
                        output[:] = _view(self._segment, layout.shape, layout.output_at)
            finally:
                if self._segment is not None:  # once, even when the worker failed and this is asked again
                    self._release(self._segment)
                    self._segment = None
            self._audits = audits
        return self._audits


class AuditPool:
    """Worker processes that audit frames (see the module). Thread-safe; `close()` (or the end of the process)
    stops them and frees the shared memory."""

    def __init__(self, config: AuditConfig, workers: int):
        self.config = config
        self.workers = workers
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(config,))
        self._free: list[SharedMemory] = []
        self._made: list[SharedMemory] = []  # every live segment, free or in flight: unlinked at close
        self._lock = threading.Lock()

    def submit(self, stream: str, items: list[AuditItem]) -> PendingAudit:
        """Audit a group of frames of the video `stream` (any id unique to the video) in one worker."""
        layouts, size = [], 0
        for item in items:
            nbytes = item.source.nbytes
            layouts.append(_Layout(item.index, item.source.shape, size, size + nbytes,
                                   np.asarray(item.replaced, np.float64).reshape(-1, 4), item.tracks, item.rolls))
            size += 2 * nbytes
        segment = self._segment(size)
        for item, layout in zip(items, layouts):
            _view(segment, layout.shape, layout.source_at)[:] = item.source
            _view(segment, layout.shape, layout.output_at)[:] = item.output
        future = self._executor.submit(_audit_group, stream, segment.name, layouts)
        return PendingAudit(future, segment, layouts, [item.output for item in items], self._give_back)

    def _segment(self, size: int) -> SharedMemory:
        """A free segment of at least `size` bytes (reused: frames of one video all need the same), or a new one."""
        with self._lock:
            for k, segment in enumerate(self._free):
                if segment.size >= size:
                    return self._free.pop(k)
            segment = SharedMemory(create=True, size=max(size, 1))
            self._made.append(segment)
            return segment

    def _give_back(self, segment: SharedMemory) -> None:
        with self._lock:
            self._free.append(segment)
            while len(self._free) > self.workers + 2:  # more than can be in flight at once: let the oldest go
                oldest = self._free.pop(0)
                self._made.remove(oldest)
                _unlink(oldest)

    def close(self) -> None:
        """Stop the workers and free every segment, those of groups never collected (a run that failed) too."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for segment in self._made:
                _unlink(segment)
            self._made.clear()
            self._free.clear()


@functools.lru_cache(maxsize=1)
def shared_pool(config: AuditConfig, workers: int) -> AuditPool:
    """The process's audit pool for this config and size, started once (workers load dlib's models once) and
    closed when the process ends. A new config or size replaces it."""
    _close_shared()
    pool = AuditPool(config, workers)
    _open_pools.append(pool)
    return pool


_open_pools: list[AuditPool] = []


@atexit.register
def _close_shared() -> None:
    while _open_pools:
        _open_pools.pop().close()


def new_stream() -> str:
    """An id for one video's frames in the pool."""
    return uuid.uuid4().hex


def _view(segment: SharedMemory, shape: tuple[int, ...], offset: int) -> np.ndarray:
    return np.ndarray(shape, np.uint8, buffer=segment.buf, offset=offset)


def _unlink(segment: SharedMemory) -> None:
    segment.close()
    segment.unlink()


# ------------------------------------------------------------------------------------------- in the workers

_worker: dict = {}


def _start_worker(config: AuditConfig) -> None:
    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    cv2.setNumThreads(1)  # one core per worker: the pool is sized in cores
    _worker["auditor"] = FaceAuditor(config)
    _worker["memories"] = collections.OrderedDict()


def _memory(stream: str) -> SourceFaces:
    """This worker's source descriptors of one video (the last few videos are kept)."""
    memories: collections.OrderedDict = _worker["memories"]
    if stream not in memories:
        memories[stream] = SourceFaces(_worker["auditor"].config.refresh_shift)
        while len(memories) > STREAMS_KEPT:
            memories.popitem(last=False)
    memories.move_to_end(stream)
    return memories[stream]


def _audit_group(stream: str, name: str, layouts: list[_Layout]) -> list[FrameAudit]:
    """Audit each frame of a group in the shared segment `name`, covering leaks in its output in place."""
    auditor: FaceAuditor = _worker["auditor"]
    memory = _memory(stream)
    segment = SharedMemory(name=name)  # on an error its mapping goes with the traceback that holds views of it
    audits = []
    for layout in layouts:
        source = _view(segment, layout.shape, layout.source_at)
        output = _view(segment, layout.shape, layout.output_at)
        audits.append(auditor.check(layout.index, source, output, layout.replaced, tracks=layout.tracks,
                                    rolls=layout.rolls, memory=memory))
        del source, output  # the segment cannot close while views of it exist
    segment.close()
    return audits
