"""`deid evaluate`: the paper's Table 1 (random identity/attribute pairs) and Table 2 (reconstruction), and a
re-identification audit of an anonymized video against its original.

Every number comes from networks independent of deid's training (deid.evaluation.metrics: dlib landmarks and ResNet
recognizer, solvePnP pose, pytorch-fid's Inception). Reports are built in `.NAME.partial/` beside the target
directory and renamed into place when complete; `--resume` continues an interrupted pairs run from its last
checkpoint (per-item records in JSONL, FID statistics in an .npz).
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from deid import __version__
from deid.atomic import atomic_output, write_text_atomic
from deid.console import info, progress, warn
from deid.dataset import GeneratedDataset, verify_dataset
from deid.errors import DatasetError, DeidError, MediaError, NoFaceError
from deid.evaluation.audit import AuditConfig, AuditTotals, FaceAuditor
from deid.evaluation.metrics import (
    FID_CROP,
    FID_FEATURES,
    FaceMeter,
    FeatureStats,
    FIDInception,
    MeasuredFace,
    box_side,
    compare_faces,
    cosine_similarity,
    frechet_distance,
    psnr,
    rmse,
    square_crop,
)
from deid.evaluation.recognizers import DLIB_SAME_PERSON_DISTANCE
from deid.faces.alignment import align_photo
from deid.faces.detection import FaceDetector, box_iou
from deid.faces.tracking import track
from deid.media.images import IMAGE_EXTENSIONS, load_image, save_image, to_tensor, to_uint8
from deid.media.video import probe, read_frames, to_display
from deid.nets.encoders import weights_fingerprint
from deid.pipelines.report import (
    Report,
    Table,
    draw_boxes,
    fmt,
    image_row,
    mean_std,
    plot_histograms,
    plot_series,
    write_html,
    write_metrics,
)
from deid.runs import complete_lines, read_records
from deid.devices import Precision
from deid.weights import resolve

# Detection and dlib's landmarks need faces of roughly 80+ pixels; smaller crops (tiny test models) are
# measured upscaled. Landmark errors are divided by the image side and the pose camera scales with the
# image, so the numbers do not depend on this size.
MIN_MEASURE_SIZE = 160
CHECKPOINT_EVERY = 256  # items between resumable checkpoints of a pairs run
PSNR_PLOT_CAP = 60.0  # dB; higher (and infinite) PSNRs plot here
SAMPLE_HEIGHT = 240  # video sample rows are scaled up to at least this height to be legible


@dataclass(frozen=True)
class PairsJob:
    """`deid evaluate pairs`: Table 1 on `n` random (I_id, I_attr) pairs, Table 2 on up to `n` images."""

    output: Path
    images: Path | None = None  # a folder of photos (aligned with deid.faces.alignment)
    dataset: Path | None = None  # or a generated dataset (train/make_dataset.py)
    n: int = 10000
    max_items: int | None = None  # use only the first K source images
    seed: int = 0
    batch_size: int = 8
    reconstruction: bool = True
    fid: bool = True
    fid_weights: str = "inception-v3-fid"  # registry name, file, or "random" (plumbing tests only)
    fid_dims: int = FID_FEATURES  # 2048: the standard FID; 64/192/768: pytorch-fid's cheaper, non-comparable variants
    samples: int = 8  # sample rows shown in index.html per table
    overwrite: bool = False
    resume: bool = False

    def check(self) -> None:
        """Refuse bad options and paths before any model is loaded (DeidError): the photos or dataset, the report
        folder, the FID weights (fetched now when missing and online)."""
        if (self.images is None) == (self.dataset is None):
            raise DeidError("give exactly one of --images DIR or --dataset DIR.")
        if self.images is not None and not Path(self.images).is_dir():
            raise MediaError(f"{self.images}: not a directory. --images takes a folder of face photos.")
        if self.dataset is not None:
            verify_dataset(self.dataset)
        _check_work_dir(self.output, self.overwrite, self.resume)
        if self.fid:
            resolve(self.fid_weights)


@dataclass(frozen=True)
class VideoAuditJob:
    """`deid evaluate video`: per-frame comparison of an anonymized video with its original."""

    original: Path
    anonymized: Path
    output: Path
    max_items: int | None = None  # evaluate only the first K frames
    match_iou: float = 0.3  # an output face belongs to an original face when their boxes overlap this much
    unchanged_psnr: float = 35.0  # dB; a face region this close to the original was not anonymized (missed)
    samples: int = 6  # sample frame pairs shown in index.html
    overwrite: bool = False


# ------------------------------------------------------------------------------------ report folders


def _work_dir(output: Path, overwrite: bool, resume: bool = False, resumable: bool = True) -> Path:
    """The hidden folder a report is built in; refuses to clobber anything without --overwrite/--resume.
    A non-resumable job simply starts its folder afresh."""
    work = _check_work_dir(output, overwrite, resume, resumable)
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    (work / "samples").mkdir(exist_ok=True)
    return work


def _check_work_dir(output: Path, overwrite: bool, resume: bool = False, resumable: bool = True) -> Path:
    """`_work_dir`'s refusals, without touching anything; returns the work folder's path."""
    output = Path(output)
    if not output.parent.is_dir():
        raise MediaError(f"{output}: the directory {output.parent} does not exist. Create it first or choose another -o.")
    if output.exists():
        if not overwrite:
            raise MediaError(f"{output} already exists. Pass --overwrite to replace it, or choose another -o.")
        if not output.is_dir() or (any(output.iterdir()) and not (output / "metrics.json").is_file()):
            raise MediaError(f"{output} exists and is not a deid report; --overwrite only replaces reports. Choose another -o.")
    work = output.parent / f".{output.name}.partial"
    if work.exists() and not resume and resumable and not overwrite:
        raise MediaError(f"{work} holds an interrupted run. Pass --resume to continue it, or --overwrite to start over.")
    return work


def _publish(work: Path, output: Path) -> None:
    """Move the finished report into place (replacing an old report only after the new one is complete)."""
    trash = None
    if output.exists():
        trash = output.parent / f".{output.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        output.rename(trash)
    work.rename(output)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _versions() -> dict[str, str]:

    found = {"deid": __version__, "python": sys.version.split()[0]}
    for name in ("torch", "torchvision", "numpy", "opencv-python", "facenet-pytorch", "dlib-bin", "pytorch-fid", "scipy", "av"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _model_identity(model, source: str | None) -> dict:
    """What identifies the model under test: its checkpoint header (config, step, generator fingerprint)
    and the fingerprints of its trained parts."""

    identity = {"source": source}
    if hasattr(model, "header"):
        identity.update(model.header())
    for part in ("attribute_encoder", "mapper"):
        if isinstance(getattr(model, part, None), torch.nn.Module):
            identity[f"{part}_fingerprint"] = weights_fingerprint(getattr(model, part))
    generator = getattr(model, "generator", None)
    if generator is not None:
        identity["generator"] = {"source": str(getattr(generator, "source", "")), "fingerprint": str(getattr(generator, "fingerprint", ""))}
    return identity


# ---------------------------------------------------------------------------------------- real faces


class FaceSource:
    """Real aligned heads by index, from a folder of photos or a generated dataset; [R, R, 3] uint8 RGB.

    Photos are aligned on demand (a small cache; memory does not grow with the folder), so a photo
    without a detectable face only costs the pairs that use it."""

    def __init__(self, job: PairsJob, resolution: int):
        self.resolution = resolution
        if job.images is not None:  # (PairsJob.check has vetted the paths)
            folder = Path(job.images)
            self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.dataset = None
            self.detector = FaceDetector()
            count = len(self.files)
            self.description = f"photos in {folder}"
        else:
            self.dataset = GeneratedDataset(job.dataset)
            if int(self.dataset.manifest["resolution"]) != resolution:
                raise DatasetError(f"{job.dataset}: images are {self.dataset.manifest['resolution']} px but the model makes "
                                   f"{resolution} px. Use a dataset made with the model's generator.")
            count = len(self.dataset)
            self.description = (f"generated dataset {job.dataset} (generator "
                                f"{str(self.dataset.manifest.get('generator_fingerprint', '?'))[:12]})")
        self.count = min(count, job.max_items) if job.max_items else count
        if self.count < 2:
            raise MediaError(f"{job.images or job.dataset}: needs at least two face images, found {self.count}.")

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return self.files[index].name if self.dataset is None else f"#{index}"

    @functools.lru_cache(maxsize=64)
    def head(self, index: int) -> np.ndarray | None:
        """The aligned head [R, R, 3] uint8, or None for a photo without a face."""

        if self.dataset is not None:
            return self.dataset.image_uint8(index)
        try:
            return align_photo(load_image(self.files[index]), self.resolution, detector=self.detector).crop
        except NoFaceError:
            return None


def _measure_size(resolution: int) -> int:
    return max(resolution, MIN_MEASURE_SIZE)


def _for_measuring(image: np.ndarray) -> np.ndarray:

    size = _measure_size(image.shape[0])
    return image if image.shape[0] == size else cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------------- pairs / tables


@dataclass
class _Pass:
    """One table's loop: its item records (JSONL), checkpoint (.npz) and FID statistics."""

    kind: str  # "pairs" (Table 1) or "reconstruction" (Table 2)
    work: Path
    pairs: np.ndarray  # [N, 2] source indices (I_id, I_attr)
    fid: FIDInception | None = None

    def __post_init__(self):
        self.records = self.work / f"{self.kind}.jsonl"
        self.checkpoint = self.work / f"{self.kind}.state.npz"
        dims = self.fid.dims if self.fid is not None else 1
        self.real = FeatureStats(dims)
        self.fake = FeatureStats(dims)
        self.done = 0

    def restore(self) -> None:
        """Continue after the last checkpoint: drop records written after it."""
        if not self.checkpoint.is_file():
            self.records.unlink(missing_ok=True)
            return
        with np.load(self.checkpoint) as state:
            self.done = int(state["done"])
            if self.fid is not None:
                self.real = FeatureStats.from_state({k[5:]: state[k] for k in state.files if k.startswith("real_")})
                self.fake = FeatureStats.from_state({k[5:]: state[k] for k in state.files if k.startswith("fake_")})
        kept = [line for line in complete_lines(self.records) if json.loads(line)["index"] < self.done]
        write_text_atomic(self.records, "".join(line + "\n" for line in kept))

    def save_checkpoint(self) -> None:
        state = {"done": np.array(self.done)}
        if self.fid is not None:
            state.update({f"real_{k}": v for k, v in self.real.state().items()})
            state.update({f"fake_{k}": v for k, v in self.fake.state().items()})
        with atomic_output(self.checkpoint, overwrite=True) as tmp:
            np.savez(tmp, **state)

    def items(self) -> list[dict]:
        return read_records(self.records)


