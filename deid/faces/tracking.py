"""Faces across video frames: stable track ids, short gaps filled, boxes and landmarks smoothed over time.

Streaming with a fixed delay: a frame leaves `FaceTracker` once `lookahead` later frames have arrived, so every
gap it may sit in is already filled and its smoothing window is complete. Memory is bounded by the delay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from deid.faces.detection import Detections, box_iou


@dataclass(frozen=True)
class TrackConfig:
    min_iou: float = 0.25  # a detection continues a track when its box overlaps the track's last box this much
    max_gap: int = 5  # frames a face may be missed and still be filled in (linear interpolation)
    smooth_radius: int = 3  # frames on each side in the temporal smoothing window
    smooth_sigma: float = 1.5  # Gaussian weight width (frames) of the smoothing

    @property
    def lookahead(self) -> int:
        return self.max_gap + self.smooth_radius


@dataclass(frozen=True)
class Face:
    """One tracked face in one frame (pixels of the detection view): box [4] (x0, y0, x1, y1), landmarks [5, 2]."""

    track_id: int
    box: np.ndarray
    landmarks: np.ndarray
    filled: bool  # True when the detector missed it here and the track's neighbours filled it in


@dataclass
class _Entry:
    index: int
    payload: Any
    raw: dict[int, tuple[np.ndarray, np.ndarray, bool]] = field(default_factory=dict)  # id -> (box, lmk, filled)


class FaceTracker:
    """Associates detections into tracks (greedy IoU), fills short gaps, smooths boxes and landmarks.

    `push(payload, detections)` returns the frames that are now final, each as (payload, [Face, ...]);
    `flush()` returns the rest at the end of the video. Output order is input order.
    """

    def __init__(self, config: TrackConfig = TrackConfig()):
        self.config = config
        self.pending: deque[_Entry] = deque()  # frames not yet final (at most lookahead of them)
        self.history: deque[_Entry] = deque(maxlen=max(config.smooth_radius, config.max_gap))  # final, for smoothing
        self.last_seen: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # id -> (frame index, box, lmk)
        self.next_id = 0
        self.count = 0

    def push(self, payload: Any, detections: Detections) -> list[tuple[Any, list[Face]]]:
        entry = _Entry(self.count, payload)
        self.count += 1
        self._associate(entry, detections)
        self.pending.append(entry)
        released = []
        while len(self.pending) > self.config.lookahead:
            released.append(self._release())
        return released

    def flush(self) -> list[tuple[Any, list[Face]]]:
        released = []
        while self.pending:
            released.append(self._release())
        return released

    def _associate(self, entry: _Entry, detections: Detections) -> None:
        t = entry.index
        live = [(tid, seen) for tid, seen in self.last_seen.items() if t - seen[0] <= self.config.max_gap + 1]
        assigned: dict[int, int] = {}  # detection index -> track id
        if live and len(detections):
            iou = box_iou(detections.boxes, np.stack([seen[1] for _, seen in live]))
            # Greedy: the best-overlapping pair first, each detection and track used once.
            for flat in np.argsort(-iou, axis=None):
                d, k = np.unravel_index(flat, iou.shape)
                if iou[d, k] < self.config.min_iou:
                    break
                tid = live[k][0]
                if d in assigned or tid in assigned.values():
                    continue
                assigned[int(d)] = tid
        for d in range(len(detections)):
            tid = assigned.get(d)
            if tid is None:
                tid, self.next_id = self.next_id, self.next_id + 1
            box, lmk = detections.boxes[d], detections.landmarks[d]
            self._fill_gap(tid, t, box, lmk)
            entry.raw[tid] = (box, lmk, False)
            self.last_seen[tid] = (t, box, lmk)
        # Tracks unseen for longer than a fillable gap are over.
        for tid in [tid for tid, seen in self.last_seen.items() if t - seen[0] > self.config.max_gap + 1]:
            del self.last_seen[tid]

    def _fill_gap(self, tid: int, t: int, box: np.ndarray, lmk: np.ndarray) -> None:
        if tid not in self.last_seen:
            return
        s, box0, lmk0 = self.last_seen[tid]
        if t - s <= 1:
            return
        for entry in self.pending:
            if s < entry.index < t:
                a = (entry.index - s) / (t - s)
                entry.raw[tid] = ((1 - a) * box0 + a * box, (1 - a) * lmk0 + a * lmk, True)

    def _release(self) -> tuple[Any, list[Face]]:
        entry = self.pending.popleft()
        radius, sigma = self.config.smooth_radius, self.config.smooth_sigma
        window = [e for e in list(self.history) + [entry] + list(self.pending) if abs(e.index - entry.index) <= radius]
        faces = []
        for tid, (box, lmk, filled) in sorted(entry.raw.items()):
            weights, boxes, lmks = [], [], []
            for e in window:
                if tid in e.raw:
                    weights.append(np.exp(-0.5 * ((e.index - entry.index) / sigma) ** 2))
                    boxes.append(e.raw[tid][0])
                    lmks.append(e.raw[tid][1])
            w = np.array(weights)[:, None] / np.sum(weights)
            smooth_box = (w * np.stack(boxes)).sum(0)
            smooth_lmk = (w[:, :, None] * np.stack(lmks)).sum(0)
            faces.append(Face(tid, smooth_box.astype(np.float32), smooth_lmk.astype(np.float32), filled))
        self.history.append(_Entry(entry.index, None, entry.raw))  # the frame itself is not kept
        return entry.payload, faces


def track(items: Iterator[tuple[Any, Detections]], config: TrackConfig = TrackConfig()) -> Iterator[tuple[Any, list[Face]]]:
    """Stream (payload, detections) per frame into (payload, tracked faces) per frame, same order, delayed."""
    tracker = FaceTracker(config)
    for payload, detections in items:
        yield from tracker.push(payload, detections)
    yield from tracker.flush()
