"""The measurements of bench/suite.py, each run in its own process by `run_worker`.

Every function takes its group's settings (`spec`), the device and a `Recorder`, and records one row per
variant (a precision, a batch size, a face count): the figures, a one-line `summary` for the README table, and
for a variant that failed its error. A variant that raises (an out-of-memory, a CUDA error, a compile failure)
is recorded and the next one still runs; a crash of the whole process is recorded by the suite.
Rows are appended to the result file as they finish, so a process killed at its deadline keeps what it measured.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import deid  # noqa: F401 - before torch: deid sets torch's OpenMP spin as the CLI runs it (deid/__init__.py)
import torch

from deid.console import set_quiet
from deid.nets.encoders import AttributeEncoderConfig, IdentityEncoderConfig, LandmarkEncoder, LandmarkEncoderConfig
from deid.nets.model import Disentangler, ModelConfig, build_discriminator
from deid.nets.presets import TINY_GENERATOR_CONFIG, TINY_MODEL_CONFIG
from deid.distributed import Dist
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator
from deid.train.config import TrainConfig, Validation
from deid.train.data import default_workers
from deid.train.make_dataset import DatasetWriter, MakeDatasetConfig, auto_batch_size, encode_png, make_dataset, png_threads
from deid.train.trainer import Trainer, train

PRECISION_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckFailed(Exception):
    """A measurement ran but a check on it failed (e.g. fewer faces replaced than shown): its row is failed and
    keeps its figures."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