def _psnr_to_json(value: float) -> float | None:
    """Record files are strict JSON, which has no infinity: an exact copy's PSNR is written as null."""
    return None if value == float("inf") else value


def _psnr_from_json(value: float | None) -> float:
    return float("inf") if value is None else value


class _Measurer:
    """Cached measurements of the real heads (the same head recurs across pairs)."""

    def __init__(self, meter: FaceMeter, source: FaceSource):
        self.meter, self.source = meter, source

    @functools.lru_cache(maxsize=4096)
    def real(self, index: int) -> MeasuredFace | None:
        head = self.source.head(index)
        return None if head is None else self.meter.measure(_for_measuring(head))


def _run_model(model, id_heads: list[np.ndarray], attr_heads: list[np.ndarray]) -> list[np.ndarray]:
    """I_out [R, R, 3] uint8 for each (I_id, I_attr) head pair, on the model's device."""

    weight = next(model.parameters())
    id_t = to_tensor(np.stack(id_heads), weight.device)
    attr_t = to_tensor(np.stack(attr_heads), weight.device)
    with torch.inference_mode():
        out = model(id_t, attr_t)
    return list(to_uint8(out.float()))


def _evaluate_batch(p: _Pass, batch: list[int], source: FaceSource, measurer: _Measurer, model, samples: int) -> None:

    usable, records = [], {}
    for k in batch:
        i, j = (int(v) for v in p.pairs[k])
        missing = [source.name(x) for x in (i, j) if measurer.real(x) is None]
        if missing:
            records[k] = {"index": k, "id": i, "attr": j, "skipped": f"no face found in {', '.join(sorted(set(missing)))}"}
        else:
            usable.append(k)
    if usable:
        outputs = _run_model(model, [source.head(int(p.pairs[k][0])) for k in usable],
                             [source.head(int(p.pairs[k][1])) for k in usable])
        real_crops, fake_crops = [], []
        for k, out in zip(usable, outputs):
            i, j = (int(v) for v in p.pairs[k])
            face_id, face_attr = measurer.real(i), measurer.real(j)
            big_out = _for_measuring(out)
            face_out = measurer.meter.measure(big_out, fallback_box=face_attr.box)
            size = big_out.shape[0]
            record = {"index": k, "id": i, "attr": j, "output_face_detected": face_out.detected}
            identity = compare_faces(face_id, face_out, size)
            attributes = compare_faces(face_attr, face_out, size)
            record.update(identity=identity["identity"], identity_distance=identity["identity_distance"],
                          same_person=identity["same_person"], expression=attributes["expression"], pose=attributes["pose"])
            if p.kind == "reconstruction":
                record.update(rmse=rmse(source.head(j), out), psnr=_psnr_to_json(psnr(source.head(j), out)))
            records[k] = record
            if p.fid is not None:
                real_crops.append(square_crop(_for_measuring(source.head(j)), face_attr.box, FID_CROP))
                fake_crops.append(square_crop(big_out, face_out.box, FID_CROP))
            if k < samples:
                heads = [source.head(i), source.head(j), out] if p.kind == "pairs" else [source.head(j), out]
                save_image(image_row(heads), p.work / "samples" / f"{p.kind}_{k:03d}.png", overwrite=True)
        if p.fid is not None:
            p.real.update(p.fid.features(np.stack(real_crops)))
            p.fake.update(p.fid.features(np.stack(fake_crops)))
    with p.records.open("a") as f:
        for k in batch:
            f.write(json.dumps(records[k], allow_nan=False) + "\n")


