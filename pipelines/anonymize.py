"""`deid anonymize`: every face in videos and images takes another identity; everything else stays.

Per video: decode (thread) -> detect (batched, on the upright view and the turned views that can hold a rolled
face) -> track + smooth -> align -> E_attr with the person's fixed identity code -> M -> G -> paste back ->
audit + fail-safe and encode with the source's timestamps, audio and rotation (thread). Queues are bounded and the
tracker's delay is fixed, so memory does not grow with the video's length. The audit (deid.evaluation.audit) looks
at every output frame with other networks before it is written, covers what it still recognises, and writes
OUTPUT.audit.json.
"""

from __future__ import annotations

import contextlib
import errno
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from deid.atomic import atomic_output, check_not_input, check_output_path, check_writable_folder
from deid.console import console, info, progress, warn
from deid.errors import DeidError, MediaError
from deid.faces.alignment import AlignConfig, align_photo_file, ffhq_affine, warp_crop
from deid.evaluation.audit import AuditConfig, AuditLog, AuditTotals, FaceAuditor, audit_path
from deid.faces.detection import DetectConfig, FaceDetector
from deid.faces.orientation import OrientationConfig, RollRobustDetector
from deid.faces.paste import PasteConfig, fill_head, paste_head
from deid.faces.tracking import Face, TrackConfig, track
from deid.media.containers import resolve_codec
from deid.media.images import load_image, save_image
from deid.media.stills import load_still, save_still
from deid.media.video import EncodeOptions, Frame, probe, to_display
from deid.console import FramesPerSecond
from deid.pipelines.detect import detect_frames
from deid.pipelines.engines import HeadSynthesizer
from deid.pipelines.inputs import Task, expand_inputs, make_folders, preview_path, remove_empty
from deid.pipelines.sharding import parse_shard, shard
from deid.pipelines.stages import batched
from deid.pipelines.video_job import video_job
from deid.weights import file_sha256


@dataclass(frozen=True)
class AnonymizeJob:
    inputs: tuple[Path, ...]  # videos, images, directories or globs
    output: Path  # a file (one input) or a directory mirroring the inputs
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
    orientation: OrientationConfig = OrientationConfig()  # the turned views searched for rolled faces
    audit: AuditConfig | None = AuditConfig()  # None: no audit (--no-audit), and so no fail-safe

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


