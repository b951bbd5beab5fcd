"""`deid anonymize`: every face in videos and images takes another identity, or is covered; everything else stays.

Per video: decode (thread) -> detect (batched, on the upright view and the turned views that can hold a rolled
face) -> track + smooth -> the engine (pipelines/engines.py: `generate` aligns each face, runs E_attr with the
person's fixed identity code -> M -> G and pastes the head back; `mask`, `blur` and `pixelate` cover the head, no
model) -> audit + fail-safe (worker processes beside synthesis, deid.evaluation.audit_pool) -> encode with the
source's timestamps, audio and rotation (thread, in order). Queues are bounded and the tracker's delay is fixed, so
memory does not grow with the video's length. The audit (deid.evaluation.audit) looks at every output frame with
other networks before it is written, covers what it still recognises, and writes OUTPUT.audit.json.
"""

from __future__ import annotations

import contextlib
import errno
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.table import Table

from deid.atomic import atomic_output, check_not_input, check_output_path, check_writable_folder, remove_stale_partials
from deid.console import console, debugging, info, progress, warn
from deid.devices import Precision
from deid.errors import DeidError, MediaError
from deid.faces.alignment import AlignConfig, align_photo_file
from deid.evaluation.audit import AuditConfig, AuditLog, AuditTotals, FaceAuditor, audit_path
from deid.evaluation.audit_pool import AuditItem, AuditPool, audit_workers, new_stream, shared_pool
from deid.faces.detection import DetectConfig, FaceDetector
from deid.faces.cover import HeadRegionConfig
from deid.faces.orientation import OrientationConfig, RollRobustDetector, face_roll
from deid.faces.paste import PasteConfig
from deid.faces.tracking import Face, TrackConfig, track
from deid.media.containers import resolve_codec
from deid.media.images import load_image, save_image
from deid.media.stills import load_still, save_still
from deid.media.video import EncodeOptions, Frame, probe, to_display
from deid.console import FramesPerSecond
from deid.pipelines.detect import detect_frames
from deid.pipelines.engines import ENGINES, CoverEngine, FaceEngine, GenerateEngine, HeadSynthesizer, Identities
from deid.pipelines.inputs import Task, check_previews, expand_inputs, make_folders, preview_of, remove_empty
from deid.pipelines.sharding import parse_shard, shard
from deid.pipelines.stages import batched
from deid.pipelines.video_job import video_job
from deid.weights import file_sha256

_COVERED = {"mask": "masked", "blur": "blurred", "pixelate": "pixelated"}  # what the summary calls each engine's faces
_REVERSIBLE = ("blur", "pixelate")  # engines that recognisers trained on their output can undo: they warn


@dataclass(frozen=True)
class AnonymizeJob:
    inputs: tuple[Path, ...]  # videos, images, directories or globs
    output: Path  # a file (one input) or a directory mirroring the inputs
    engine: str = "generate"  # what a tracked face becomes: generate | mask | blur | pixelate (pipelines/engines.py)
    identity: Path | None = None  # photo whose identity every face takes; None: a random identity per person
    seed: int = 0  # seeds the random identities
    shared_identities: bool = False  # person k of every file gets the same random identity (default: all differ)
    overwrite: bool = False
    batch_size: int = 8  # frames per detection batch, faces per generation batch
    encode: EncodeOptions = EncodeOptions()
    preview: bool = False  # also write TARGET.preview.mp4: input | output side by side
    save_crops: bool = False  # also write the aligned input and output heads to TARGET_crops/
    shard: str | None = None  # "K/N": this process's share of the inputs (default: torchrun's RANK/WORLD_SIZE)
    detect: DetectConfig = DetectConfig()
    tracking: TrackConfig = TrackConfig()
    align: AlignConfig = AlignConfig()  # its size is replaced by the model's resolution
    paste: PasteConfig = PasteConfig()
    region: HeadRegionConfig = HeadRegionConfig()  # what mask, blur and pixelate cover
    orientation: OrientationConfig = OrientationConfig()  # the turned views searched for rolled faces
    audit: AuditConfig | None = AuditConfig()  # None: no audit (--no-audit), and so no fail-safe

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")

    def generate_options(self) -> list[str]:
        """The options set on this job (away from their defaults) that only the generate engine uses: its identities
        and its head crops."""
        defaults = AnonymizeJob(self.inputs, self.output)
        return [option for option, field_name in (("--identity", "identity"), ("--seed", "seed"),
                                                  ("--shared-identities", "shared_identities"), ("--save-crops", "save_crops"))
                if getattr(self, field_name) != getattr(defaults, field_name)]

    def check(self) -> list[Task]:
        """Validate the paths before any model is loaded; returns all tasks (every shard's). Raises DeidError."""
        tasks = expand_inputs(self.inputs, self.output)
        if len(tasks) == 1 and tasks[0].target == self.output:
            check_output_path(self.output, self.overwrite)
        elif not self.output.parent.is_dir():
            raise MediaError(f"{self.output}: the directory {self.output.parent} does not exist. Create it first.")
        else:
            check_writable_folder(self.output)
        for task in tasks:
            check_not_input(task.target, task.source)  # `-o` spelled differently, links: never destroy an input
        if self.preview:
            check_previews(((task.target, preview_of(task)) for task in tasks), (task.source for task in tasks),
                           self.overwrite)
        for task in tasks:
            if not task.is_image:
                resolve_codec(self.encode.codec, task.target)  # a bad --codec fails here, before the model loads
        if self.identity is not None:
            load_image(self.identity)
        return tasks