def _run_pass(p: _Pass, source: FaceSource, measurer: _Measurer, model, job: PairsJob) -> None:
    total = len(p.pairs)
    with progress() as bar:
        task = bar.add_task(p.kind, total=total, completed=p.done)
        since_checkpoint = 0
        while p.done < total:
            batch = list(range(p.done, min(total, p.done + job.batch_size)))
            _evaluate_batch(p, batch, source, measurer, model, job.samples)
            p.done += len(batch)
            since_checkpoint += len(batch)
            bar.advance(task, len(batch))
            if since_checkpoint >= CHECKPOINT_EVERY or p.done == total:
                p.save_checkpoint()
                since_checkpoint = 0


def _summarise(p: _Pass) -> tuple[dict, dict[str, list[float]]]:
    fields = ["identity", "identity_distance", "expression", "pose"] + (["rmse", "psnr"] if p.kind == "reconstruction" else [])
    values: dict[str, list[float]] = {f: [] for f in fields}
    counts = {"items": 0, "evaluated": 0, "skipped_no_face": 0, "output_face_not_detected": 0, "same_person": 0}
    for item in p.items():
        counts["items"] += 1
        if "skipped" in item:
            counts["skipped_no_face"] += 1
            continue
        counts["evaluated"] += 1
        counts["output_face_not_detected"] += int(not item["output_face_detected"])
        counts["same_person"] += int(item["same_person"])
        for f in fields:
            values[f].append(_psnr_from_json(item[f]) if f == "psnr" else item[f])
    summary = {f: mean_std(v) for f, v in values.items()}
    summary["same_person_rate"] = counts["same_person"] / counts["evaluated"] if counts["evaluated"] else None
    summary["counts"] = counts
    if p.fid is not None:
        summary["fid"] = frechet_distance(p.real, p.fake) if p.real.count >= 2 else None
        summary["fid_samples"] = p.real.count
    return summary, values


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def _pairs_report(work: Path, job: PairsJob, passes: dict[str, tuple[dict, dict]], metrics: dict) -> Report:
    report = Report(title="deid evaluate pairs")
    report.summary = [
        f"model: {metrics['model'].get('source')} (step {metrics['model'].get('step', '?')})",
        f"source: {metrics['source']['description']}, {metrics['source']['images']} images; seed {job.seed}",
        "identity: cosine similarity of dlib ResNet descriptors (↑ for pairs: I_out vs I_id); "
        "expression: mean dlib landmark distance / image side (I_out vs I_attr); pose: |Δ(yaw, pitch, roll)| in degrees; "
        "FID on MTCNN face crops of I_out vs I_attr (pytorch-fid Inception).",
    ]
    if "pairs" in passes:
        s, values = passes["pairs"]
        fid = s.get("fid")
        report.tables.append(Table(
            "Table 1: disentanglement on random (I_id, I_attr) pairs",
            ("Method", "Identity ↑", "Expression ↓", "Pose ↓", "FID ↓"),
            (("deid", fmt(s["identity"]), fmt(s["expression"], 4), fmt(s["pose"], 2), fmt(fid, 2) if fid is not None else "–"),),
            note=f"{s['counts']['evaluated']} pairs evaluated, {s['counts']['skipped_no_face']} skipped (no face in a source), "
                 f"{s['counts']['output_face_not_detected']} outputs without a detectable face (measured at I_attr's face box); "
                 f"dlib judges I_out to be I_id's person in {_percent(s['same_person_rate'])} of pairs.",
        ))
        plot_histograms(work / "pairs_hist.png", [("identity (cos)", values["identity"]), ("expression", values["expression"]),
                                                  ("pose (deg)", values["pose"])])
        report.figures.append(("Table 1 distributions over pairs", "pairs_hist.png"))
    if "reconstruction" in passes:
        s, values = passes["reconstruction"]
        report.tables.append(Table(
            "Table 2: reconstruction (I_id = I_attr)",
            ("Method", "RMSE ↓", "PSNR ↑", "Identity ↑", "Expression ↓", "Pose ↓"),
            (("deid", fmt(s["rmse"], 4), fmt(s["psnr"], 2), fmt(s["identity"]), fmt(s["expression"], 4), fmt(s["pose"], 2)),),
            note=f"{s['counts']['evaluated']} images; RMSE and PSNR on pixel values in [0, 1].",
        ))
        plot_histograms(work / "reconstruction_hist.png", [("RMSE", values["rmse"]), ("PSNR (dB)", values["psnr"]),
                                                           ("identity (cos)", values["identity"])])
        report.figures.append(("Table 2 distributions over images", "reconstruction_hist.png"))
    for file in sorted((work / "samples").glob("*.png")):
        label = "I_id | I_attr | I_out" if file.name.startswith("pairs") else "input | reconstruction"
        report.samples.append((f"{file.stem}: {label}", f"samples/{file.name}"))
    return report


