"""Video pipeline benchmarks: per-stage frames/s and peak memory, memory vs. clip length, temporal jitter.

Prints one JSON object per measurement. Models have random weights (speed and memory do not depend on them).

    python bench/video_pipeline.py stages   [--seconds 10] [--model tiny|256] [--frames N] [--crowd --fps 5]
                                            [--precision auto|fp32|bf16]
                                            (incl. roll-robust detection and the privacy audit; the pipeline with
                                            and without it; carphone, or the crowd clip)
    python bench/video_pipeline.py memory   [--minutes 10] [--fps 5] [--size 1280x720]   # the crowd clip (0-4 faces
                                            per frame) scaled to --size, the audit on
    python bench/video_pipeline.py jitter
    python bench/video_pipeline.py heap     [--sizes 200]   # MTCNN's RSS growth against the variety of image sizes
    python bench/video_pipeline.py deface   --deface PATH [--rounds 2] [--seconds 10]  # `deid anonymize --engine
                                            mask` (with and without the audit) against deface, interleaved
    python bench/video_pipeline.py all      # everything above with the defaults (a 720p 10 s clip)

Each measurement runs in a fresh subprocess, so peak RSS (ru_maxrss) is that measurement's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make_clip(path: Path, seconds: float, size: str, fps: str = "30000/1001", audio: bool = True) -> Path:
    """Carphone looped to `seconds`, scaled to `size`, at `fps`, with a sine audio track."""
    import ffmpeg

    from deid.media.samples import carphone_file
    from deid.media.video import ffmpeg_exe

    if path.exists():
        return path
    width, height = size.split("x")
    video = ffmpeg.input(str(carphone_file()), stream_loop=-1, t=seconds).video.filter("fps", fps).filter("scale", width, height)
    streams = [video]
    if audio:
        streams.append(ffmpeg.input("sine=frequency=440:sample_rate=48000", f="lavfi", t=seconds).audio)
    ffmpeg.output(*streams, str(path), vcodec="libx264", crf=20, preset="veryfast", pix_fmt="yuv420p", acodec="aac",
                  t=seconds).overwrite_output().global_args("-loglevel", "error").run(cmd=ffmpeg_exe())
    return path


def _model(kind: str):
    from deid.nets.encoders import AttributeEncoderConfig, IdentityEncoderConfig, LandmarkEncoderConfig
    from deid.nets.model import Disentangler, ModelConfig
    from deid.stylegan.config import GeneratorConfig
    from deid.stylegan.loading import load_generator

    if kind == "tiny":
        from deid.nets.presets import TINY_GENERATOR_CONFIG, TINY_MODEL_CONFIG

        return Disentangler(TINY_MODEL_CONFIG, load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)).eval()
    config = ModelConfig(generator="random", identity=IdentityEncoderConfig(source="random"),
                         attributes=AttributeEncoderConfig(source="random"), landmarks=LandmarkEncoderConfig(source="random"))
    return Disentangler(config, load_generator("random", config=GeneratorConfig(resolution=256), seed=0)).eval()


def _timed(fn, count: int) -> dict:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"frames": count, "seconds": round(seconds, 3), "fps": round(count / seconds, 2)}


# ------------------------------------------------------------------------------------------- stages


AUDIT_FRAMES = 60  # the audit stage keeps a copy of this many source frames (memory), and is timed on them


def run_stages(clip: Path, model_kind: str, frames: int | None, batch: int = 8, device="cpu",
               precision_name: str = "auto") -> dict:
    """Each stage alone on the same frames (networks and detection on `device`, the model in `precision_name` as
    `deid anonymize --precision` takes it), then the whole threaded pipeline with and without the audit."""
    import torch

    from deid.devices import resolve_precision
    from deid.errors import DeidError
    from deid.evaluation.audit import FaceAuditor, SourceFaces
    from deid.evaluation.audit_pool import AuditItem, audit_workers
    from deid.faces.orientation import face_roll
    from deid.faces.alignment import ffhq_affine, warp_crop
    from deid.faces.detection import FaceDetector
    from deid.faces.orientation import RollRobustDetector
    from deid.faces.paste import paste_head
    from deid.faces.tracking import TrackConfig, track
    from deid.media.video import VideoWriter, probe, read_frames
    from deid.pipelines.anonymize import AnonymizeJob, run_anonymize
    from deid.pipelines.engines import CoverEngine, HeadSynthesizer
    from deid.pipelines.stages import batched

    info = probe(clip)
    count = min(frames or info.frame_count, info.frame_count)
    model = _model(model_kind).to(device)
    precision = resolve_precision(precision_name, torch.device(device))
    synth = HeadSynthesizer(model, device, precision)
    size = synth.resolution
    result = {"bench": "stages", "clip": f"{info.width}x{info.height}", "frames": count, "model": model_kind,
              "resolution": size, "precision": precision.name, "torch_threads": torch.get_num_threads(), "stages": {}}
    stages = result["stages"]
    decoded = []
    stages["decode"] = _timed(lambda: decoded.extend(f for f, _ in zip(read_frames(clip), range(count))), count)
    detector = FaceDetector(device=device)
    detections = []
    stages["detect"] = _timed(lambda: [detections.extend(detector([f.image for f in chunk])) for chunk in batched(iter(decoded), batch)], count)
    # rolled faces: upright every frame, all 8 views every 8th frame, plus the views that held a face
    stream = RollRobustDetector(detector).stream()
    stages["detect_roll_robust"] = _timed(lambda: [stream([f.image for f in chunk]) for chunk in batched(iter(decoded), batch)], count)
    stages["detect_roll_robust"]["views_per_frame"] = round(stream.searched / count, 2)
    stages["detect_roll_robust"]["extra_ms_per_frame"] = round(
        1000 * (stages["detect_roll_robust"]["seconds"] - stages["detect"]["seconds"]) / count, 1)
    tracked = []
    stages["track_smooth"] = _timed(lambda: tracked.extend(track(iter(zip(decoded, detections)), TrackConfig())), count)
    faces = [(frame, face) for frame, fs in tracked for face in fs]
    crops, affines = [], []

    def align():
        for frame, face in faces:
            affine = ffhq_affine(face.landmarks, size)
            affines.append(affine)
            crops.append(warp_crop(frame.image, affine, size))

    stages["align"] = _timed(align, count)
    identity = synth.random_identity(0, 0)
    heads = []
    stages["synthesize"] = _timed(lambda: [heads.extend(synth(np.stack(c), identity.expand(len(c), -1)))
                                           for c in batched(iter(crops), batch)], count)
    stages["synthesize"]["faces"] = len(crops)
    audited = tracked[:AUDIT_FRAMES]
    sources = [frame.image.copy() for frame, _ in audited]
    stages["paste"] = _timed(lambda: [paste_head(frame.image, head, a, original=c) for (frame, _), head, a, c in zip(faces, heads, affines, crops)], count)
    mask = CoverEngine("mask")  # the engine without a model: what replaces align + synthesize + paste
    stages["mask"] = _timed(lambda: [mask([(frame, fs)], [frame.image]) for frame, fs in tracked], count)
    try:
        auditor = FaceAuditor()
    except DeidError as exc:  # e.g. a machine without the dlib model package
        auditor, stages["audit"] = None, {"skipped": str(exc)}
    if auditor is not None:
        items = [AuditItem(frame.index, source, frame.image, np.array([f.box for f in fs], np.float64).reshape(-1, 4),
                           tuple(f.track_id for f in fs), tuple(float(face_roll(f.landmarks)) for f in fs))
                 for source, (frame, fs) in zip(sources, audited)]
        stages["audit"] = _audit_in_process(auditor, items, SourceFaces(auditor.config.refresh_shift))
        workers = audit_workers(torch.get_num_threads() if torch.device(device).type == "cpu" else 1)
        stages["audit_pool"] = _audit_in_pool(auditor.config, workers, items, batch)
        del items
    del sources
    with tempfile.TemporaryDirectory() as tmp:
        def encode():
            with VideoWriter(Path(tmp) / "enc.mp4", info) as writer:
                for frame in decoded:
                    writer.write(frame.image, frame.pts, frame.duration)

        stages["encode"] = _timed(encode, count)
        del decoded, tracked, faces, crops, heads
        full = Path(tmp) / "full.mp4"
        if frames and frames < info.frame_count:
            cut = Path(tmp) / "cut.mp4"
            _cut(clip, cut, frames)
            clip = cut
        for name, engine, audit in (("pipeline_no_audit", "generate", None), ("pipeline", "generate", AnonymizeJob.audit),
                                    ("pipeline_mask_no_audit", "mask", None), ("pipeline_mask", "mask", AnonymizeJob.audit)):
            if audit is not None and auditor is None:
                continue
            start = time.perf_counter()
            job = AnonymizeJob(inputs=(clip,), output=full, engine=engine, batch_size=batch, overwrite=True, audit=audit)
            (report,) = run_anonymize(job, model if engine == "generate" else None, device, precision)
            seconds = time.perf_counter() - start
            result[name] = {"frames": report.frames, "faces": report.faces, "seconds": round(seconds, 3),
                            "fps": round(report.frames / seconds, 2)}
    # the goals of issue 19: end to end >= 0.75x synthesis alone with the audit, >= 0.9x without
    synthesis_only = count / (stages["synthesize"]["seconds"] + stages["paste"]["seconds"])
    result["synthesis_only_fps"] = round(synthesis_only, 2)
    for name in ("pipeline", "pipeline_no_audit"):
        if name in result:
            result[f"{name}_vs_synthesis_only"] = round(result[name]["fps"] / synthesis_only, 3)
    if "pipeline" in result:  # what the audit adds to the whole pipeline
        result["audit_adds"] = round(result["pipeline"]["seconds"] / result["pipeline_no_audit"]["seconds"] - 1, 3)
    result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    return result


def _audit_in_process(auditor, items: list, memory) -> dict:
    """The audit on this thread, frame after frame, with milliseconds per frame spent in each pass (per turn)."""
    auditor.timings = {}
    stage = _timed(lambda: [auditor.check(item.index, item.source, item.output.copy(), item.replaced, tracks=item.tracks,
                                          rolls=item.rolls, memory=memory) for item in items], len(items))
    stage["ms_per_frame"] = round(1000 * stage["seconds"] / len(items), 1)
    stage["passes_ms_per_frame"] = {k: round(1000 * v / len(items), 1) for k, v in sorted(auditor.timings.items())}
    stage["source_descriptors_computed"] = memory.described
    auditor.timings = None
    return stage


def _audit_in_pool(config, workers: int, items: list, group: int) -> dict:
    """The same frames through the pool of audit worker processes (started before the clock runs)."""
    import dataclasses

    from deid.evaluation.audit_pool import AuditPool, new_stream

    pool = AuditPool(config, workers)
    try:
        pool.submit(new_stream(), items[:workers]).result()  # start the workers: dlib's models load once each
        stream = new_stream()

        def run():
            pending = [pool.submit(stream, [dataclasses.replace(item, output=item.output.copy()) for item in items[k:k + group]])
                       for k in range(0, len(items), group)]
            for p in pending:
                p.result()

        stage = _timed(run, len(items))
    finally:
        pool.close()
    stage["workers"] = workers
    return stage


def _cut(src: Path, dst: Path, frames: int) -> None:
    import ffmpeg

    from deid.media.video import ffmpeg_exe

    ffmpeg.input(str(src)).output(str(dst), vframes=frames, c="copy").overwrite_output().global_args("-loglevel", "error").run(cmd=ffmpeg_exe())


# ------------------------------------------------------------------------------------------- memory


def run_memory(clip: Path) -> dict:
    """The whole pipeline on one clip; the peak RSS of this process is the figure."""
    import torch

    from deid.devices import resolve_precision
    from deid.media.video import probe
    from deid.pipelines.anonymize import AnonymizeJob, run_anonymize

    info = probe(clip)
    model = _model("tiny")
    cpu = torch.device("cpu")
    sampler = _RssSampler()
    with tempfile.TemporaryDirectory() as tmp, sampler:
        start = time.perf_counter()
        job = AnonymizeJob(inputs=(clip,), output=Path(tmp) / "out.mp4")
        (report,) = run_anonymize(job, model, cpu, resolve_precision("auto", cpu))  # as `deid anonymize` runs it
        seconds = time.perf_counter() - start
    tenths = sampler.by_tenth()
    return {"bench": "memory", "clip": f"{clip.name} {info.width}x{info.height}", "duration_s": round(info.duration, 1),
            "torch_threads": torch.get_num_threads(),
            "frames": report.frames, "faces": report.faces, "seconds": round(seconds, 1),
            "audit": report.audit.record() if report.audit is not None else None,
            "fps": round(report.frames / seconds, 2), "peak_rss_mib": round(_peak_rss_mib(), 1),
            "peak_rss_with_audit_workers_mib": round(max(sampler.samples, default=0.0), 1),
            "rss_mib_by_tenth_of_run": tenths,
            "rss_mib_by_tenth_main_process": sampler.by_tenth(sampler.own),
            # the main process's malloc heap: what its allocations hold, and what the allocator keeps free (glibc)
            "heap_in_use_mib_by_tenth": sampler.by_tenth([used for used, _ in sampler.heap]) if sampler.heap else None,
            "heap_free_mib_by_tenth": sampler.by_tenth([free for _, free in sampler.heap]) if sampler.heap else None,
            # the acceptance figure: how much the RSS grows after the first tenth (a minute of a 10-minute clip)
            "rss_growth_after_first_tenth_mib": round(max(tenths[1:], default=tenths[0]) - tenths[0], 1)}


def _family(pid: int) -> list[int]:
    """This process and its descendants (the audit's worker processes among them)."""
    family, k = [pid], 0
    while k < len(family):
        for task in Path(f"/proc/{family[k]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                family += [int(child) for child in task.read_text().split()]
        k += 1
    return family


def _rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError):
        return 0.0  # it ended meanwhile


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (sizes in bytes)."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's mallinfo2 function, looked up once; None on other C libraries."""
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


def _malloc_heap_mib() -> tuple[float, float] | None:
    """(in use, free) MiB of this process's malloc heap, all arenas (glibc's mallinfo2), or None elsewhere. RSS that
    grows while `in use` stays flat is the allocator's free space, fragmented, not objects that are kept."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20


class _RssSampler:
    """Samples the resident memory of this process and its children (the audit's workers) twice a second while the
    block runs."""

    def __init__(self):
        import threading

        self.samples: list[float] = []  # the process and its children
        self.own: list[float] = []  # the process alone (the rest is the audit's workers)
        self.heap: list[tuple[float, float]] = []  # the process's malloc heap (glibc): bytes in use, bytes free (MiB)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            own, *children = (_rss_mib(pid) for pid in _family(os.getpid()))
            self.samples.append(own + sum(children))
            self.own.append(own)
            heap = _malloc_heap_mib()
            if heap is not None:
                self.heap.append(heap)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def by_tenth(self, samples: list[float] | None = None) -> list[float]:
        """The highest RSS (MiB) in each tenth of the run: flat when memory does not grow with length."""
        samples = self.samples if samples is None else samples
        parts = np.array_split(np.array(samples), 10) if len(samples) >= 10 else [np.array(samples)]
        return [round(float(p.max()), 1) for p in parts if len(p)]


def _scaled(src: Path, dst: Path, size: str) -> Path:
    """The clip scaled to `size` WxH (the crowd clip's four tiles at 720p: faces of about 150-200 pixels)."""
    import ffmpeg

    from deid.media.video import ffmpeg_exe

    if not dst.exists():
        width, height = size.split("x")
        ffmpeg.input(str(src)).video.filter("scale", width, height).output(
            str(dst), vcodec="libx264", crf=20, preset="veryfast", pix_fmt="yuv420p").overwrite_output().global_args(
            "-loglevel", "error").run(cmd=ffmpeg_exe())
    return dst


# ------------------------------------------------------------------------------------------- jitter


def run_jitter() -> dict:
    """Mean frame-to-frame change of the aligned crop box (centre x, y and side, pixels) on carphone."""
    from deid.faces.alignment import crop_box, ffhq_affine
    from deid.faces.detection import FaceDetector
    from deid.faces.tracking import TrackConfig, track
    from deid.media.samples import carphone_file
    from deid.media.video import read_frames

    frames = [f.image for f in read_frames(carphone_file())]
    detections = FaceDetector()(frames)
    config = TrackConfig()

    def jitter(landmarks) -> dict:
        boxes = np.stack([crop_box(ffhq_affine(lm, 256), 256) for lm in landmarks])
        steps = np.abs(np.diff(boxes, axis=0))
        return {"centre_px": round(float(np.hypot(steps[:, 0], steps[:, 1]).mean()), 3),
                "side_px": round(float(steps[:, 2].mean()), 3),
                "angle_deg": round(float(np.degrees(steps[:, 3]).mean()), 3)}

    tracked = list(track(iter(enumerate(detections)), config))
    return {"bench": "jitter", "clip": "carphone_pristine.mp4 (176x144, 120 frames)",
            "frames_with_face": sum(1 for d in detections if len(d)),
            "tracks": sorted({f.track_id for _, fs in tracked for f in fs}),
            "smoothing": {"radius": config.smooth_radius, "sigma": config.smooth_sigma},
            "before": jitter([d.landmarks[0] for d in detections if len(d)]),
            "after": jitter([fs[0].landmarks for _, fs in tracked if fs])}


# ------------------------------------------------------------------------------------------- heap


def run_heap(sizes: int) -> dict:
    """RSS growth of MTCNN alone against the variety of image sizes: `sizes` random sizes in turn, the same sizes
    again, then 8 sizes in turn as often (what the held-view scale ladder is for). Run it under
    `env MALLOC_MMAP_THRESHOLD_=...` to see what glibc's settings change."""
    import cv2

    from deid.faces.detection import FaceDetector
    from deid.media.samples import carphone_file
    from deid.media.video import read_frames

    image = next(iter(read_frames(carphone_file()))).image
    detector = FaceDetector()
    detector([image])
    rng = np.random.default_rng(0)
    varied = [(int(w), int(h)) for w, h in zip(rng.integers(120, 900, sizes), rng.integers(120, 700, sizes))]
    result = {"bench": "heap", "sizes": sizes}
    for name, plan in (("varied", varied), ("varied_again", varied), ("eight_in_turn", varied[:8] * (sizes // 8))):
        before, start = _rss_mib(os.getpid()), time.perf_counter()
        for size in plan:
            detector([cv2.resize(image, size)])
        result[name] = {"rss_growth_mib": round(_rss_mib(os.getpid()) - before, 1),
                        "seconds": round(time.perf_counter() - start, 1)}
    return result


# ------------------------------------------------------------------------------------------- versus deface


def run_versus_deface(clip: Path, deface: str, rounds: int) -> dict:
    """`deid anonymize --engine mask` with and without the audit, and deface (its defaults, audio kept), each run as
    the command a user types (start-up included), interleaved round by round on the same clip so that a shared
    machine's load falls on all of them alike. Raw seconds and frames/s of every run, and each one's median."""
    import os

    from deid.media.video import probe

    frames = probe(clip).frame_count
    with tempfile.TemporaryDirectory() as tmp:
        deid = [sys.executable, "-m", "deid.cli", "-q", "anonymize", str(clip), "--engine", "mask", "--overwrite"]
        commands = {"deface": [deface, str(clip), "-o", f"{tmp}/deface.mp4", "--keep-audio"],
                    "deid_mask_no_audit": [*deid, "-o", f"{tmp}/mask_no_audit.mp4", "--no-audit"],
                    "deid_mask": [*deid, "-o", f"{tmp}/mask.mp4"]}
        env = {**os.environ, "DEID_HOME": f"{tmp}/deid-home", "DEID_OFFLINE": "1",  # a fresh install, offline
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        runs: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, command in commands.items():
                start = time.perf_counter()
                subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                runs[name].append(round(time.perf_counter() - start, 2))
                print(json.dumps({"run": name, "seconds": runs[name][-1], "frames": frames}), file=sys.stderr, flush=True)
    result = {"bench": "versus_deface", "clip": f"{clip.name}", "frames": frames, "rounds": rounds,
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    for name, seconds in runs.items():
        result[name] = {"seconds": seconds, "fps": [round(frames / s, 2) for s in seconds],
                        "median_fps": round(frames / float(np.median(seconds)), 2)}
    deface_fps = result["deface"]["median_fps"]
    result["mask_no_audit_vs_deface"] = round(result["deid_mask_no_audit"]["median_fps"] / deface_fps, 2)
    result["mask_vs_deface"] = round(result["deid_mask"]["median_fps"] / deface_fps, 2)
    return result


# ------------------------------------------------------------------------------------------- main


def _crowd_clip(cache: Path, minutes: float, fps: int, size: str) -> Path:
    """The crowd clip (real faces, 0-4 per frame: deid.media.samples) of this length and rate, scaled to `size`."""
    from deid.media.samples import make_crowd_clip

    crowd = cache / f"crowd_{minutes:g}min_{fps}fps.mp4"
    if not crowd.exists():
        make_crowd_clip(crowd, minutes * 60, fps)
    return _scaled(crowd, cache / f"crowd_{minutes:g}min_{fps}fps_{size}.mp4", size)


def _subprocess(args: list[str]) -> None:
    """Run one measurement in a fresh interpreter (its own peak RSS); its JSON goes to our stdout."""
    subprocess.run([sys.executable, __file__, *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["stages", "memory", "jitter", "deface", "heap", "all"])
    parser.add_argument("--sizes", type=int, default=200, help="heap: image sizes MTCNN is run on in turn")
    parser.add_argument("--seconds", type=float, default=10.0, help="stages: clip length")
    parser.add_argument("--size", default="1280x720", help="stages, memory: clip size WxH")
    parser.add_argument("--model", choices=["tiny", "256"], default="tiny", help="stages: random-weight model size")
    parser.add_argument("--frames", type=int, default=None, help="stages: only the first N frames")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="stages: the model's precision, as `deid anonymize --precision` takes it")
    parser.add_argument("--crowd", action="store_true",
                        help="stages: the crowd clip (0-4 real faces per frame, at --fps) instead of carphone")
    parser.add_argument("--minutes", type=float, default=10.0, help="memory: clip length")
    parser.add_argument("--fps", type=int, default=5, help="memory, stages --crowd: clip frame rate (frames are what costs time and memory)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, as `deid anonymize` runs; 1 gives decode, "
                             "encode and the audit the other cores, and hides what they cost; a shared "
                             "machine's oversubscribed OpenMP pool is an order of magnitude slower)")
    parser.add_argument("--deface", default="deface", help="deface: its command (deface 1.5.0, in its own venv)")
    parser.add_argument("--rounds", type=int, default=2, help="deface: interleaved rounds of the three commands")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "deid-bench", help="where clips are made")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    from deid.console import set_quiet

    set_quiet(True)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.what == "all":
        _subprocess(["jitter"])
        _subprocess(["stages", "--model", "tiny"])
        _subprocess(["stages", "--model", "256", "--frames", "60"])
        _subprocess(["memory", "--minutes", "1"])
        _subprocess(["memory", "--minutes", "10"])
        return
    if args.what == "jitter":
        result = run_jitter()
    elif args.what == "heap":
        result = run_heap(args.sizes)
    elif args.what == "stages":
        if args.crowd:
            clip = _crowd_clip(args.cache, args.seconds / 60, args.fps, args.size)
        else:
            clip = _make_clip(args.cache / f"carphone_{args.size}_{args.seconds:g}s.mp4", args.seconds, args.size)
        result = run_stages(clip, args.model, args.frames, precision_name=args.precision)
    elif args.what == "deface":
        clip = _make_clip(args.cache / f"carphone_{args.size}_{args.seconds:g}s.mp4", args.seconds, args.size)
        result = run_versus_deface(clip, args.deface, args.rounds)
    else:
        # real faces whose number changes (0-4 per frame): a one-face clip hides memory that grows with the
        # variety of batch shapes
        result = run_memory(_crowd_clip(args.cache, args.minutes, args.fps, args.size))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