@dataclass
class FileReport:
    source: Path
    target: Path
    frames: int = 0
    faces: int = 0  # faces replaced, summed over frames
    frames_without_faces: int = 0
    persons: set[int] = field(default_factory=set)  # track ids seen
    seconds: float = 0.0
    skipped: bool = False
    error: str | None = None  # why this file failed (a batch goes on past it)
    notes: list[str] = field(default_factory=list)  # what the output could not keep (bit depth, streams, ...)
    audit: AuditTotals | None = None  # None: not audited


def run_anonymize(job: AnonymizeJob, model=None, device: torch.device | str | None = None,
                  precision: Precision = Precision()) -> list[FileReport]:
    """Anonymize every input of the job (this shard's share); returns one report per input file. `model` (a trained
    Disentangler) is what the generate engine runs; the other engines take none."""
    index, shards = parse_shard(job.shard)
    tasks = shard(job.check(), index, shards)
    if job.engine in _REVERSIBLE:
        warn(f"--engine {job.engine} hides faces from people, not from machines: recognisers trained on "
             f"{_COVERED[job.engine]} faces can re-identify them (--engine mask cannot be undone).")
    anonymizer = Anonymizer(job, model, device, precision)
    with progress(FramesPerSecond()) as bar:
        reports = [anonymizer.run(task, bar, batch=len(tasks) > 1, shared_tree=shards > 1) for task in tasks]
    print_summary(reports, job)
    raise_failures(reports)
    return reports


class Anonymizer:
    """What anonymizing a file needs that is built once per process: the roll-robust detector, the auditor and, for
    the generate engine, the head synthesizer and the target identity. `run(task)` anonymizes one file of the job.

    model: a trained Disentangler for `generate`; None for the other engines, which load no network of their own
    (then `device` is where the detector runs, default the CPU)."""

    def __init__(self, job: AnonymizeJob, model=None, device: torch.device | str | None = None,
                 precision: Precision = Precision()):
        self.job = job
        self.synth = None
        self.identity = None
        if job.engine == "generate":
            if model is None:
                raise ValueError("the generate engine needs a trained model")
            self.synth = HeadSynthesizer(model, device, precision)
            device = self.synth.device
        self.detector = RollRobustDetector(FaceDetector(job.detect, torch.device(device or "cpu")), job.orientation)
        self.auditor = FaceAuditor(job.audit) if job.audit is not None else None
        self.cover = CoverEngine(job.engine, job.region) if self.synth is None else None
        if job.identity is not None and self.synth is not None:
            photo = align_photo_file(job.identity, self.synth.resolution, detector=self.detector, scale=job.align.scale)
            self.identity = self.synth.identity_of(photo.tensor)

    def engine(self, task: Task) -> FaceEngine:
        """The engine for one file: the generate engine keeps that file's own random identities."""
        if self.synth is None:
            return self.cover
        identities = Identities(self.synth, self.identity, self.job.seed, _identity_key(task, self.job))
        return GenerateEngine(self.synth, identities, self.job.align.scale, self.job.paste, _crops_dir(task, self.job))

    def run(self, task: Task, bar, batch: bool = False, shared_tree: bool = False) -> FileReport:
        """One file (skipped when its output exists and the job does not overwrite); see `_run_task`."""
        if task.target.exists() and not self.job.overwrite:
            return FileReport(task.source, task.target, skipped=True)
        renderer = _Renderer(self.engine(task), keep_source=self.job.preview or self.auditor is not None)
        return _run_task(task, self.job, self.detector, renderer, self.auditor, bar, batch, shared_tree)