class _InPrecision(torch.nn.Module):
    """`model`'s forward(I_id, I_attr) in `precision` (autocast, weights staying fp32), as the media commands run it."""

    def __init__(self, model: torch.nn.Module, precision: Precision):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, I_id: torch.Tensor, I_attr: torch.Tensor) -> torch.Tensor:  # noqa: N803 - the paper's names
        with self.precision.encoding(I_id.device):
            w = self.model.map(self.model.encode_identity(I_id), self.model.encode_attributes(I_attr))
        with self.precision.generating(I_id.device):
            return self.model.generate(w).float()


def run_pairs(job: PairsJob, model, model_source: str | None = None, precision: Precision = Precision()) -> dict:
    """Evaluate `model` (a Disentangler, or any module with encode_identity, encode_attributes, map, generate and
    `.resolution`) on its device, its networks in `precision`; write the report to job.output and return
    metrics.json's content."""
    device = next(model.parameters()).device
    # Everything that can refuse the run (missing FID weights, no dlib) comes before the report folder exists.
    job.check()
    fid = FIDInception(job.fid_weights, job.fid_dims).to(device) if job.fid else None
    meter = FaceMeter(device=device)
    source = FaceSource(job, int(model.resolution))
    work = _work_dir(job.output, job.overwrite, job.resume)
    identity = {"job": {k: str(v) for k, v in asdict(job).items() if k not in ("output", "overwrite", "resume", "samples")},
                "model": _model_identity(model, model_source), "precision": precision.name}
    _check_resume(work, identity)
    runner = _InPrecision(model, precision)
    measurer = _Measurer(meter, source)
    rng = np.random.default_rng(job.seed)
    pair_indices = np.stack([rng.choice(len(source), size=2, replace=False) for _ in range(job.n)])
    plan = {"pairs": pair_indices}
    if job.reconstruction:
        same = np.arange(min(job.n, len(source)))
        plan["reconstruction"] = np.stack([same, same], axis=1)
    passes = {}
    try:
        for kind, pairs in plan.items():
            p = _Pass(kind, work, pairs, fid if kind == "pairs" else None)
            if job.resume:
                p.restore()
            _run_pass(p, source, measurer, runner, job)
            passes[kind] = _summarise(p)
    except KeyboardInterrupt:
        warn(f"interrupted: {work} keeps the progress; repeat the command with --resume to continue.")
        raise
    metrics = {
        "kind": "pairs",
        "job": identity["job"],
        "versions": _versions(),
        "model": identity["model"],
        "precision": identity["precision"],
        "seed": job.seed,
        "source": {"description": source.description, "images": len(source)},
        "networks": {"faces": meter.analyzer.identity, "detector": "MTCNN (facenet-pytorch)",
                     "fid_inception": {"source": fid.source, "fingerprint": fid.fingerprint, "dims": fid.dims} if fid is not None else None},
        "measure_size": _measure_size(source.resolution),
        **{kind: summary for kind, (summary, _) in passes.items()},
    }
    if fid is not None and passes["pairs"][0].get("fid_samples", 0) < fid.dims:
        warn(f"FID from {passes['pairs'][0]['fid_samples']} samples (< {fid.dims} feature dimensions) is unreliable and "
             "biased high; use --n 10000 for the paper's number.")
    write_metrics(work, metrics)
    write_html(work, _pairs_report(work, job, passes, metrics))
    _publish(work, Path(job.output))
    info(f"report written to {job.output}/index.html")
    return metrics