class Recorder:
    """Appends one JSON row per variant to the result file; stops starting variants past the deadline."""

    def __init__(self, path: Path, deadline: float, device: torch.device):
        self.path, self.deadline, self.device = Path(path), deadline, device

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def row(self, variant: str, measure) -> dict:
        if self.seconds_left() <= 0:
            row = {"variant": variant, "status": "skipped", "summary": "not measured", "note": "the budget ran out"}
        else:
            reset_peak_memory(self.device)
            try:
                row = {"variant": variant, "status": "ok", **measure()}
            except CheckFailed as exc:
                row = {"variant": variant, **exc.figures, "status": "failed", "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded; the next variant still runs
                row = {"variant": variant, "status": "failed", "summary": "failed", "error": first_line(exc)}
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row


def run_worker(measure: str, spec: dict, device: str, result: Path, deadline: float, fail: bool) -> None:
    """Entry point of one group's process (bench/suite.py --worker)."""
    set_quiet(True)
    if fail:
        raise RuntimeError("injected failure (--inject-failure): this group's process stops here")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.init()
    MEASURES[measure](spec, dev, Recorder(result, deadline, dev))


# ------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the variant began (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core maths for fp32 convolutions and matrix products (PyTorch enables it for cuDNN by default)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def pytorch_defaults() -> None:
    """The backend flags a fresh `deid` process runs with (make_dataset turns TF32 off and determinism on)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_fitting(first: int, cap: int, attempt, device: torch.device, rec: Recorder, reserve_s: float):
    """Double the batch from `first` up to `cap` while attempt(batch) runs (and `reserve_s` of the budget is left).
    Returns ((the last batch that ran, what attempt returned) or None, why the search stopped: the batch that
    failed and how, the cap, or the budget)."""
    best, batch = None, first
    while True:
        if batch > cap:
            return best, f"the cap: batch {batch} is over the search's limit of {cap} (a larger one may fit)"
        if rec.seconds_left() <= reserve_s:
            return best, f"the budget: {max(rec.seconds_left(), 0):.0f} s left before batch {batch}"
        try:
            best = (batch, attempt(batch))
        except RuntimeError as exc:  # out of memory, or a library's own allocation failure (cuDNN, cuBLAS)
            return best, f"batch {batch}: " + ("out of memory" if is_out_of_memory(exc) else first_line(exc))
        finally:  # the failed attempt's tensors are gone by now: hand their memory back
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2


def once(compute):
    """compute() at the first call; later calls return its result, or raise its error, again without rerunning it."""
    outcome: dict = {}

    def call():
        if not outcome:
            try:
                outcome["value"] = compute()
            except Exception as exc:  # noqa: BLE001 - raised again to every caller
                outcome["error"] = exc
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return call


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def generator_config(name) -> GeneratorConfig:
    """'tiny' (32 px) and 'tiny64' stand in for 256 and 1024 in --quick; a dict is a published architecture."""
    if name == "tiny":
        return TINY_GENERATOR_CONFIG
    if name == "tiny64":
        return dataclasses.replace(TINY_GENERATOR_CONFIG, resolution=64)
    return GeneratorConfig(**name)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR of images in [-1, 1] (peak-to-peak 2); None when they are identical (plain JSON has no infinity)."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).square().mean().item()
    return None if mse == 0 else round(10 * math.log10(4.0 / mse), 2)


def timed(fn, device: torch.device, min_calls: int, max_calls: int, min_seconds: float) -> float:
    """Median seconds of one call of `fn` (already warmed up): at least min_calls calls and min_seconds in all,
    at most max_calls."""
    times: list[float] = []
    while len(times) < min_calls or (sum(times) < min_seconds and len(times) < max_calls):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------- synthesis


def measure_synthesis(spec: dict, device: torch.device, rec: Recorder) -> None:
    """Images/s of G.synthesis per precision and batch (w from the mapping network, constant noise)."""
    base = load_generator("random", config=generator_config(spec["generator"]), seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    torch.backends.cudnn.benchmark = True  # fixed shapes per variant: the fastest kernels, found once per shape
    set_tf32(False)
    reference_model = copy.deepcopy(base).to(device)  # outside inference mode: its weights stay ordinary tensors
    with torch.inference_mode():
        w_check = reference_model.mapping(torch.randn(8, base.z_dim, generator=gen).to(device))
        reference = reference_model.synthesis(w_check).clamp(-1, 1)  # fp32, eager: what every variant is compared with
        del reference_model
    for precision in spec["precisions"]:
        rec.row(precision, lambda: _synthesis_variant(base, precision, spec, device, w_check, reference, rec))


def _synthesis_variant(base, precision: str, spec: dict, device: torch.device, w_check, reference, rec: Recorder) -> dict:
    if precision == "fp16" and device.type == "cpu":
        return {"status": "skipped", "summary": "not measured", "note": "fp16 needs a GPU"}
    set_tf32(precision == "tf32")
    G = copy.deepcopy(base).to(device).to(PRECISION_DTYPES[precision])
    if spec.get("channels_last"):
        G.synthesis.set_channels_last(True)
    synthesis = G.synthesis
    if spec.get("compile"):
        synthesis = torch.compile(G.synthesis, backend=spec.get("compile_backend", "inductor"), dynamic=False)
    calls = {"min_calls": spec.get("repeats_min", 3 if spec["min_seconds"] else 1), "max_calls": spec["repeats"],
             "min_seconds": spec["min_seconds"]}
    out: dict = {"precision": precision, "compile": bool(spec.get("compile")), "channels_last": bool(spec.get("channels_last")),
                 "images_per_second": {}, "first_call_seconds": {}}
    with torch.inference_mode():
        for batch in spec["batches"]:
            w = G.mapping(torch.randn(batch, G.z_dim, device=device))
            start = time.perf_counter()
            synthesis(w)  # warm-up: cuDNN autotuning, and for torch.compile the compilation of this shape
            sync(device)
            out["first_call_seconds"][batch] = round(time.perf_counter() - start, 2)
            out["images_per_second"][batch] = round(batch / timed(lambda: synthesis(w), device, **calls), 2)
        out["psnr_vs_fp32_db"] = psnr_db(synthesis(w_check), reference)
        if spec["largest_cap"]:
            largest, out["largest_search_stopped"] = _largest_synthesis_batch(G, synthesis, spec, device, rec)
            if largest:
                out["largest_batch"], out["largest_images_per_second"] = largest
    out["peak_gpu_gib"] = peak_memory_gib(device)
    ips = out["images_per_second"]
    parts = [f"b{b}: {v:g}" for b, v in ips.items()]
    if "largest_batch" in out:
        parts.append(f"largest b{out['largest_batch']}: {out['largest_images_per_second']:g}")
    psnr = out["psnr_vs_fp32_db"]
    summary = f"{', '.join(parts)} img/s; PSNR vs fp32 {'- (identical)' if psnr is None else f'{psnr} dB'}"
    if spec.get("compile"):
        summary += f"; first call (compile) {max(out['first_call_seconds'].values()):.1f} s"
    out["summary"] = summary
    return out


def _largest_synthesis_batch(G, synthesis, spec, device, rec: Recorder):
    """The largest batch past the listed ones that fits (up to the cap) with its images/s, and why the search
    stopped (largest_fitting)."""

    def attempt(batch: int) -> float:
        w = G.mapping(torch.randn(batch, G.z_dim, device=device))
        synthesis(w)  # warm-up
        sync(device)
        return round(batch / timed(lambda: synthesis(w), device, 1, 2, 0.0), 2)

    return largest_fitting(max(spec["batches"]) * 2, spec["largest_cap"], attempt, device, rec, reserve_s=10)


# ------------------------------------------------------------------------------------------- make-dataset


def measure_make_dataset(spec: dict, device: torch.device, rec: Recorder) -> None:
    """`deid make-dataset` end to end, its sampling alone (no PNG), and PNG encoding alone."""
    G = load_generator("random", config=generator_config(spec["generator"]), seed=0).to(device).eval()
    n = spec["n"]
    with tempfile.TemporaryDirectory() as tmp:
        config = MakeDatasetConfig(out=Path(tmp) / "ds", n=n, generator="random", device=str(device))
        batch = auto_batch_size(device, G.resolution)
        images: list[np.ndarray] = []

        def end_to_end() -> dict:
            start = time.perf_counter()
            make_dataset(config, generator=G)
            seconds = time.perf_counter() - start
            return {"images": n, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
                    "batch_size": batch, "png_threads": png_threads(), "peak_gpu_gib": peak_memory_gib(device),
                    "summary": f"{n / seconds:.1f} img/s ({n} images, batch {batch}, {png_threads()} PNG threads)"}

        def sampling() -> dict:
            writer = DatasetWriter(config, G, Dist())
            start = time.perf_counter()
            for s in range(0, n, batch):
                imgs, _ = writer.generate(s, min(n, s + batch), device)
                if len(images) < 256:
                    images.extend(imgs[: 256 - len(images)])
            seconds = time.perf_counter() - start
            return {"images": n, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
                    "summary": f"{n / seconds:.1f} img/s (z sampling, mapping, synthesis, to uint8 on the host)"}

        def png() -> dict:
            with ThreadPoolExecutor(max_workers=png_threads()) as pool:
                start = time.perf_counter()
                count = sum(1 for _ in pool.map(encode_png, images))
                seconds = time.perf_counter() - start
            return {"images": count, "seconds": round(seconds, 3), "images_per_second": round(count / seconds, 1),
                    "summary": f"{count / seconds:.1f} img/s ({png_threads()} threads)"}

        rec.row("end to end", end_to_end)
        rec.row("without PNG", sampling)
        rec.row("PNG encoding alone", png)


# ------------------------------------------------------------------------------------------- training


def _model_config(kind: str, G) -> ModelConfig:
    if kind == "tiny":
        return TINY_MODEL_CONFIG.for_generator(G)
    return ModelConfig(generator="random", identity=IdentityEncoderConfig(source="random"),
                       attributes=AttributeEncoderConfig(source="random"),
                       landmarks=LandmarkEncoderConfig(source="random")).for_generator(G)


def measure_train(spec: dict, device: torch.device, rec: Recorder) -> None:
    """Steps/s of `deid train`'s own loop (DataLoader workers, uploads, logging) on a generated dataset."""
    G = load_generator("random", config=generator_config(spec["generator"]), seed=0)
    model_config = _model_config(spec["model"], G)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(MakeDatasetConfig(out=data, n=spec["samples"], generator="random", device=str(device)),
                     generator=copy.deepcopy(G).to(device))
        pytorch_defaults()
        for batch in spec["batches"]:
            for precision in spec["precisions"]:
                if batch == "largest":
                    rec.row(f"largest batch, {precision}",
                            lambda p=precision: _train_largest(data, Path(tmp) / f"run-largest-{p}", G, model_config, p,
                                                               spec, device, rec))
                else:
                    rec.row(f"batch {batch}, {precision}",
                            lambda b=batch, p=precision: _train_run(data, Path(tmp) / f"run-{b}-{p}", G, model_config, b, p,
                                                                    spec, device))


def _train_largest(data: Path, out: Path, G, model_config, precision: str, spec: dict, device, rec: Recorder) -> dict:
    """Steps/s at the largest batch that fits in this precision (searched once, for this precision alone), and
    why the search stopped."""
    batch, stopped = _largest_train_batch(G, model_config, precision, spec, device, rec)
    if batch is None:
        raise RuntimeError(f"no batch fits: the search from batch 12 stopped at {stopped}")
    reset_peak_memory(device)  # the row's peak is the run's own, not the search's
    row = _train_run(data, out, G, model_config, batch, precision, spec, device)
    row["largest_search_stopped"] = stopped
    row["summary"] = f"batch {batch}: {row['summary']}"
    row["note"] = f"largest-batch search ended at {stopped}"
    return row


def _train_run(data: Path, out: Path, G, model_config, batch: int, precision: str, spec: dict, device) -> dict:
    """2 x spec['steps'] steps: the first window warms up, the second is the figure (two logged windows)."""
    steps = spec["steps"]
    if batch * 2 > spec["samples"]:
        raise ValueError(f"batch {batch} needs {2 * batch} samples, the dataset has {spec['samples']}")
    config = TrainConfig(data=data, out=out, model=model_config, steps=2 * steps, batch_size=batch, precision=precision,
                         device=str(device), checkpoint_every=10**9, sample_every=0, tensorboard=False, log_every=steps,
                         validation=Validation(every=0))
    pytorch_defaults()  # what `deid train` runs with (it turns on cuDNN autotuning itself)
    train(config)
    last = json.loads((out / "losses.jsonl").read_text().splitlines()[-1])
    rate, wait = last["steps_per_second"], last["data_wait_fraction"]
    return {"batch": batch, "precision": precision, "timed_steps": steps, "steps_per_second": round(rate, 3),
            "samples_per_second": round(rate * batch, 1), "data_wait_fraction": round(wait, 4),
            "data_workers": default_workers(device), "peak_gpu_gib": peak_memory_gib(device),
            "summary": f"{rate:.3g} steps/s ({rate * batch:.1f} samples/s), data wait {100 * wait:.1f} %"
                       + (f", peak {peak_memory_gib(device)} GiB" if device.type == "cuda" else "")}


def _largest_train_batch(G, model_config, precision: str, spec: dict, device, rec: Recorder) -> tuple[int | None, str]:
    """Double the batch from 12 (6 is the batch-6 group's) while a reconstruction + adversarial step (the largest
    kind) still fits. Returns (the largest batch that ran, or None when none did; why the search stopped)."""
    model = Disentangler(model_config, copy.deepcopy(G)).to(device)
    config = TrainConfig(data=None, out=None, model=model_config, batch_size=6, precision=precision)
    trainer = Trainer(config, model, LandmarkEncoder(model_config.landmarks).to(device),
                      build_discriminator(model_config, G.w_dim).to(device), dtype=PRECISION_DTYPES[precision])

    def attempt(batch: int) -> None:
        images = torch.rand(batch, 3, G.resolution, G.resolution, device=device) * 2 - 1
        trainer.step(2, images, images, torch.randn(batch, G.w_dim, device=device))
        sync(device)

    found, stopped = largest_fitting(12, spec["largest_cap"], attempt, device, rec, reserve_s=30)
    return (found[0] if found else None), stopped


# ------------------------------------------------------------------------------------------- anonymize


def make_face_clip(path: Path, size: tuple[int, int], frames: int, faces: int, fps: int = 30) -> Path:
    """A clip of `faces` copies of scikit-image's astronaut head drifting over a gradient, H.264 through PyAV
    (no ffmpeg binary, nothing downloaded)."""
    import av
    import cv2
    from skimage.data import astronaut

    width, height = size
    head_side = int(min(0.6 * height, width / max(faces, 1)))
    head = cv2.resize(astronaut()[10:310, 100:400], (head_side, head_side), interpolation=cv2.INTER_AREA)
    background = np.linspace(40, 200, height, dtype=np.float32)[:, None, None].repeat(width, 1).repeat(3, 2).astype(np.uint8)
    container = av.open(str(path), mode="w")
    try:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i in range(frames):
            frame = background.copy()
            for k in range(faces):
                x = int((k + 0.5) * width / faces - head_side / 2 + 0.02 * head_side * math.sin(i / 5 + k))
                y = int((height - head_side) / 2 + 0.02 * head_side * math.cos(i / 7 + k))
                x, y = min(max(x, 0), width - head_side), min(max(y, 0), height - head_side)
                frame[y:y + head_side, x:x + head_side] = head
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def measure_anonymize(spec: dict, device: torch.device, rec: Recorder) -> None:
    """`deid anonymize` stage by stage and end to end (bench/video_pipeline.py's stages) on synthetic clips: per
    face count and engine (generate, and mask, which runs no model) a row without the privacy audit (the figure of
    the 60 frames/s goal) and a row with it (what `deid anonymize` runs by default), all from one run."""
    import video_pipeline  # bench/ is on sys.path (this process was started as bench/suite.py)

    width, height = spec["size"]
    with tempfile.TemporaryDirectory() as tmp:
        for faces in spec["faces"]:
            @once
            def stages(faces=faces):  # every row of this face count reads one run (both engines, audit off and on)
                clip = make_face_clip(Path(tmp) / f"faces{faces}.mp4", (width, height), spec["frames"], faces)
                return video_pipeline.run_stages(clip, spec["model"], None, device=device)

            label = f"{faces} face{'s' if faces > 1 else ''}"
            for engine in ("generate", "mask"):
                name = label if engine == "generate" else f"{label}, mask engine"
                rec.row(f"{name}, no audit", lambda faces=faces, stages=stages, engine=engine:
                        anonymize_row(stages(), faces, False, device, engine))
                rec.row(f"{name}, with the audit", lambda faces=faces, stages=stages, engine=engine:
                        anonymize_row(stages(), faces, True, device, engine))


# The stages each engine runs (the mask engine neither aligns nor synthesizes nor pastes).
ENGINE_STAGES = {"generate": ("decode", "detect", "detect_roll_robust", "track_smooth", "align", "synthesize", "paste",
                              "audit", "encode"),
                 "mask": ("decode", "detect_roll_robust", "track_smooth", "mask", "audit", "encode")}


def anonymize_row(result: dict, faces: int, audited: bool, device: torch.device, engine: str = "generate") -> dict:
    """One row from bench/video_pipeline.run_stages' result: one engine's threaded pipeline with or without the
    audit. Fails (CheckFailed, figures kept) when the faces covered are not the faces the clip shows in every frame."""
    stages = result["stages"]
    prefix = "pipeline" if engine == "generate" else "pipeline_mask"
    key = prefix if audited else f"{prefix}_no_audit"
    if key not in result:  # the audit's dlib and its model files are missing (see bench/README.md)
        raise RuntimeError(f"audit not measured: {stages['audit']['skipped']}")
    whole = result[key]
    shown = faces * result["frames"]
    verb = "replaced" if engine == "generate" else "masked"
    row = {"engine": engine, "clip": result["clip"], "frames": result["frames"], "faces_per_frame": faces,
           "faces_shown": shown, "faces_found": whole["faces"], "audited": audited, "end_to_end_fps": whole["fps"],
           "peak_gpu_gib": peak_memory_gib(device), "peak_rss_mib": result["peak_rss_mib"]}
    if audited:
        row["audit_ms_per_frame"] = stages["audit"]["ms_per_frame"]
        row["audit_adds"] = round(whole["seconds"] / result[f"{prefix}_no_audit"]["seconds"] - 1, 3)
        row["summary"] = (f"{whole['fps']:g} fps end to end with the audit ({whole['faces']} faces {verb}); the audit "
                          f"alone {stages['audit']['ms_per_frame']:g} ms/frame, adds {100 * row['audit_adds']:.0f} %")
    else:
        row["stages_fps"] = {name: stages[name]["fps"] for name in ENGINE_STAGES[engine] if "fps" in stages.get(name, {})}
        row["summary"] = (f"{whole['fps']:g} fps end to end without the audit ({whole['faces']} faces {verb}); "
                          + ", ".join(f"{k} {v:g}" for k, v in row["stages_fps"].items()) + " fps")
        row["note"] = "without the audit, which deid anonymize runs by default (next row)"
    if whole["faces"] != shown:
        raise CheckFailed(f"{whole['faces']} faces {verb}, the clip shows {shown} ({faces} in each of "
                          f"{result['frames']} frames)", row)
    return row


def measure_audit_pool(spec: dict, device: torch.device, rec: Recorder) -> None:
    """The privacy audit's worker pool alone (deid.evaluation.audit_pool): frames/s by worker count (spec "workers",
    "all" for every core) on a synthetic
    clip, faces from MTCNN on the device. Worst case: the output is the source (a model that failed), so every face
    is a leak, measured, covered and looked at again. Whether 60 frames/s with the audit holds is this row's
    largest pool against the anonymize rows' synthesis."""
    from deid.evaluation.audit import AuditConfig
    from deid.evaluation.audit_pool import AuditItem, AuditPool, audit_workers, new_stream
    from deid.faces.detection import FaceDetector
    from deid.faces.orientation import face_roll
    from deid.media.video import read_frames

    width, height = spec["size"]
    detector = FaceDetector(device=device)
    cores = audit_workers(0)
    with tempfile.TemporaryDirectory() as tmp:
        for faces in spec["faces"]:
            clip = make_face_clip(Path(tmp) / f"faces{faces}.mp4", (width, height), spec["frames"], faces)
            frames = [frame.image for frame in read_frames(clip)]
            found = detector(frames)
            items = [AuditItem(k, image, image, d.boxes.astype(np.float64), tuple(range(len(d))),
                               tuple(float(r) for r in face_roll(d.landmarks)))
                     for k, (image, d) in enumerate(zip(frames, found))]
            # "all": every core synthesis would leave free here (all of them, for the audit alone)
            for workers in sorted({cores if w == "all" else w for w in spec["workers"] if w == "all" or w <= cores}):
                def measure(workers=workers, items=items, faces=faces) -> dict:
                    pool = AuditPool(AuditConfig(), workers)
                    try:
                        pool.submit(new_stream(), items[:workers]).result()  # start the workers (dlib's models load)
                        start = time.perf_counter()
                        stream = new_stream()
                        pending = [pool.submit(stream, [dataclasses.replace(item, output=item.output.copy())
                                                        for item in items[k:k + spec["group"]]])
                                   for k in range(0, len(items), spec["group"])]
                        audits = [audit for group in pending for audit in group.result()]
                        seconds = time.perf_counter() - start
                    finally:
                        pool.close()
                    fps = len(audits) / seconds
                    return {"clip": f"{width}x{height}", "faces_per_frame": faces, "workers": workers,
                            "frames": len(audits), "faces_found": sum(len(a.faces) for a in audits),
                            "fps": round(fps, 2), "summary": f"{fps:.1f} frames/s with {workers} audit worker(s) "
                                                            f"(worst case: every face leaks and is covered)"}

                rec.row(f"{faces} face{'s' if faces > 1 else ''}, {workers} worker(s)", measure)


MEASURES = {"synthesis": measure_synthesis, "make_dataset": measure_make_dataset, "train": measure_train,
            "anonymize": measure_anonymize, "audit_pool": measure_audit_pool}