def _run_task(task: Task, job: AnonymizeJob, detector: RollRobustDetector, renderer: "_Renderer",
              auditor: FaceAuditor | None, bar, batch: bool = False, shared_tree: bool = False) -> FileReport:
    """One file. In a batch, a file that fails (unreadable, corrupt, ...) is reported and the batch goes on; the
    mirror folders made for it are removed again when they stay empty, unless other processes write into the same
    output tree (`shared_tree`: shards, Ray workers), where an empty folder may be about to receive their file."""
    report = FileReport(task.source, task.target)
    start = time.perf_counter()
    created: list[Path] = []
    try:
        made = make_folders(task.target.parent)
        created = [] if shared_tree else made  # in a shared tree another process may be about to write there
        for path in (task.target, audit_path(task.target), preview_of(task)):  # what a killed run (SIGKILL) left
            remove_stale_partials(path)
        if task.is_image:
            _anonymize_image(task, job, detector, renderer, auditor, report)
        else:
            _anonymize_video(task, job, detector, renderer, auditor, report, bar)
    except OSError as exc:
        remove_empty(created)
        if exc.errno == errno.ENOSPC:
            raise MediaError(f"{task.target}: the disk is full. Free space or write elsewhere; no partial file was left.") from None
        raise
    except DeidError as exc:
        remove_empty(created)
        if not batch:
            raise
        report.error = str(exc)
        warn(f"{task.source}: failed; going on with the other files.")
    except Exception as exc:  # an FFmpeg error or a bug in one file: the other files of a batch still finish
        remove_empty(created)
        if not batch:
            raise
        log = _log_traceback(task, job, exc)
        report.error = f"{task.source}: unexpected {exc.__class__.__name__}: {exc} (traceback in {log})"
        warn(f"{task.source}: failed; going on with the other files.")
    except BaseException:
        remove_empty(created)
        raise
    report.seconds = time.perf_counter() - start
    return report


FAILURE_LOG = "deid-failures.log"


def _log_traceback(task: Task, job: AnonymizeJob, exc: Exception) -> Path:
    """Append the traceback of a file's unexpected failure to FAILURE_LOG in the output folder (printed as well
    under --debug); returns the log's path."""
    log = job.output / FAILURE_LOG
    text = "".join(traceback.format_exception(exc))
    if debugging():
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    make_folders(log.parent)
    with log.open("a") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {task.source} -> {task.target}\n{text}")
    return log


def raise_failures(reports: list[FileReport]) -> None:
    """A batch with failed files ends in an error (exit 1) once every other file is done."""
    failed = [r for r in reports if r.error]
    if failed:
        names = ", ".join(str(r.source) for r in failed[:3]) + (", ..." if len(failed) > 3 else "")
        raise MediaError(f"{len(failed)} of {len(reports)} files failed ({names}; the reasons are listed above). "
                         "Fix or remove them and run again: finished files are skipped.")


def _identity_key(task: Task, job: AnonymizeJob) -> str | None:
    """What makes one file's random identities differ from every other file's: a hash of the source's content (two
    unrelated runs that both write `out.mp4` must not show the same fake people, and a rerun keeps them) and the
    file's place in the job (two copies of one file in a batch still differ). None with shared identities (person k
    is the same everywhere) or a given identity (no random ones)."""
    if job.shared_identities or job.identity is not None:
        return None
    place = task.target.name if task.target == job.output else task.target.relative_to(job.output).as_posix()
    return f"{file_sha256(task.source)}/{place}"