def _check_resume(work: Path, identity: dict) -> None:
    """A resumed run must be the same job on the same model; record what this run is."""
    path = work / "job.json"
    text = json.dumps(identity, indent=2, sort_keys=True, default=str)
    if path.is_file() and json.loads(path.read_text()) != json.loads(text):
        raise DeidError(f"{work} holds a run of a different job or model. Pass --overwrite to start over, "
                        "or repeat the original command with --resume.")
    write_text_atomic(path, text)


# -------------------------------------------------------------------------------------- video audit


@dataclass
class _TrackStats:
    """One tracked face's output descriptors over time, as running sums (no per-frame storage)."""

    id: int
    frames: int = 0
    last_frame: int = -2
    unit_sum: np.ndarray | None = None  # sum of unit-length output descriptors
    sum: np.ndarray | None = None  # sum of output descriptors
    squares: float = 0.0  # sum of squared descriptor norms
    previous: np.ndarray | None = None
    adjacent: list[float] = field(default_factory=list)  # cosine of consecutive frames' descriptors

    def add(self, descriptor: np.ndarray, frame: int) -> None:
        if self.unit_sum is None:
            self.unit_sum, self.sum = np.zeros_like(descriptor), np.zeros_like(descriptor)
        if self.previous is not None and frame == self.last_frame + 1:
            self.adjacent.append(cosine_similarity(self.previous, descriptor))
        self.unit_sum += descriptor / max(np.linalg.norm(descriptor), 1e-12)
        self.sum += descriptor
        self.squares += float(descriptor @ descriptor)
        self.previous, self.last_frame = descriptor, frame
        self.frames += 1

    def summary(self) -> dict:
        n = max(self.frames, 1)
        mean = self.sum / n
        return {
            "track": self.id,
            "frames": self.frames,
            # mean cosine similarity of each frame's descriptor to the track's mean direction = |sum of units| / n
            "consistency": float(np.linalg.norm(self.unit_sum) / n),
            # root mean square dlib distance to the track's mean descriptor (< 0.6: one pseudo-identity)
            "rms_distance_to_mean": float(np.sqrt(max(self.squares / n - mean @ mean, 0.0))),
            "adjacent_similarity": mean_std(self.adjacent),
        }


