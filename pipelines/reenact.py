"""`deid reenact`: the portrait's person performs the driving video.

Each driving frame's main face is aligned and encoded by E_attr; with the portrait's fixed identity code, M and G
give a head at the generator's resolution. The output keeps the driving video's timing and audio; with `paste`
the heads go back into the portrait's own frame instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deid.atomic import check_not_input, check_output_path
from deid.console import console, info, progress
from deid.devices import Precision
from deid.errors import MediaError
from deid.faces.alignment import AlignConfig, align_photo_file, ffhq_affine, warp_crop
from deid.faces.detection import DetectConfig, FaceDetector
from deid.faces.orientation import OrientationConfig, RollRobustDetector
from deid.faces.paste import PasteConfig, paste_head
from deid.faces.tracking import Face, TrackConfig, track
from deid.media.containers import resolve_codec
from deid.media.images import IMAGE_EXTENSIONS, load_image
from deid.media.video import EncodeOptions, probe
from deid.console import FramesPerSecond
from deid.pipelines.detect import detect_frames
from deid.pipelines.engines import HeadSynthesizer
from deid.pipelines.inputs import check_previews, preview_path
from deid.pipelines.stages import batched
from deid.pipelines.video_job import video_job


@dataclass(frozen=True)
class ReenactJob:
    portrait: Path  # photo of the person who performs
    driving: Path  # video whose pose, expression and timing are performed
    output: Path
    overwrite: bool = False
    paste: bool = False  # paste the heads into the portrait's frame (else: the heads alone)
    preview: bool = False  # also write OUTPUT.preview.mp4: aligned driving head | generated head
    batch_size: int = 8
    encode: EncodeOptions = EncodeOptions()
    detect: DetectConfig = DetectConfig()
    tracking: TrackConfig = TrackConfig()
    align: AlignConfig = AlignConfig()  # its size is replaced by the model's resolution
    paste_config: PasteConfig = PasteConfig()
    orientation: OrientationConfig = OrientationConfig()  # the turned views searched for rolled faces

    def check(self) -> None:
        """Validate the paths before any model is loaded. Raises DeidError."""
        load_image(self.portrait)
        probe(self.driving)
        if self.output.suffix.lower() in IMAGE_EXTENSIONS and self.output.suffix.lower() != ".gif":
            raise MediaError(f"{self.output}: reenact writes a video, not a still image. Name a video output, e.g. "
                             f"{self.output.with_suffix('.mp4')} (or .gif for an animation).")
        check_output_path(self.output, self.overwrite)
        for source in (self.portrait, self.driving):
            check_not_input(self.output, source)
        if self.preview:
            check_previews([(self.output, preview_path(self.output))], (self.portrait, self.driving), self.overwrite)
        resolve_codec(self.encode.codec, self.output)  # the container must take the codec (and exist)


@dataclass
class ReenactReport:
    frames: int = 0
    frames_without_face: int = 0  # these repeat the previous head (the portrait's own before the first face)
    seconds: float = 0.0


class _MainFace:
    """Picks the driving frame's performer: the followed track while it lasts, else the largest face."""

    def __init__(self):
        self.track_id: int | None = None

    def __call__(self, faces: list[Face]) -> Face | None:
        if not faces:
            return None
        for face in faces:
            if face.track_id == self.track_id:
                return face
        face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        self.track_id = face.track_id
        return face


def run_reenact(job: ReenactJob, model, device: torch.device | str | None = None,
                precision: Precision = Precision()) -> ReenactReport:
    job.check()
    start = time.perf_counter()
    synth = HeadSynthesizer(model, device, precision)
    size, scale = synth.resolution, job.align.scale
    detector = RollRobustDetector(FaceDetector(job.detect, synth.device), job.orientation)
    aligned = align_photo_file(job.portrait, size, detector=detector, scale=scale)
    portrait, portrait_crop, portrait_affine = aligned.image, aligned.crop, aligned.affine
    identity = synth.identity_of(aligned.tensor)
    source = probe(job.driving)
    report = ReenactReport()

    def render(head: np.ndarray) -> np.ndarray:
        if not job.paste:
            return head
        return paste_head(portrait.copy(), head, portrait_affine, original=portrait_crop, config=job.paste_config)

    # Before the first driving face: the portrait performing its own attributes.
    last_head = synth(portrait_crop[None], identity[None])[0]
    last_crop = portrait_crop
    out_size = (portrait.shape[1], portrait.shape[0]) if job.paste else (size, size)
    def render_item(item):
        frame, crop, head = item
        return frame, render(head), np.concatenate([crop, head], axis=1) if job.preview else None

    notes: list[str] = []  # what the output cannot keep of the driving video
    with progress(FramesPerSecond()) as bar, video_job(
            source, job.output, job.encode, overwrite=job.overwrite, queue_size=2 * job.batch_size, render=render_item,
            size=out_size, rotation=0, preview_size=(2 * size, size) if job.preview else None, notes=notes
    ) as (frames, sink):
        bar_task = bar.add_task(job.driving.name, total=source.frame_count)
        main_face = _MainFace()
        tracked = track(detect_frames(frames, detector.stream(), source.rotation, (source.width, source.height), job.batch_size), job.tracking)
        for group in batched(tracked, job.batch_size):
            chosen = [main_face(faces) for _, faces in group]
            crops = [warp_crop(frame.image, ffhq_affine(face.landmarks, size, scale), size)
                     for (frame, _), face in zip(group, chosen) if face is not None]
            heads = iter(synth(np.stack(crops), identity.expand(len(crops), -1)) if crops else [])
            crops = iter(crops)
            for (frame, _), face in zip(group, chosen):
                if face is not None:
                    last_head, last_crop = next(heads), next(crops)
                else:
                    report.frames_without_face += 1
                sink.put((frame, last_crop, last_head))
                report.frames += 1
            bar.update(bar_task, completed=report.frames)
        if report.frames == report.frames_without_face:
            # Nothing was performed: raising here, inside atomic_output, leaves no file that pretends otherwise.
            raise MediaError(f"{job.driving}: no face found in any frame. Use a driving video that shows a face.")
    report.seconds = time.perf_counter() - start
    info(f"reenact: {report.frames} frames, {report.frames_without_face} without a face, {report.seconds:.1f} s -> {job.output}")
    for note in notes:
        console.print(f"note: {job.output}: {note}", soft_wrap=True)
    return report