class _Renderer:
    """Runs a file's engine on a few frames at a time and counts the faces it was given."""

    def __init__(self, engine: FaceEngine, keep_source: bool):
        self.engine = engine
        self.keep_source = keep_source  # the preview and the audit look at the source frame afterwards

    def __call__(self, group: list[tuple[Frame, list[Face]]], report: FileReport) -> list[np.ndarray]:
        """group: frames with their tracked faces (stored-frame pixels). Returns the output images, same order."""
        outputs = [frame.image.copy() if self.keep_source else np.ascontiguousarray(frame.image) for frame, _ in group]
        self.engine(group, outputs)
        for frame, faces in group:
            report.frames += 1
            report.faces += len(faces)
            report.frames_without_faces += not faces
            report.persons.update(face.track_id for face in faces)
        return outputs


def _crops_dir(task: Task, job: AnonymizeJob) -> Path | None:
    """Where --save-crops puts a file's aligned heads (made at the first head), or None."""
    return task.target.parent / f"{task.target.stem}_crops" if job.save_crops else None


def _preview(source: np.ndarray, output: np.ndarray, engine: str) -> np.ndarray:
    """input | output side by side ([H, 2W, 3] uint8), the output half labelled with the engine that made it."""
    side = np.concatenate([source, output], axis=1)
    height, width = source.shape[:2]
    scale = max(height / 480, 0.3)
    origin = (width + round(8 * scale), round(30 * scale) + 2)  # the baseline: the text's height above it
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # outlined: readable on any background
        cv2.putText(side, f"deid {engine}", origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                    max(1, round(thickness * scale * 1.5)), cv2.LINE_AA)
    return side


def _audit_log(task: Task, auditor: FaceAuditor | None, frame_size: tuple[int, int], engine: str):
    """OUTPUT.audit.json's writer for this task (a context manager), or a stand-in yielding None without an audit.
    Its header names the engine that made the output."""
    if auditor is None:
        return contextlib.nullcontext()
    log = AuditLog(audit_path(task.target), auditor, task.source, frame_size)
    log.header["engine"] = engine
    return log


def _audit_pool(auditor: FaceAuditor | None, detector: RollRobustDetector) -> AuditPool | None:
    """The audit's worker processes (None without an audit), on the cores detection and synthesis leave free."""
    if auditor is None:
        return None
    on_cpu = torch.device(detector.detector.device).type == "cpu"
    return shared_pool(auditor.config, audit_workers(torch.get_num_threads() if on_cpu else 1))


def _audit_items(group: list[tuple[Frame, list[Face]]], outputs: list[np.ndarray]) -> list[AuditItem]:
    """What the audit needs of a group of frames: source, output, and the replaced faces' boxes, tracks and rolls."""
    return [AuditItem(frame.index, frame.image, output, np.array([face.box for face in faces], np.float64).reshape(-1, 4),
                      tuple(face.track_id for face in faces), tuple(float(face_roll(face.landmarks)) for face in faces))
            for (frame, faces), output in zip(group, outputs)]


def _anonymize_image(task: Task, job: AnonymizeJob, detector: RollRobustDetector, renderer: _Renderer,
                     auditor: FaceAuditor | None, report: FileReport) -> None:
    still = load_still(task.source)  # the networks see 8-bit RGB; the file keeps its own channels and depth
    image = still.rgb.copy()  # heads are pasted in place; still.rgb stays the reference for what changed
    detections = detector([image])[0]
    faces = [Face(i, detections.boxes[i], detections.landmarks[i], False) for i in range(len(detections))]
    (output,) = renderer([(Frame(0, 0, 0, image), faces)], report)
    with _audit_log(task, auditor, (image.shape[1], image.shape[0]), job.engine) as log, \
            atomic_output(task.target, overwrite=job.overwrite, clean_stale=True) as tmp:
        if log is not None:  # before writing: the fail-safe covers leaks in `output`
            log.check(0, image, output, [face.box for face in faces])
            report.audit = log.totals
        report.notes += save_still(still, output, tmp)
    if job.preview:
        save_image(_preview(image, output, job.engine), preview_of(task), overwrite=job.overwrite)