def run_anonymize(job: AnonymizeJob, model, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> list[FileReport]:
    """Anonymize every input of the job (this shard's share); returns one report per input file."""
    tasks = shard(job.check(), *parse_shard(job.shard))
    synth = HeadSynthesizer(model, device, dtype)
    detector = RollRobustDetector(FaceDetector(job.detect, synth.device), job.orientation)
    auditor = FaceAuditor(job.audit) if job.audit is not None else None
    identity = None
    if job.identity is not None:
        identity = synth.identity_of(align_photo_file(job.identity, synth.resolution, detector=detector, scale=job.align.scale).tensor)
    reports = []
    with progress(FramesPerSecond()) as bar:
        for task in tasks:
            if task.target.exists() and not job.overwrite:
                reports.append(FileReport(task.source, task.target, skipped=True))
                continue
            swapper = _FaceSwapper(job, synth, identity, _identity_key(task, job), auditor)
            reports.append(_run_task(task, job, detector, swapper, bar, batch=len(tasks) > 1))
    _print_summary(reports, job)
    _raise_failures(reports)
    return reports


def _run_task(task: Task, job: AnonymizeJob, detector: RollRobustDetector, swapper: "_FaceSwapper", bar,
              batch: bool = False) -> FileReport:
    """One file. In a batch, a file that fails (unreadable, corrupt, ...) is reported and the batch goes on; the
    mirror folders made for it are removed again when they stay empty."""
    report = FileReport(task.source, task.target)
    start = time.perf_counter()
    created: list[Path] = []
    try:
        created = make_folders(task.target.parent)
        if task.is_image:
            _anonymize_image(task, job, detector, swapper, report)
        else:
            _anonymize_video(task, job, detector, swapper, report, bar)
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
    except BaseException:
        remove_empty(created)
        raise
    report.seconds = time.perf_counter() - start
    return report


def _raise_failures(reports: list[FileReport]) -> None:
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


class _FaceSwapper:
    """Replaces the faces of a few frames at a time, one fixed identity per tracked person."""

    def __init__(self, job: AnonymizeJob, synth: HeadSynthesizer, identity: torch.Tensor | None, file_key: str | None = None,
                 auditor: FaceAuditor | None = None):
        self.job = job
        self.synth = synth
        self.identity = identity
        self.file_key = file_key  # see _identity_key
        self.auditor = auditor
        self.codes: dict[int, torch.Tensor] = {}  # track id -> identity code (the random ones)
        self.crops_dir = None

    def code(self, track_id: int) -> torch.Tensor:
        if self.identity is not None:
            return self.identity
        if track_id not in self.codes:
            self.codes[track_id] = self.synth.random_identity(self.job.seed, track_id, self.file_key)
        return self.codes[track_id]

    def __call__(self, group: list[tuple[Frame, list[Face]]], report: FileReport) -> list[np.ndarray]:
        """group: frames with their tracked faces (stored-frame pixels). Returns the output images, same order."""
        size, scale = self.synth.resolution, self.job.align.scale
        crops, affines, owners, tracks, filled = [], [], [], [], []
        for i, (frame, faces) in enumerate(group):
            for face in faces:
                affine = ffhq_affine(face.landmarks, size, scale)
                crops.append(warp_crop(frame.image, affine, size))
                affines.append(affine)
                owners.append(i)
                tracks.append(face.track_id)
                filled.append(face.filled)
        # A face the tracker only fills in (no detection in this frame) is covered by a soft fill, not given a head:
        # a gap is sometimes a face the detector missed, sometimes nobody (a turn of a fast crossing, a blink).
        made = [k for k, fill in enumerate(filled) if not fill]
        heads = {}
        if made:
            codes = torch.stack([self.code(tracks[k]) for k in made])
            heads = dict(zip(made, self.synth(np.stack([crops[k] for k in made]), codes)))
        keep_source = self.job.preview or self.auditor is not None  # both look at the source frame afterwards
        outputs = [frame.image.copy() if keep_source else frame.image for frame, _ in group]
        for k, (crop, affine, owner, tid) in enumerate(zip(crops, affines, owners, tracks)):
            if k not in heads:
                fill_head(outputs[owner], crop, affine, config=self.job.paste)
                continue
            paste_head(outputs[owner], heads[k], affine, original=crop, config=self.job.paste)
            if self.crops_dir is not None:
                stem = f"{group[owner][0].index:06d}_p{tid}"
                save_image(crop, self.crops_dir / f"{stem}_in.png", overwrite=True)
                save_image(heads[k], self.crops_dir / f"{stem}_out.png", overwrite=True)
        for frame, faces in group:
            report.frames += 1
            report.faces += len(faces)
            report.frames_without_faces += not faces
            report.persons.update(face.track_id for face in faces)
        return outputs


def _crops_dir(task: Task, job: AnonymizeJob) -> Path | None:
    if not job.save_crops:
        return None
    folder = task.target.parent / f"{task.target.stem}_crops"
    folder.mkdir(exist_ok=True)
    return folder


def _audit_log(task: Task, auditor: FaceAuditor | None, frame_size: tuple[int, int]):
    """OUTPUT.audit.json's writer for this task (a context manager), or a stand-in yielding None without an audit."""
    if auditor is None:
        return contextlib.nullcontext()
    return AuditLog(audit_path(task.target), auditor, task.source, frame_size)


def _anonymize_image(task: Task, job: AnonymizeJob, detector: RollRobustDetector, swapper: _FaceSwapper, report: FileReport) -> None:
    still = load_still(task.source)  # the networks see 8-bit RGB; the file keeps its own channels and depth
    image = still.rgb.copy()  # heads are pasted in place; still.rgb stays the reference for what changed
    detections = detector([image])[0]
    faces = [Face(i, detections.boxes[i], detections.landmarks[i], False) for i in range(len(detections))]
    swapper.crops_dir = _crops_dir(task, job)
    (output,) = swapper([(Frame(0, 0, 0, image), faces)], report)
    with _audit_log(task, swapper.auditor, (image.shape[1], image.shape[0])) as log, \
            atomic_output(task.target, overwrite=job.overwrite, clean_stale=True) as tmp:
        if log is not None:  # before writing: the fail-safe covers leaks in `output`
            log.check(0, image, output, [face.box for face in faces])
            report.audit = log.totals
        report.notes += save_still(still, output, tmp)
    if job.preview:
        save_image(np.concatenate([image, output], axis=1), preview_path(task.target, task.target.suffix), overwrite=True)


def _anonymize_video(task: Task, job: AnonymizeJob, detector: RollRobustDetector, swapper: _FaceSwapper,
                     report: FileReport, bar) -> None:
    info = probe(task.source)
    stored_size = (info.width, info.height)
    swapper.crops_dir = _crops_dir(task, job)
    batch = max(1, job.batch_size)
    bar_task = bar.add_task(task.source.name, total=info.frame_count)
    width, height = info.display_size

    def render(item):
        frame, output, faces = item
        if log is not None:  # before encoding: the fail-safe covers leaks in `output`
            log.check(frame.index, frame.image, output, [face.box for face in faces])
        side = None
        if job.preview:
            side = np.concatenate([to_display(frame.image, info.rotation), to_display(output, info.rotation)], axis=1)
        return frame, output, side

    with _audit_log(task, swapper.auditor, stored_size) as log, \
            video_job(info, task.target, job.encode, overwrite=job.overwrite, queue_size=2 * batch, render=render,
                      preview_size=(2 * width, height) if job.preview else None, notes=report.notes) as (frames, sink):
        report.audit = log.totals if log is not None else None
        detected = detect_frames(frames, detector.stream(), info.rotation, stored_size, batch)
        for group in batched(track(detected, job.tracking), batch):
            for (frame, faces), output in zip(group, swapper(group, report)):
                sink.put((frame, output, faces))
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


def _print_summary(reports: list[FileReport], job: AnonymizeJob) -> None:

    if not reports:
        info("nothing to do: this shard holds no inputs.")
        return
    table = Table(title="deid anonymize", show_edge=False)
    for column in ("file", "frames", "faces replaced", "frames without faces", "persons", "leaks (audit)", "time"):
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