def _frames(path: Path) -> Iterator[np.ndarray]:
    """Upright frames [H, W, 3] uint8 RGB, one at a time."""

    rotation = probe(path).rotation
    for frame in read_frames(path):
        yield to_display(frame.image, rotation)


def _audit_frame(index: int, original: np.ndarray, anonymized: np.ndarray, detections: np.ndarray, faces: list,
                 meter: FaceMeter, tracks: dict[int, _TrackStats], job: VideoAuditJob) -> tuple[list[dict], list[tuple[np.ndarray, np.ndarray]]]:
    """Every original face of one frame against the output face at the same place. `detections` [K, 4] are the
    original's boxes, `faces` the same faces tracked (deid.faces.tracking) for their track ids.
    Returns the per-face records and the (original box, output box) pairs for drawing."""
    out_boxes = meter.detect(anonymized)
    records, drawn = [], []
    for face in faces:
        if face.filled or not len(detections):  # the detector missed this face in the original: nothing to compare
            continue
        # measure at the raw detection (the tracker's box is smoothed over time): an unchanged frame then
        # compares exactly equal, as it must
        box = detections[int(np.argmax(box_iou(face.box[None], detections)[0]))]
        stats = tracks.setdefault(face.track_id, _TrackStats(face.track_id))
        ref = meter.measure_at(original, box)
        out_box, detected = box, False
        if len(out_boxes):
            overlap = box_iou(box[None], out_boxes)[0]
            if overlap.max() >= job.match_iou:
                out_box, detected = out_boxes[int(np.argmax(overlap))], True
        # An undetected output face is still measured where the original face was: a re-identifier would look there.
        out = meter.measure_at(anonymized, out_box, detected)
        numbers = compare_faces(ref, out, box_side(box))
        x0, y0, x1, y1 = np.clip(np.round(box).astype(int), 0, [original.shape[1], original.shape[0]] * 2)
        region_psnr = psnr(original[y0:y1, x0:x1], anonymized[y0:y1, x0:x1]) if x1 > x0 and y1 > y0 else 0.0
        stats.add(out.face.descriptor, index)
        records.append({
            "frame": index, "track": stats.id, "box": [round(float(v), 1) for v in box],
            # an output face that no detector finds is not re-identified: a recogniser's distance at a place that
            # holds no face means nothing (dlib's ResNet is not calibrated for non-faces)
            "output_face_detected": detected, "reidentified": bool(detected and numbers["same_person"]),
            "identity": numbers["identity"], "identity_distance": numbers["identity_distance"],
            "expression": numbers["expression"], "pose": numbers["pose"],
            "face_psnr": _psnr_to_json(region_psnr), "unchanged": bool(region_psnr >= job.unchanged_psnr),
        })
        drawn.append((box, out_box))
    return records, drawn