def _anonymize_video(task: Task, job: AnonymizeJob, detector: RollRobustDetector, renderer: _Renderer,
                     auditor: FaceAuditor | None, report: FileReport, bar) -> None:
    info = probe(task.source)
    stored_size = (info.width, info.height)
    batch = max(1, job.batch_size)
    bar_task = bar.add_task(task.source.name, total=info.frame_count)
    width, height = info.display_size

    def render(item):
        frame, output, pending, position = item
        if pending is not None:  # before encoding: the fail-safe has covered leaks in `output`
            log.add(pending.result()[position])
        side = None
        if job.preview:
            side = _preview(to_display(frame.image, info.rotation), to_display(output, info.rotation), job.engine)
        return frame, output, side

    pool = _audit_pool(auditor, detector)
    stream = new_stream()
    with _audit_log(task, auditor, stored_size, job.engine) as log, \
            video_job(info, task.target, job.encode, overwrite=job.overwrite, queue_size=2 * batch, render=render,
                      preview_size=(2 * width, height) if job.preview else None, notes=report.notes) as (frames, sink):
        report.audit = log.totals if log is not None else None
        detected = detect_frames(frames, detector.stream(), info.rotation, stored_size, batch)
        for group in batched(track(detected, job.tracking), batch):
            outputs = renderer(group, report)
            pending = pool.submit(stream, _audit_items(group, outputs)) if pool is not None else None
            for position, ((frame, _), output) in enumerate(zip(group, outputs)):
                sink.put((frame, output, pending, position))
            bar.update(bar_task, completed=report.frames)
    if report.frames != info.frame_count:
        warn(f"{task.source}: decoded {report.frames} frames, the index lists {info.frame_count}.")


def _audit_cell(report: FileReport, job: AnonymizeJob) -> str:
    """The summary's audit column: frames in which the audit recognised someone, and what was done about it."""
    totals = report.audit
    if totals is None:
        return "off"
    text = f"{totals.leaked_frames} of {totals.frames_with_faces} frames"
    if totals.leaked_frames:
        fail_safe = job.audit.fail_safe if job.audit is not None else "none"
        text += f" ({totals.leak_rate:.0%}), " + ("NOT covered" if fail_safe == "none" else f"covered ({fail_safe})")
    return text


def print_summary(reports: list[FileReport], job: AnonymizeJob) -> None:
    """The table of a finished batch (one row per file), then the audit's warnings, the notes and each failure's reason
    (shared by a local run and a Ray run)."""
    if not reports:
        info("nothing to do: this shard holds no inputs.")
        return
    table = Table(title=f"deid anonymize (engine: {job.engine})", show_edge=False)
    for column in ("file", "frames", "faces replaced" if job.engine == "generate" else f"faces {_COVERED[job.engine]}", "frames without faces", "persons", "leaks (audit)", "time"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for r in reports:
        if r.skipped:
            table.add_row(str(r.target), "-", "-", "-", "-", "-", "skipped (exists; --overwrite to redo)")
        elif r.error:
            table.add_row(str(r.source), "-", "-", "-", "-", "-", "[red]failed[/red] (below)")
        else:
            table.add_row(str(r.target), str(r.frames), str(r.faces), str(r.frames_without_faces), str(len(r.persons)),
                          _audit_cell(r, job), f"{r.seconds:.1f} s")
    console.print(table)
    for r in reports:
        if r.audit is not None and r.audit.residual_leaked_frames:
            warn(f"{r.target}: the audit still recognises the source in {r.audit.residual_leaked_frames} frames "
                 f"(--fail-safe none); see {audit_path(r.target)}.")
    for r in reports:
        for note in r.notes:
            console.print(f"note: {r.target}: {note}", soft_wrap=True)
    for r in reports:
        if r.error:
            console.print(f"[red]failed:[/red] {r.error}", soft_wrap=True)
