"""What roll-robust face detection costs per frame of a 720p video, under two schedules side by side.

    python bench/detection_cost.py [--frames 16] [--repeats 3] [--threads 1]

`before` is the schedule of the previous release, rebuilt from its settings: no mirrored edge margin, no crowd
score, held views at full size, no rotation between sweeps (all 8 views every 8th frame, the upright and the held
views on the others). `after` is today's defaults: edge margin, held views only as large as their faces need, the
rotation at 0.4 of the size, views of one size in one detector call. Both run on the same frames, interleaved
repeat by repeat (a shared machine slows both alike), on two 1280x720 clips of real faces: `crowd` (0-4 upright faces per frame, carphone and
the astronaut) and `rolled` (the same frames turned 135 degrees). Prints one JSON object: per clip and schedule the
median ms per frame, the detector's input pixels per frame (what its first network's cost follows), the views
searched per frame in full-size views' worth of pixels, and the faces found per frame.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = (1280, 720)


def _clips(count: int) -> dict[str, list[np.ndarray]]:
    import cv2

    from deid.media.samples import crowd_frames

    upright = [cv2.resize(image, SIZE, interpolation=cv2.INTER_LINEAR) for image, _ in crowd_frames(count, seed=2)]
    turn = cv2.getRotationMatrix2D(((SIZE[0] - 1) / 2, (SIZE[1] - 1) / 2), 135, 0.7)
    rolled = [cv2.warpAffine(image, turn, SIZE, borderMode=cv2.BORDER_REPLICATE) for image in upright]
    return {"crowd": upright, "rolled": rolled}


def _schedules():
    from deid.faces.detection import DetectConfig
    from deid.faces.orientation import OrientationConfig

    before = (DetectConfig(edge_margin=0.0, crowd_min_score=0.9),
              OrientationConfig(held_min_scale=1.0, rotation_groups=0))
    return {"before": before, "after": (DetectConfig(), OrientationConfig())}


class _PixelCounter:
    """Counts the pixels of the images MTCNN is given (padded, downscaled: what its pyramid is built on)."""

    def __init__(self):
        self.pixels = 0

    def wrap(self, net):
        detect = net.detect

        def counted(images, landmarks=True):
            self.pixels += int(np.prod(np.asarray(images).shape[:3]))
            return detect(images, landmarks=landmarks)

        net.detect = counted


def _run_once(frames, detect_config, orientation_config, counter: _PixelCounter, batch: int) -> dict:
    from deid.faces.detection import FaceDetector
    from deid.faces.orientation import RollRobustDetector

    stream = RollRobustDetector(FaceDetector(detect_config), orientation_config).stream()
    counter.pixels = 0
    found = 0
    start = time.perf_counter()
    for k in range(0, len(frames), batch):
        found += sum(len(d) for d in stream(frames[k:k + batch]))
    seconds = time.perf_counter() - start
    return {"ms": 1000 * seconds / len(frames), "pixels": counter.pixels / len(frames),
            "views": stream.searched / len(frames), "faces": found / len(frames)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (two sweeps at 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="frames per detector batch, as anonymize's default")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    import torch

    from deid.faces.detection import DetectConfig, _mtcnn

    torch.set_num_threads(args.threads)
    config = DetectConfig()
    counter = _PixelCounter()
    counter.wrap(_mtcnn("cpu", config.min_face_size, config.thresholds))
    clips, schedules = _clips(args.frames), _schedules()
    runs: dict[str, dict[str, list[dict]]] = {clip: {name: [] for name in schedules} for clip in clips}
    for clip, frames in clips.items():  # a warm-up run of each: oneDNN compiles each new shape once
        for name, (detect_config, orientation_config) in schedules.items():
            _run_once(frames[:args.batch], detect_config, orientation_config, counter, args.batch)
    for _ in range(args.repeats):
        for clip, frames in clips.items():
            for name, (detect_config, orientation_config) in schedules.items():
                runs[clip][name].append(_run_once(frames, detect_config, orientation_config, counter, args.batch))
    result = {"bench": "detection_cost", "size": f"{SIZE[0]}x{SIZE[1]}", "frames": args.frames, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "clips": {}}
    for clip, by_schedule in runs.items():
        summary = {}
        for name, measured in by_schedule.items():
            summary[name] = {"ms_per_frame": round(statistics.median(m["ms"] for m in measured), 1),
                             "ms_per_frame_all": [round(m["ms"], 1) for m in measured],
                             "megapixels_per_frame": round(measured[0]["pixels"] / 1e6, 3),
                             "views_per_frame": round(measured[0]["views"], 2),
                             "faces_per_frame": round(measured[0]["faces"], 2)}
        summary["after_over_before"] = round(summary["after"]["ms_per_frame"] / summary["before"]["ms_per_frame"], 2)
        result["clips"][clip] = summary
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