def _video_summary(frames_file: Path, frames: int, tracks: dict[int, _TrackStats], job: VideoAuditJob) -> tuple[dict, dict]:
    """Totals and per-frame series from the per-face records, read in one streaming pass."""
    keys = ("identity_distance", "identity", "expression", "pose", "face_psnr")
    per_frame = {key: np.full(frames, np.nan) for key in keys}
    values: dict[str, list[float]] = {key: [] for key in keys[:4]}
    faces = reidentified = not_detected = missed = 0
    frames_with_faces: set[int] = set()
    missed_frames: set[int] = set()
    with frames_file.open() as lines:
        for line in lines:
            face = json.loads(line)
            face["face_psnr"] = _psnr_from_json(face["face_psnr"])
            frame = face["frame"]
            faces += 1
            reidentified += face["reidentified"]
            not_detected += not face["output_face_detected"]
            missed += face["unchanged"]
            frames_with_faces.add(frame)
            if face["unchanged"]:
                missed_frames.add(frame)
            for key in values:
                values[key].append(face[key])
            # several faces in a frame: plot the worst case for privacy (the face closest to its original identity)
            if np.isnan(per_frame["identity_distance"][frame]) or face["identity_distance"] < per_frame["identity_distance"][frame]:
                for key in keys:
                    per_frame[key][frame] = face[key]
    per_frame["frame"] = np.arange(frames)
    summary = {
        "frames": frames,
        "frames_with_faces": len(frames_with_faces),
        "faces": faces,
        "reidentification_rate": reidentified / faces if faces else None,
        "reidentified_faces": reidentified,
        **{key: mean_std(v) for key, v in values.items()},
        "output_faces_not_detected": not_detected,
        "missed_faces": missed,
        "missed_frames": sorted(missed_frames),
        "tracks": [t.summary() for _, t in sorted(tracks.items()) if t.frames],
        "thresholds": {"same_person_distance": DLIB_SAME_PERSON_DISTANCE, "match_iou": job.match_iou,
                       "unchanged_psnr_db": job.unchanged_psnr},
    }
    return summary, per_frame


def run_video_audit(job: VideoAuditJob, device: torch.device | str = "cpu") -> dict:
    """Compare an anonymized video with its original frame by frame; write the report; return metrics.json's content."""

    src, out = probe(job.original), probe(job.anonymized)
    if src.display_size != out.display_size:
        raise MediaError(f"{job.anonymized}: frames are {out.display_size[0]}x{out.display_size[1]} but the original's are "
                         f"{src.display_size[0]}x{src.display_size[1]}. Audit the output made from this original.")
    if src.frame_count != out.frame_count:
        warn(f"the videos have {src.frame_count} and {out.frame_count} frames; comparing the first "
             f"{min(src.frame_count, out.frame_count)} in order.")
    total = min(src.frame_count, out.frame_count, job.max_items or sys.maxsize)
    work = _work_dir(job.output, job.overwrite, resumable=False)
    try:
        metrics = _audit(job, work, src, out, total, device)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no partial report left behind
        raise
    _publish(work, Path(job.output))
    info(f"re-identification rate {fmt(metrics['reidentification_rate'])} over {metrics['faces']} faces, "
         f"leak rate {fmt(metrics['leak_rate'])} over {metrics['frames_with_output_faces']} frames with faces; "
         f"report written to {job.output}/index.html")
    return metrics


