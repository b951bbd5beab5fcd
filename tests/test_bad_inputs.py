"""Every file a user may hand deid (issue 15): concurrent runs, output == input, SIGTERM and leftovers, batches with
broken files, read-only folders, reenact outputs, photo pixel formats, HEIC/AVIF and multi-frame stills, and the
notes a summary gives. Refusals exit 1 with one line naming the file and the fix, and leave no file behind."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import signal
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

import deid.atomic as atomic
import deid.pipelines.anonymize as anonymize_module
from deid import cli
from deid.atomic import atomic_output
from deid.errors import MediaError
from deid.faces.alignment import align_photo_file
from deid.media.stills import load_still, save_still
from deid.media.video import VideoInfo, VideoWriter, probe
from deid.pipelines.anonymize import AnonymizeJob, run_anonymize
from deid.pipelines.inputs import expand_inputs

from tests.test_anonymize import _face_and_far_masks


def _run(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stderr without trailing space)."""
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def _model(path) -> tuple[str, ...]:
    return ("--model", str(path), "--device", "cpu")


def _files(folder: Path) -> list[str]:
    """Every file and folder under `folder` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 1, err
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for part in parts:
        assert part in err, err


# ------------------------------------------------------------------------- 1. concurrent runs


def test_final_rename_never_replaces_a_file_that_appeared(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    with pytest.raises(MediaError, match=r"out\.png appeared while deid was writing it \(another run\?\); it was kept"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"this run")
            target.write_bytes(b"the other run")  # another run finished first
    assert target.read_bytes() == b"the other run" and _files(tmp_path) == ["out.png"]
    # Without hard links (some network mounts) the name is claimed exclusively instead: the same refusal.
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    other = tmp_path / "other.png"
    with pytest.raises(MediaError, match="appeared while deid was writing it"):
        with atomic_output(other) as tmp:
            tmp.write_bytes(b"this run")
            other.write_bytes(b"the other run")
    assert other.read_bytes() == b"the other run"
    with atomic_output(tmp_path / "new.png") as tmp:  # and the usual case still publishes
        tmp.write_bytes(b"new")
    assert (tmp_path / "new.png").read_bytes() == b"new" and _files(tmp_path) == ["new.png", "other.png", "out.png"]


@pytest.mark.slow
def test_two_runs_on_one_output_the_second_refuses(tmp_path, astronaut_png, tiny_model_path, capsys, monkeypatch):
    out = tmp_path / "out.png"
    real = anonymize_module.save_still

    def racing(still, rgb, path):
        out.write_bytes(b"the other run's output")  # lands while this run is writing
        return real(still, rgb, path)

    monkeypatch.setattr(anonymize_module, "save_still", racing)
    code, err = _run(capsys, "-q", "anonymize", astronaut_png, "-o", out, *_model(tiny_model_path))
    _one_line_error(code, err, f"{out} appeared while deid was writing it", "--overwrite")
    assert out.read_bytes() == b"the other run's output" and _files(tmp_path) == ["out.png"]


# ------------------------------------------------------------------------- 2. output == input


def test_output_that_is_the_input_is_refused(tmp_path, ntsc_clip, astronaut_png, tiny_model_path, capsys, monkeypatch):
    clip = tmp_path / "clip.mp4"
    shutil.copy(ntsc_clip, clip)
    original = clip.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.mp4").symlink_to(clip)
    for output in (tmp_path / "sub" / ".." / "clip.mp4", tmp_path / "link.mp4"):
        code, err = _run(capsys, "anonymize", clip, "-o", output, "--overwrite", *_model(tiny_model_path))
        _one_line_error(code, err, f"is the input {clip} itself", "Choose another output path")
    # A folder run whose mirror lands on itself: `deid anonymize in -o .` writes ./in/clip.mp4.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    shutil.copy(clip, tmp_path / "in" / "clip.mp4")
    code, err = _run(capsys, "anonymize", "in", "-o", ".", "--overwrite", *_model(tiny_model_path))
    _one_line_error(code, err, "is the input in/clip.mp4 itself")
    code, err = _run(capsys, "reenact", astronaut_png, clip, "-o", clip, "--overwrite", *_model(tiny_model_path))
    _one_line_error(code, err, f"is the input {clip} itself")
    assert clip.read_bytes() == original and (tmp_path / "in" / "clip.mp4").read_bytes() == original
    assert _files(tmp_path) == ["clip.mp4", "in", "in/clip.mp4", "link.mp4", "sub"]


# ------------------------------------------------------------------------- 3. SIGTERM and leftovers


@pytest.mark.slow
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, ntsc_clip, tiny_model_path, capsys, monkeypatch):
    """What `timeout`, `docker stop` and Slurm send: it used to leave a hidden .NAME.xxxx.partial.mp4 behind."""
    calls = {"n": 0}
    original = VideoWriter.write

    def terminated(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, *args)

    monkeypatch.setattr(VideoWriter, "write", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    out.mkdir()
    code, err = _run(capsys, "-q", "anonymize", ntsc_clip, "-o", out / "clip.mp4", *_model(tiny_model_path))
    assert code == 143 and err == "error: terminated (SIGTERM); no partial output was left."
    assert calls["n"] >= 5 and _files(out) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # restored for the rest of the process


@pytest.mark.slow
def test_killed_runs_leftovers_are_removed_and_never_inputs(tmp_path, astronaut_png, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(astronaut_png, folder / "a.png")
    leftover = folder / ".a.k3x9q2zz.partial.png"  # SIGKILL while writing in/a.png (0 bytes)
    leftover.touch()
    assert [t.source for t in expand_inputs([folder], tmp_path / "out")] == [folder / "a.png"]
    assert [t.source for t in expand_inputs([str(folder / "*.png")], tmp_path / "out")] == [folder / "a.png"]
    with pytest.raises(MediaError, match=r"partial\.png: the unfinished output of a deid run that was killed, not an input"):
        expand_inputs([leftover], tmp_path / "out")
    # Beside a target: a dead run's partial goes; a live run's (it holds the lock) and a brand-new one stay.
    out = tmp_path / "out"
    out.mkdir()
    long_ago = time.time() - 600
    dead, live, fresh = (out / f".a.{name}.partial.png" for name in ("deadrun1", "liverun1", "freshrun"))
    # The output's family too: its audit log's and its preview's leftovers used to survive every later run.
    dead_audit, dead_preview = out / ".a.png.audit.deadrun2.partial.json", out / ".a.preview.deadrun3.partial.png"
    for path in (dead, live, fresh, dead_audit, dead_preview):
        path.write_bytes(b"x" * 48)
    for path in (dead, live, dead_audit, dead_preview):
        os.utime(path, (long_ago, long_ago))
    os.utime(fresh, (time.time() + 600,) * 2)  # brand new whenever the run reaches it, on a loaded machine too
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        run_anonymize(AnonymizeJob(inputs=(folder / "a.png",), output=out / "a.png", preview=True), tiny_model)
    finally:
        os.close(lock)
    assert _files(out) == [".a.freshrun.partial.png", ".a.liverun1.partial.png", "a.png", "a.png.audit.json",
                           "a.preview.png"]


# ------------------------------------------------------------------------- 4. batches go on


@pytest.mark.slow
def test_batch_goes_on_past_unreadable_files(tmp_path, astronaut_png, not_a_video, tiny_model_path, capsys):
    src = tmp_path / "in"
    (src / "broken").mkdir(parents=True)
    shutil.copy(astronaut_png, src / "a.png")
    (src / "broken" / "empty.jpg").touch()
    shutil.copy(not_a_video, src / "broken" / "notes.mp4")
    out = tmp_path / "out"
    code, err = _run(capsys, "anonymize", src, "-o", out, *_model(tiny_model_path))
    assert code == 1
    assert _files(out) == ["in", "in/a.png", "in/a.png.audit.json"]  # the good file is done (and audited); no empty mirror folder for the broken ones
    assert f"failed: {src / 'broken' / 'empty.jpg'}: not a readable image" in err
    assert f"failed: {src / 'broken' / 'notes.mp4'}: not a readable video" in err
    assert err.splitlines()[-1] == (f"error: 2 of 3 files failed ({src / 'broken' / 'empty.jpg'}, {src / 'broken' / 'notes.mp4'}; "
                                    "the reasons are listed above). Fix or remove them and run again: finished files are skipped.")


def test_a_shard_leaves_a_failed_files_mirror_folder_to_the_others(tmp_path, not_a_video):
    """Shards and Ray workers write into one output tree: a folder that is empty when one process's file fails may be
    where another is about to write (Ray's corrupt-input test lost its good file so: 'the directory does not exist').
    A process alone removes it; one of several leaves it."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(not_a_video, src / "notes.mp4")
    for shard, kept in ((None, []), ("0/2", ["in"])):
        out = tmp_path / f"out-{kept}"
        job = AnonymizeJob(inputs=(src,), output=out, engine="mask", audit=None, shard=shard)
        with pytest.raises(MediaError, match="not a readable video"):
            run_anonymize(job)
        assert _files(out) == kept


@pytest.mark.slow
def test_batch_of_b_frame_avis_finishes_every_file(tmp_path, bframes_avis, astronaut_png, tiny_model_path, capsys):
    """DivX/XviD-style AVIs (B-frames, MP3/AC3 audio) used to crash the run with `returned 22` and stop the batch
    there; now each is anonymized, every frame kept, and the file after them too."""
    src = tmp_path / "in"
    src.mkdir()
    for name, clip in bframes_avis.items():
        shutil.copy(clip, src / f"{name}.avi")
    shutil.copy(astronaut_png, src / "z_after.png")
    out = tmp_path / "out"
    code, err = _run(capsys, "anonymize", src, "-o", out, "--no-audit", *_model(tiny_model_path))
    assert code == 0, err
    assert _files(out) == ["in", "in/h264.avi", "in/mpeg4.avi", "in/z_after.png"]
    for name, clip in bframes_avis.items():
        assert probe(out / "in" / f"{name}.avi").frame_count == probe(clip).frame_count
        assert len(probe(out / "in" / f"{name}.avi").audio) == 1


def test_batch_goes_on_past_an_unexpected_exception(tmp_path, astronaut_png, tiny_model_path, capsys, monkeypatch):
    """A bug or an FFmpeg error in one file fails that file with its message and a traceback (in the output
    folder's deid-failures.log, and on screen under --debug); the other files finish; exit 1."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(astronaut_png, src / name)
    real = anonymize_module._anonymize_image

    def flaky(task, *args):
        if task.source.name == "a.png":
            raise av.error.ArgumentError(22, "Invalid argument", "avcodec_send_frame()")
        return real(task, *args)

    monkeypatch.setattr(anonymize_module, "_anonymize_image", flaky)
    out = tmp_path / "out"
    for debug in (False, True):  # the rerun skips the finished b.png and fails a.png again
        code, err = _run(capsys, *(["--debug"] * debug), "anonymize", src, "-o", out, "--no-audit", *_model(tiny_model_path))
        assert code == 1
        assert _files(out) == ["deid-failures.log", "in", "in/b.png"]
        assert f"failed: {src / 'a.png'}: unexpected ArgumentError: Invalid argument: 'avcodec_send_frame()' returned 22" in err
        assert ("Traceback (most recent call last)" in err) is debug
        assert err.splitlines()[-1].startswith(f"error: 1 of 2 files failed ({src / 'a.png'}; ")
    log = (out / "deid-failures.log").read_text()
    assert log.count(f"{src / 'a.png'} -> {out / 'in' / 'a.png'}") == 2 and "in flaky" in log and "Traceback" in log


def test_writer_turns_ffmpeg_errors_into_a_media_error(tmp_path):
    """An encoder that refuses a frame (time going backwards) is a one-line MediaError naming the output file,
    not av's `returned 22`."""
    out = tmp_path / "out.avi"  # MPEG-4 part 2 refuses a frame whose time does not advance
    with pytest.raises(MediaError, match=rf"^{out}: could not write frame 2 \(pts 1\)"), atomic_output(out) as tmp:
        with VideoWriter(tmp, VideoInfo.for_frames(64, 48, Fraction(25))) as writer:
            for pts in (0, 1, 1):
                writer.write(np.zeros((48, 64, 3), np.uint8), pts)
    assert _files(tmp_path) == []


def test_output_that_is_a_device_is_refused(tmp_path, astronaut_png, ntsc_clip, capsys):
    """`-o /dev/null` with one input used to say that several inputs need an output directory (and an atomic
    rename over a device node would have replaced it)."""
    code, err = _run(capsys, "anonymize", astronaut_png, "-o", "/dev/null", "--model", tmp_path / "no-model")
    _one_line_error(code, err, "/dev/null: is a device or a pipe, not a file")
    code, err = _run(capsys, "reenact", astronaut_png, ntsc_clip, "-o", "/dev/null", "--model", tmp_path / "no-model")
    _one_line_error(code, err, "/dev/null: is a device or a pipe, not a file")
    (tmp_path / "plain").write_bytes(b"")
    code, err = _run(capsys, "anonymize", astronaut_png, "-o", tmp_path / "plain", "--model", tmp_path / "no-model")
    _one_line_error(code, err, f"{tmp_path / 'plain'}: an output file needs a suffix that names its type (.png)")


def test_identity_photo_with_several_faces_says_which_is_taken(tmp_path, astronaut_png, capsys):
    """A group photo as --identity used to be accepted silently: the largest of its faces is taken, and said so."""
    face = np.array(Image.open(astronaut_png))[:300, 100:400]  # her head and shoulders, 300x300
    small = cv2.resize(face, (150, 150), interpolation=cv2.INTER_AREA)
    group = np.full((300, 700, 3), 128, np.uint8)
    group[75:225, 0:150] = small
    group[:, 200:500] = face
    group[75:225, 550:700] = small
    Image.fromarray(group).save(tmp_path / "group.png")
    capsys.readouterr()
    photo = align_photo_file(tmp_path / "group.png", 64)
    err = " ".join(capsys.readouterr().err.split())
    assert photo.faces == 3 and 200 <= photo.box[0] < photo.box[2] <= 500  # the middle, largest one
    assert f"{tmp_path / 'group.png'}: 3 faces; the largest (" in err and "is the one taken" in err
    align_photo_file(astronaut_png, 64)
    assert "faces;" not in capsys.readouterr().err  # one face: nothing to say


# ------------------------------------------------------------------------- 4b. previews never replace inputs or outputs


def test_preview_that_would_replace_the_input_is_refused(tmp_path, ntsc_clip, astronaut_png, capsys):
    """`deid anonymize clip.preview.mp4 -o clip.mp4 --preview` used to replace its input with the side-by-side
    preview; photos the same. Refused before the model loads (the missing model is never reached), nothing written."""
    for original, name, output in ((ntsc_clip, "clip.preview.mp4", "clip.mp4"), (astronaut_png, "talk.preview.jpg", "talk.jpg")):
        source = tmp_path / name
        shutil.copy(original, source)
        before = source.read_bytes()
        code, err = _run(capsys, "anonymize", source, "-o", tmp_path / output, "--preview", "--model", tmp_path / "no-model")
        _one_line_error(code, err, f"{source}: the preview of {tmp_path / output} would replace the input {source}")
        assert source.read_bytes() == before
    assert _files(tmp_path) == ["clip.preview.mp4", "talk.preview.jpg"]


def test_preview_that_would_sit_where_an_output_goes_is_refused(tmp_path, astronaut_png, capsys):
    """A batch with a.png and a.preview.png: a's preview (the ORIGINAL face) would take the place of the second
    file's anonymized output."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "a.preview.png"):
        shutil.copy(astronaut_png, src / name)
    out = tmp_path / "out"
    code, err = _run(capsys, "anonymize", src, "-o", out, "--preview", "--model", tmp_path / "no-model")
    _one_line_error(code, err, f"{out / 'in' / 'a.preview.png'}: the preview of {out / 'in' / 'a.png'} would take the "
                               f"place of {out / 'in' / 'a.preview.png'}'s output")
    assert not out.exists()


def test_previews_follow_the_overwrite_rule(tmp_path, astronaut_png, ntsc_clip):
    """An existing preview is replaced only with --overwrite (previews are written through atomic_output)."""
    from deid.pipelines.reenact import ReenactJob

    (tmp_path / "a.preview.png").write_bytes(b"an earlier preview")
    job = AnonymizeJob(inputs=(astronaut_png,), output=tmp_path / "a.png", preview=True)
    with pytest.raises(MediaError, match=r"a\.preview\.png already exists\. Pass --overwrite"):
        job.check()
    dataclasses.replace(job, overwrite=True).check()
    dataclasses.replace(job, preview=False).check()
    src, out = tmp_path / "in", tmp_path / "out"
    (out / "in").mkdir(parents=True)
    src.mkdir()
    shutil.copy(astronaut_png, src / "a.png")
    shutil.copy(ntsc_clip, src / "clip.mp4")
    (out / "in" / "clip.preview.mp4").write_bytes(b"an earlier preview")
    batch = AnonymizeJob(inputs=(src,), output=out, preview=True)
    with pytest.raises(MediaError, match=r"clip\.preview\.mp4 already exists"):
        batch.check()
    (out / "in" / "clip.mp4").write_bytes(b"a finished output")  # a rerun skips this file: its preview is left alone
    batch.check()
    driving = tmp_path / "r.preview.mp4"
    shutil.copy(ntsc_clip, driving)
    with pytest.raises(MediaError, match="the preview of .*r.mp4 would replace the input"):
        ReenactJob(portrait=astronaut_png, driving=driving, output=tmp_path / "r.mp4", preview=True).check()


# ------------------------------------------------------------------------- 5. codecs up front, defaults


def test_bad_codec_fails_before_the_model_loads(tmp_path, ntsc_clip, astronaut_png, capsys):
    missing_model = tmp_path / "no-such-model"  # never reached: the codec is checked first
    code, err = _run(capsys, "anonymize", ntsc_clip, "-o", tmp_path / "x.mp4", "--codec", "gif", "--model", missing_model)
    _one_line_error(code, err, "--codec gif: a .mp4 file cannot hold it. For .mp4 use one of: libx264")
    code, err = _run(capsys, "reenact", astronaut_png, ntsc_clip, "-o", tmp_path / "x.webm", "--codec", "nonesuch",
                     "--model", missing_model)
    _one_line_error(code, err, "--codec nonesuch: no such video encoder here. For .webm use one of: libvpx-vp9")
    assert _files(tmp_path) == []


@pytest.mark.slow
def test_webm_output_gets_vp9_and_opus(tmp_path, ntsc_clip, tiny_model_path, capsys):
    """`deid anonymize x.mp4 -o x.webm` used to end in "'webm' format does not support 'libx264' codec"."""
    out = tmp_path / "out.webm"
    code, err = _run(capsys, "-q", "anonymize", ntsc_clip, "-o", out, *_model(tiny_model_path))
    assert code == 0, err
    dst, src = probe(out), probe(ntsc_clip)
    assert (dst.codec, dst.frame_count, [a.codec for a in dst.audio]) == ("vp9", 36, ["opus"])
    assert dst.duration == pytest.approx(src.duration, abs=1 / 30)


# ------------------------------------------------------------------------- 6. read-only folders


@pytest.mark.slow
def test_read_only_output_folder_is_one_line(tmp_path, astronaut_png, ntsc_clip, tiny_model_path, capsys, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # what a read-only mount answers (root included)
        if Path(path) == read_only and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "access", access)
    for args in (("anonymize", astronaut_png, "-o", read_only / "a.png"),
                 ("anonymize", astronaut_png, ntsc_clip, "-o", read_only / "batch"),
                 ("reenact", astronaut_png, ntsc_clip, "-o", read_only / "r.mp4")):
        code, err = _run(capsys, *args, *_model(tiny_model_path))
        _one_line_error(code, err, f"cannot write in {read_only} (read-only or no permission). Choose another output folder.")
    monkeypatch.undo()
    # The folder turns read-only after the checks: the temporary file cannot be made.
    real_open = os.open

    def read_only_fs(path, flags, *args, **kwargs):
        if ".partial" in str(path) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", read_only_fs)
    code, err = _run(capsys, "-q", "anonymize", astronaut_png, "-o", read_only / "a.png", *_model(tiny_model_path))
    _one_line_error(code, err, f"{read_only / 'a.png'}: cannot write in {read_only} (Read-only file system)")
    monkeypatch.undo()
    if os.geteuid() != 0:  # a real read-only folder where permissions bind (not for root)
        read_only.chmod(0o555)
        try:
            code, err = _run(capsys, "anonymize", astronaut_png, "-o", read_only / "a.png", *_model(tiny_model_path))
            _one_line_error(code, err, "cannot write in")
        finally:
            read_only.chmod(0o755)
    assert _files(read_only) == []


# ------------------------------------------------------------------------- 7. reenact outputs


@pytest.mark.slow
def test_reenact_output_must_be_a_video_file(tmp_path, astronaut_png, ntsc_clip, tiny_model_path, capsys):
    for name in ("x.jpg", "x.png"):
        code, err = _run(capsys, "reenact", astronaut_png, ntsc_clip, "-o", tmp_path / name, *_model(tiny_model_path))
        _one_line_error(code, err, f"{tmp_path / name}: reenact writes a video, not a still image", "x.mp4")
    folder = tmp_path / "existing"
    folder.mkdir()
    for extra in ((), ("--overwrite",)):
        code, err = _run(capsys, "reenact", astronaut_png, ntsc_clip, "-o", folder, *extra, *_model(tiny_model_path))
        _one_line_error(code, err, f"{folder} is a directory, not a file")
    assert _files(tmp_path) == ["existing"]
    # An animated GIF is a video output: written whole (no audio, and the summary says so).
    code, err = _run(capsys, "reenact", astronaut_png, ntsc_clip, "-o", tmp_path / "x.gif", *_model(tiny_model_path))
    assert code == 0, err
    assert (probe(tmp_path / "x.gif").codec, probe(tmp_path / "x.gif").frame_count) == ("gif", 36)
    assert f"note: {tmp_path / 'x.gif'}: audio not carried over (.gif files hold none)" in err


# ------------------------------------------------------------------------- 9. pixel formats of photos


@pytest.mark.slow
def test_photos_keep_their_channels_and_bit_depth(tmp_path, astronaut_variants, astronaut_png, tiny_model):
    # (no audit: its fail-safe covers a suit patch dlib's HOG takes for a face, which `far` would see; test_audit)
    reports = run_anonymize(AnonymizeJob(inputs=tuple(astronaut_variants.values()), output=tmp_path, audit=None), tiny_model)
    assert all(r.faces == 1 and r.error is None for r in reports)
    inner, far = _face_and_far_masks(load_still(astronaut_png).rgb)
    for name, source in astronaut_variants.items():
        before, after = Image.open(source), Image.open(tmp_path / source.name)
        assert after.mode == before.mode, name  # I;16 stays I;16, RGBA stays RGBA, L stays L
        a, b = np.array(before).astype(np.int64), np.array(after).astype(np.int64)
        np.testing.assert_array_equal(b[far], a[far])  # untouched pixels keep their exact values, all 16 bits
        scale = 257 if name == "gray16" else 1
        assert np.abs(b - a)[inner].mean() > 8 * scale, name  # the face changed
    gray16 = np.array(Image.open(tmp_path / "gray16.png"), np.float64)
    source16 = np.array(Image.open(astronaut_variants["gray16"]), np.float64)
    assert abs(gray16.mean() - source16.mean()) < 0.01 * 65535  # not the near-white picture of before
    rgba_in, rgba_out = np.array(Image.open(astronaut_variants["rgba"])), np.array(Image.open(tmp_path / "rgba.png"))
    np.testing.assert_array_equal(rgba_out[..., 3], rgba_in[..., 3])  # transparent stays transparent


# ------------------------------------------------------------------------- 11. HEIC/AVIF and multi-frame stills


@pytest.mark.slow
def test_avif_is_a_still_and_heic_needs_its_plugin(tmp_path, astronaut_png, tiny_model, capsys):
    avif = tmp_path / "photo.avif"
    Image.open(astronaut_png).save(avif, quality=90)
    with pytest.raises(MediaError, match="photo.avif: is a still image, not a video"):
        probe(avif)  # libav would open it as a one-frame video
    (task,) = expand_inputs([avif], tmp_path / "out.avif")
    assert task.is_image
    (report,) = run_anonymize(AnonymizeJob(inputs=(avif,), output=tmp_path / "out.avif"), tiny_model)
    result = Image.open(tmp_path / "out.avif")
    assert (result.format, getattr(result, "n_frames", 1), result.mode, report.faces) == ("AVIF", 1, "RGB", 1)
    heic = tmp_path / "photo.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    with pytest.raises(MediaError, match=r"photo\.heic: reading HEIC/HEIF photos needs the pillow-heif package"):
        run_anonymize(AnonymizeJob(inputs=(heic,), output=tmp_path / "out.heic"), tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.avif", "out.avif.audit.json", "photo.avif", "photo.heic"]


@pytest.mark.slow
def test_multi_frame_stills_are_refused(tmp_path, astronaut_png, tiny_model_path, capsys):
    frames = [Image.open(astronaut_png).convert("RGB").rotate(angle) for angle in (0, 5, 10)]
    files = {"anim.webp": "3 frames", "anim.png": "3 frames", "pages.tif": "3 pages", "anim.gif": "3 frames"}
    for name in files:
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100)
    out = tmp_path / "out"
    out.mkdir()
    for name, count in files.items():
        code, err = _run(capsys, "anonymize", tmp_path / name, "-o", out / name, *_model(tiny_model_path))
        _one_line_error(code, err, f"{tmp_path / name}: holds {count}; deid anonymizes single pictures",
                        f"ffmpeg -i {name} {Path(name).stem}.mp4")
    assert _files(out) == []


# ------------------------------------------------------------------------- 10, 12. what the summary says


@pytest.mark.slow
def test_summary_names_what_an_output_loses(tmp_path, hdr_clip, extra_streams_clip, tiny_model_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "anonymize", hdr_clip, extra_streams_clip, "-o", out, *_model(tiny_model_path))
    assert code == 0, err
    assert f"note: {out / 'hdr10.mp4'}: 10-bit video processed at 8 bits per channel, written as 10-bit" in err
    assert (f"note: {out / 'extra_streams.mkv'}: 1 extra video stream and 1 subtitle stream not carried over" in err)
    assert probe(out / "hdr10.mp4").bits == 10 and probe(out / "hdr10.mp4").color == probe(hdr_clip).color
    assert probe(out / "hdr10.mp4").hdr == probe(hdr_clip).hdr is not None  # mastering display, light levels


@pytest.mark.parametrize("mode", ["1", "L", "LA", "L16", "RGB", "RGBA", "RGB16", "RGBA16", "CMYK", "P"])
def test_still_round_trip_per_mode(tmp_path, mode):
    """Every mode comes back in its own format: untouched pixels exact, changed ones in the new colour."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    source = tmp_path / ("in.jpg" if mode == "CMYK" else "in.png")
    if mode in ("RGB16", "RGBA16"):
        deep = rng.integers(0, 65536, (24, 32, 4 if mode == "RGBA16" else 3), dtype=np.uint16)
        cv2.imwrite(str(source), deep)
    elif mode == "L16":
        Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)).save(source)
    else:
        Image.fromarray(rgb).convert("RGBA" if mode == "RGBA" else mode).save(source)
    still = load_still(source)
    assert still.rgb.shape == (24, 32, 3) and still.rgb.dtype == np.uint8
    assert still.mode == ("RGB" if mode == "P" else mode)  # a palette photo comes back as RGB
    changed = still.rgb.copy()
    changed[4:10, 4:10] = (250, 10, 10)
    out = tmp_path / f"out{source.suffix}"
    assert save_still(still, changed, out) == []
    back = load_still(out)
    assert back.mode == still.mode and back.pixels.dtype == still.pixels.dtype
    keep = np.ones((24, 32), bool)
    keep[4:10, 4:10] = False
    if mode != "CMYK":  # (JPEG: lossy)
        np.testing.assert_array_equal(back.pixels[keep], still.pixels[keep])
    red = back.rgb[6, 6].astype(int)
    if mode == "1":
        assert red[0] == 0  # its luma, 82, is below the threshold
    elif mode in ("L", "LA", "L16"):
        assert abs(red[0] - round(0.299 * 250 + 0.587 * 10 + 0.114 * 10)) <= 1
    else:
        assert red[0] > 200 and red[1] < 60


def test_still_format_that_cannot_hold_the_mode_says_so(tmp_path, astronaut_variants):
    still = load_still(astronaut_variants["rgba"])
    assert save_still(still, still.rgb, tmp_path / "out.jpg") == [".jpg cannot hold the photo's RGBA pixels: written as 8-bit RGB"]
    assert Image.open(tmp_path / "out.jpg").mode == "RGB"