def _audit(job: VideoAuditJob, work: Path, src, out, total: int, device) -> dict:
    """The frame loop of `run_video_audit`, writing into `work`."""

    sample_at = set(np.linspace(0, max(total - 1, 0), job.samples).round().astype(int).tolist()) if job.samples else set()
    meter, tracks = FaceMeter(device=device), {}
    # the leak audit is the one `deid anonymize` runs on its own output (no fail-safe: it only looks)
    auditor, leaks = FaceAuditor(AuditConfig(fail_safe="none")), AuditTotals()
    leaked_frames: list[int] = []
    frames_file = work / "frames.jsonl"
    count = 0

    def detected(pairs):
        # the tracker holds a few frames (its lookahead) before releasing them: memory stays bounded
        for index, (original, anonymized) in pairs:
            found = meter.detector([original])[0]
            yield (index, original, anonymized, found.boxes.astype(np.float64)), found

    pairs = enumerate(zip(_frames(job.original), _frames(job.anonymized)))
    with progress() as bar, frames_file.open("w") as records:
        task = bar.add_task("frames", total=total)
        for (index, original, anonymized, boxes), faces in track(detected(itertools.islice(pairs, total))):
            faces_out, drawn = _audit_frame(index, original, anonymized, boxes, faces, meter, tracks, job)
            frame_audit = auditor.check(index, original, anonymized, expected=boxes)
            leaks.add(frame_audit)
            if frame_audit.leaks:
                leaked_frames.append(index)
            for face in faces_out:
                records.write(json.dumps(face, allow_nan=False) + "\n")
            if index in sample_at:
                colours = [(255, 0, 0) if f["reidentified"] else (0, 200, 0) for f in faces_out]  # red: re-identified
                row = image_row([draw_boxes(original, [o for o, _ in drawn], colours), draw_boxes(anonymized, [a for _, a in drawn], colours)],
                                height=max(SAMPLE_HEIGHT, original.shape[0]))
                save_image(row, work / "samples" / f"frame_{index:06d}.png", overwrite=True)
            count += 1
            bar.advance(task)
    summary, per_frame = _video_summary(frames_file, count, tracks, job)
    metrics = {
        "kind": "video",
        "versions": _versions(),
        "original": {"path": str(job.original), "frames": src.frame_count, "frame_rate": str(src.frame_rate)},
        "anonymized": {"path": str(job.anonymized), "frames": out.frame_count, "frame_rate": str(out.frame_rate)},
        "networks": {"faces": meter.analyzer.identity, "detector": "MTCNN (facenet-pytorch)", "leak_audit": auditor.identity},
        **summary,
        # frames in which the audit (dlib HOG on 4 orientations + dlib ResNet) recognises the original person at the
        # same place, over the output frames in which it finds a face
        "leak_rate": leaks.leak_rate,
        "leaked_frames": leaks.leaked_frames,
        "leak_frames": leaked_frames,
        "frames_with_output_faces": leaks.frames_with_faces,
        "smallest_face_audited_px": round(auditor.config.smallest_face(out.display_size), 1),
    }
    write_metrics(work, metrics)
    write_html(work, _video_report(work, metrics, per_frame))
    return metrics


def _video_report(work: Path, metrics: dict, per_frame: dict) -> Report:
    rate = metrics["reidentification_rate"]
    report = Report(title="deid evaluate video: re-identification audit")
    report.summary = [
        f"original: {metrics['original']['path']}; anonymized: {metrics['anonymized']['path']}",
        f"{metrics['faces']} faces in {metrics['frames_with_faces']} of {metrics['frames']} frames; "
        f"re-identification rate {_percent(rate)} (dlib ResNet, distance < {DLIB_SAME_PERSON_DISTANCE})",
        f"leak rate {_percent(metrics['leak_rate'])}: the original person recognised in {metrics['leaked_frames']} of the "
        f"{metrics['frames_with_output_faces']} output frames where dlib's detector (4 orientations) finds a face",
        f"missed (face left unchanged) in {len(metrics['missed_frames'])} frames: "
        + (", ".join(map(str, metrics["missed_frames"][:40])) + (" ..." if len(metrics["missed_frames"]) > 40 else "") or "none"),
    ]
    report.tables.append(Table(
        "Audit (original face vs the output face at the same place)",
        ("Re-identification rate ↓", "Identity (cos) ↓", "Expression ↓", "Pose ↓", "Missed faces ↓"),
        ((_percent(rate), fmt(metrics["identity"]), fmt(metrics["expression"], 4), fmt(metrics["pose"], 2), str(metrics["missed_faces"])),),
        note="Expression: mean dlib landmark distance divided by the face box side; pose: |Δ(yaw, pitch, roll)| in degrees.",
    ))
    report.tables.append(Table(
        "Identity consistency of each tracked face over time (output video)",
        ("Track", "Frames", "Consistency (cos to mean) ↑", "RMS distance to mean ↓", "Frame-to-frame cos ↑"),
        tuple((str(t["track"]), str(t["frames"]), fmt(t["consistency"]), fmt(t["rms_distance_to_mean"]), fmt(t["adjacent_similarity"]))
              for t in metrics["tracks"]),
    ))
    if metrics["frames"]:
        plot_series(work / "per_frame.png", per_frame["frame"], [
            ("dlib distance\n(< 0.6: same person)", per_frame["identity_distance"], DLIB_SAME_PERSON_DISTANCE),
            ("expression error", per_frame["expression"], None),
            ("pose error (deg)", per_frame["pose"], None),
            # identical regions have infinite PSNR: show them at the top of the plot
            (f"face PSNR (dB)\n({PSNR_PLOT_CAP:.0f}: identical)", np.minimum(per_frame["face_psnr"], PSNR_PLOT_CAP), None),
        ], "frame")
        report.figures.append(("Per frame: identity distance (red line: dlib's same-person threshold), expression, pose, "
                               "and how much the face region changed", "per_frame.png"))
    for file in sorted((work / "samples").glob("*.png")):
        report.samples.append((f"{file.stem}: original | anonymized (red box: re-identified, green: not)", f"samples/{file.name}"))
    return report
