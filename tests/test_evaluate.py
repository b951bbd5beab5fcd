"""`deid evaluate`: the pairs tables and the video re-identification audit, end to end on real faces."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from deid.errors import DeidError, MediaError
from deid.pipelines.evaluate import PairsJob, VideoAuditJob, run_pairs, run_video_audit

AUDIT_FRAMES = 12  # enough frames for the rates to mean something, few enough to stay fast


class Passthrough(torch.nn.Module):
    """A stand-in 'model' that returns I_attr unchanged: the known answers are exact (expression, pose and
    reconstruction errors 0; the output's identity is I_attr's)."""

    resolution = 128

    def __init__(self, fail_after_calls: int | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the pipeline a device and dtype
        self.calls, self.fail_after_calls = 0, fail_after_calls

    # the Disentangler's four steps, evaluate's way in: the "code" of I_attr is I_attr itself, and w is that code
    def encode_identity(self, I_id):  # noqa: N803 - the paper's names
        return I_id

    def encode_attributes(self, I_attr):  # noqa: N803
        return I_attr

    def map(self, identity, attributes):
        return attributes

    def generate(self, w):
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return w


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory, carphone, astronaut_png, no_face_png):
    """Three carphone frames (one man), the astronaut (a woman) and an image without a face."""
    import shutil

    from deid.media.images import save_image
    from deid.media.video import read_frames

    folder = tmp_path_factory.mktemp("faces")
    for frame in read_frames(carphone):
        if frame.index in (0, 60, 119):
            save_image(frame.image, folder / f"carphone_{frame.index:03d}.png")
    shutil.copy(astronaut_png, folder / "astronaut.png")
    shutil.copy(no_face_png, folder / "zz_gradient.png")
    return folder


@pytest.fixture(scope="module")
def blurred_clip(ntsc_clip, tmp_path_factory):
    """ntsc_clip with every face blurred heavily (Gaussian, sigma = 15% of the face box), audio kept."""
    from deid.evaluation.metrics import FaceMeter
    from deid.media.video import VideoWriter, probe, read_frames

    out = tmp_path_factory.mktemp("blurred") / "blurred.mp4"
    meter = FaceMeter()
    with VideoWriter(out, probe(ntsc_clip)) as writer:
        for frame in read_frames(ntsc_clip):
            image = frame.image.copy()
            for x0, y0, x1, y1 in np.round(meter.detect(image)).astype(int):
                side, pad = x1 - x0, (x1 - x0) // 5
                ya, xa = max(0, y0 - pad), max(0, x0 - pad)
                image[ya:y1 + pad, xa:x1 + pad] = cv2.GaussianBlur(image[ya:y1 + pad, xa:x1 + pad], (0, 0), sigmaX=0.15 * side)
            writer.write(image, frame.pts, frame.duration)
    return out


def _edited_clip(source: Path, out: Path, edit) -> Path:
    """The first AUDIT_FRAMES frames of `source` with edit(image) -> image applied to each, same timing."""
    from deid.media.video import VideoWriter, probe, read_frames

    with VideoWriter(out, probe(source)) as writer:
        for frame, _ in zip(read_frames(source), range(AUDIT_FRAMES)):
            writer.write(edit(frame.image.copy()), frame.pts, frame.duration)
    return out


@pytest.fixture(scope="module")
def fully_blurred_clip(ntsc_clip, tmp_path_factory):
    """ntsc_clip with the whole frame blurred (Gaussian, sigma 8 px on 176x144): nobody is recognisable."""
    return _edited_clip(ntsc_clip, tmp_path_factory.mktemp("fully_blurred") / "blurred.mp4",
                        lambda image: cv2.GaussianBlur(image, (0, 0), sigmaX=8))


@pytest.fixture(scope="module")
def faceless_clip(ntsc_clip, tmp_path_factory):
    """ntsc_clip with each face scrambled: the top-left and bottom-right quarters of its MTCNN box (grown by a fifth)
    swapped. No longer
    a face to a detector, yet dlib's recogniser, applied at the old box anyway, puts about a third of them within
    0.6 of the original: the trap of measuring where no face is (a cartoon clip showed 36 %)."""
    from deid.faces.detection import FaceDetector

    detector = FaceDetector()

    def scramble(image):
        for x0, y0, x1, y1 in detector([image])[0].boxes:
            cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, 0.6 * (x1 - x0), 0.6 * (y1 - y0)  # the box grown by a fifth
            xa, ya, h, w = int(round(cx - hw)), int(round(cy - hh)), int(hh), int(hw)
            top_left, bottom_right = image[ya:ya + h, xa:xa + w].copy(), image[ya + h:ya + 2 * h, xa + w:xa + 2 * w].copy()
            image[ya:ya + h, xa:xa + w], image[ya + h:ya + 2 * h, xa + w:xa + 2 * w] = bottom_right, top_left
        return image

    return _edited_clip(ntsc_clip, tmp_path_factory.mktemp("faceless") / "faceless.mp4", scramble)


# --------------------------------------------------------------------------------------- video audit


@pytest.mark.slow
def test_audit_of_a_clip_against_itself_reidentifies_every_face(ntsc_clip, tmp_path):
    report = tmp_path / "self"
    metrics = run_video_audit(VideoAuditJob(ntsc_clip, ntsc_clip, report, max_items=AUDIT_FRAMES, samples=2))
    assert metrics["frames"] == AUDIT_FRAMES and metrics["faces"] == AUDIT_FRAMES  # one face per carphone frame
    assert metrics["reidentification_rate"] == 1.0
    # the leak audit (dlib HOG, four orientations) finds the face in every frame, and it is the original person
    assert metrics["leak_rate"] == 1.0 and metrics["leaked_frames"] == metrics["frames_with_output_faces"] == AUDIT_FRAMES
    assert metrics["leak_frames"] == list(range(AUDIT_FRAMES))
    assert metrics["identity_distance"]["mean"] == 0.0 and metrics["expression"]["mean"] == 0.0 and metrics["pose"]["mean"] == 0.0
    # nothing was anonymized: every frame is a miss
    assert metrics["missed_frames"] == list(range(AUDIT_FRAMES)) and metrics["missed_faces"] == AUDIT_FRAMES
    assert len(metrics["tracks"]) == 1 and metrics["tracks"][0]["frames"] == AUDIT_FRAMES
    assert metrics["tracks"][0]["consistency"] > 0.99
    on_disk = json.loads((report / "metrics.json").read_text())
    assert on_disk["reidentification_rate"] == 1.0 and on_disk["versions"]["dlib-bin"]
    html = (report / "index.html").read_text()
    assert "Re-identification rate" in html and "per_frame.png" in html
    assert (report / "per_frame.png").stat().st_size > 1000
    assert len(list((report / "samples").glob("*.png"))) == 2
    assert not list(tmp_path.glob(".*partial"))  # the work folder became the report


@pytest.mark.slow
def test_audit_of_heavily_blurred_faces_reidentifies_few(ntsc_clip, blurred_clip, tmp_path):
    metrics = run_video_audit(VideoAuditJob(ntsc_clip, blurred_clip, tmp_path / "blur", max_items=AUDIT_FRAMES, samples=0))
    assert metrics["faces"] == AUDIT_FRAMES
    assert metrics["reidentification_rate"] <= 0.1
    assert metrics["identity_distance"]["mean"] > 0.6
    assert metrics["missed_faces"] == 0 and metrics["missed_frames"] == []
    # the blurred faces are mostly not even detected; they are measured where the original face was
    assert metrics["output_faces_not_detected"] > AUDIT_FRAMES // 2


@pytest.mark.slow
def test_audit_of_a_fully_blurred_clip_finds_no_leak(ntsc_clip, fully_blurred_clip, tmp_path):
    metrics = run_video_audit(VideoAuditJob(ntsc_clip, fully_blurred_clip, tmp_path / "blur", samples=0))
    assert metrics["frames"] == AUDIT_FRAMES and metrics["faces"] == AUDIT_FRAMES
    assert metrics["leak_rate"] == 0.0 and metrics["leaked_frames"] == 0 and metrics["leak_frames"] == []
    assert metrics["reidentification_rate"] == 0.0


@pytest.mark.slow
def test_faces_replaced_by_non_faces_are_not_reidentified(ntsc_clip, faceless_clip, tmp_path):
    """A recogniser's distance at a place without a face means nothing: such faces count as not re-identified."""
    metrics = run_video_audit(VideoAuditJob(ntsc_clip, faceless_clip, tmp_path / "faceless", samples=0))
    assert metrics["faces"] == AUDIT_FRAMES
    assert metrics["output_faces_not_detected"] == AUDIT_FRAMES
    assert metrics["reidentification_rate"] == 0.0 and metrics["reidentified_faces"] == 0
    # The leak audit's closer look around the expected box reads the scrambled face upside down as a face in one
    # frame of the twelve (frame 3, dlib distance 0.52): it counts there as a leak, nowhere else.
    assert metrics["frames_with_output_faces"] <= 1 and metrics["leaked_frames"] == metrics["frames_with_output_faces"]
    records = [json.loads(line) for line in (tmp_path / "faceless" / "frames.jsonl").read_text().splitlines()]
    # what the old rule (distance at the original box, detected or not) would have counted as re-identified
    assert sum(r["identity_distance"] < 0.6 for r in records) > AUDIT_FRAMES // 2


def test_audit_refuses_existing_report_and_mismatched_frames(ntsc_clip, odd_clip, tmp_path):
    existing = tmp_path / "report"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(MediaError, match="--overwrite"):
        run_video_audit(VideoAuditJob(ntsc_clip, ntsc_clip, existing, max_items=2))
    with pytest.raises(MediaError, match="not a deid report"):
        run_video_audit(VideoAuditJob(ntsc_clip, ntsc_clip, existing, max_items=2, overwrite=True))
    assert (existing / "notes.txt").read_text() == "mine"
    with pytest.raises(MediaError, match="175x143"):
        run_video_audit(VideoAuditJob(ntsc_clip, odd_clip, tmp_path / "other", max_items=2))


@pytest.mark.slow
def test_video_cli_writes_the_report_and_refuses_to_overwrite_it(ntsc_clip, tmp_path, capsys):
    from deid import cli

    out = tmp_path / "audit"
    args = ["evaluate", "video", str(ntsc_clip), str(ntsc_clip), "-o", str(out), "--max-items", "3", "--samples", "1"]
    cli.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reidentification_rate"] == 1.0 and metrics["frames"] == 3
    assert metrics["original"]["frame_rate"] == "30000/1001"
    first = (out / "metrics.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == first
    cli.main(args + ["--overwrite"])
    assert json.loads((out / "metrics.json").read_text())["frames"] == 3


# --------------------------------------------------------------------------------------------- pairs


def _pairs_job(faces_dir: Path, output: Path, **kwargs) -> PairsJob:
    return PairsJob(output=output, images=faces_dir, n=kwargs.pop("n", 6), seed=3, batch_size=2, fid_weights="random",
                    fid_dims=64, samples=2, **kwargs)


@pytest.fixture(scope="module")
def passthrough_report(faces_dir, tmp_path_factory):
    """A full pairs report (Tables 1 and 2) of the passthrough model: (metrics, report dir, model calls)."""
    model = Passthrough()
    report = tmp_path_factory.mktemp("passthrough") / "report"
    return run_pairs(_pairs_job(faces_dir, report), model, model_source="passthrough"), report, model.calls


@pytest.mark.slow
def test_pairs_with_a_passthrough_model_give_the_known_answers(faces_dir, passthrough_report):
    metrics, report, _ = passthrough_report
    table1, table2 = metrics["pairs"], metrics["reconstruction"]
    # I_out = I_attr: its expression and pose are I_attr's exactly
    assert table1["expression"]["mean"] == 0.0 and table1["pose"]["mean"] == 0.0
    # The counts against the records: every pair is recorded once, and it is skipped exactly when one of its two
    # images is the faceless gradient (so a pipeline that skipped a good pair, or measured a faceless one, fails).
    names = sorted(p.name for p in faces_dir.iterdir())
    records = [json.loads(line) for line in (report / "pairs.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(6))
    with_gradient = sum("zz_gradient.png" in (names[r["id"]], names[r["attr"]]) for r in records)
    assert 0 < with_gradient < 6  # seed 3 draws both kinds, so both counts below are tested
    assert table1["counts"] == {**table1["counts"], "items": 6, "skipped_no_face": with_gradient, "evaluated": 6 - with_gradient}
    assert table1["fid"] == pytest.approx(0.0, abs=1e-3) and table1["fid_samples"] == 6 - with_gradient
    assert table1["identity"]["n"] == table1["expression"]["n"] == 6 - with_gradient
    # I_id = I_attr: a perfect reconstruction
    assert table2["rmse"]["mean"] == 0.0 and table2["psnr"]["mean"] == float("inf")
    on_disk = json.loads((report / "metrics.json").read_text())
    assert on_disk["reconstruction"]["psnr"]["mean"] is None  # JSON has no infinity: stored as null
    assert table2["identity"]["mean"] == pytest.approx(1.0) and table2["expression"]["mean"] == 0.0
    assert table2["counts"]["items"] == 5 and table2["counts"]["skipped_no_face"] == 1  # the gradient image
    assert table2["counts"]["evaluated"] == 4 and table2["rmse"]["n"] == 4
    # per pair: the output is I_attr, so dlib matches I_id exactly when both show the carphone man
    for item in records:
        gradient = "zz_gradient.png" in (names[item["id"]], names[item["attr"]])
        assert ("skipped" in item) == gradient
        if gradient:
            continue
        both_carphone = names[item["id"]].startswith("carphone") and names[item["attr"]].startswith("carphone")
        assert item["same_person"] == both_carphone
    html = (report / "index.html").read_text()
    assert "Table 1" in html and "Table 2" in html and "FID" in html and "samples/pairs_000.png" in html
    # a report is made to be shared: the usual modes (0666/0777 minus the umask), not owner-only
    umask = os.umask(0)
    os.umask(umask)
    for path in [report, *report.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


@pytest.mark.slow
def test_pairs_resume_after_an_interruption_matches_an_uninterrupted_run(faces_dir, passthrough_report, tmp_path, monkeypatch):
    import deid.pipelines.evaluate as evaluate

    fresh, fresh_dir, _ = passthrough_report
    monkeypatch.setattr(evaluate, "CHECKPOINT_EVERY", 1)
    target = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_pairs(_pairs_job(faces_dir, target, reconstruction=False), Passthrough(fail_after_calls=1), "passthrough")
    assert not target.exists() and (tmp_path / ".resumed.partial" / "pairs.state.npz").is_file()
    with pytest.raises(MediaError, match="--resume"):
        run_pairs(_pairs_job(faces_dir, target, reconstruction=False), Passthrough(), "passthrough")
    with pytest.raises(DeidError, match="different job"):
        run_pairs(_pairs_job(faces_dir, target, reconstruction=False, resume=True, n=5), Passthrough(), "passthrough")
    with (tmp_path / ".resumed.partial" / "pairs.jsonl").open("a") as records:  # cut by a kill mid-record
        records.write('{"index": 5, "id": 1, "at')
    model = Passthrough()
    resumed = run_pairs(_pairs_job(faces_dir, target, reconstruction=False, resume=True), model, "passthrough")
    # the model runs once per batch with a usable pair; the batch finished before the interruption is not run again
    batches_with_faces = {json.loads(line)["index"] // 2 for line in (fresh_dir / "pairs.jsonl").read_text().splitlines()
                          if "skipped" not in line}
    assert model.calls == len(batches_with_faces) - 1
    assert (target / "pairs.jsonl").read_text() == (fresh_dir / "pairs.jsonl").read_text()
    assert resumed["pairs"]["fid"] == pytest.approx(fresh["pairs"]["fid"], abs=1e-6)


@pytest.mark.slow
def test_pairs_cli_with_a_tiny_trained_model_checkpoint(faces_dir, tiny_model_path, tmp_path):
    from deid import cli

    out = tmp_path / "tiny"
    cli.main(["evaluate", "pairs", "--model", str(tiny_model_path), "--images", str(faces_dir), "--n", "3", "--max-items", "4",
              "--no-reconstruction", "--fid-weights", "random", "--fid-dims", "64", "--samples", "1", "-o", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"]["images"] == 4  # --max-items: the first four photos (not the faceless gradient)
    assert metrics["model"]["source"] == str(tiny_model_path) and metrics["model"]["step"] == 0
    assert len(metrics["model"]["generator_fingerprint"]) == 64
    table1 = metrics["pairs"]
    assert table1["counts"]["items"] == 3
    # an untrained 32x32 model draws no face: measured at I_attr's face box instead, and counted
    assert table1["counts"]["output_face_not_detected"] == table1["counts"]["evaluated"]
    assert table1["expression"]["mean"] > 0 and table1["identity"]["n"] == table1["counts"]["evaluated"]
    assert (out / "samples" / "pairs_000.png").is_file()


def test_pairs_cli_without_fid_weights_is_a_one_line_error(faces_dir, tiny_model_path, tmp_path, capsys):
    from deid import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "pairs", "--model", str(tiny_model_path), "--images", str(faces_dir), "--n", "2",
                  "-o", str(tmp_path / "r")])
    assert exit_info.value.code == 1
    assert "inception-v3-fid" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".*partial"))


def test_pairs_on_a_generated_dataset_reads_it_and_counts_faceless_samples(tiny_dataset, tiny_model, tmp_path):
    """The tiny generator's 32x32 samples hold no faces: every pair is skipped and said so, nothing crashes."""
    job = PairsJob(output=tmp_path / "ds", dataset=tiny_dataset, n=3, max_items=3, fid_weights="random", fid_dims=64)
    metrics = run_pairs(job, tiny_model, model_source="tiny")
    assert metrics["source"]["images"] == 3 and "generated dataset" in metrics["source"]["description"]
    for table in ("pairs", "reconstruction"):
        counts = metrics[table]["counts"]
        assert counts["items"] == 3 and counts["skipped_no_face"] == 3 and counts["evaluated"] == 0
        assert metrics[table]["identity"]["mean"] is None
    assert metrics["pairs"]["fid"] is None
    with pytest.raises(DeidError, match="32 px but the model makes 128 px"):
        run_pairs(PairsJob(output=tmp_path / "ds2", dataset=tiny_dataset, n=2, fid=False), Passthrough())



def test_pairs_cli_checks_paths_and_options_before_loading_the_model(faces_dir, tmp_path, capsys):
    """The model named here does not exist: an error about anything else was found before loading it."""
    from deid import cli

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    not_a_dataset = tmp_path / "empty"
    not_a_dataset.mkdir()
    model = ["--model", str(tmp_path / "no-such-model.safetensors"), "--device", "cpu"]
    cases = [(["--images", str(faces_dir), "-o", str(taken)], "already exists"),
             (["--images", str(faces_dir), "-o", str(tmp_path / "nowhere" / "r")], "does not exist"),
             (["--dataset", str(not_a_dataset), "-o", str(tmp_path / "r")], "not a complete generated dataset"),
             (["--images", str(faces_dir), "--dataset", str(not_a_dataset), "-o", str(tmp_path / "r")], "exactly one"),
             (["--images", str(faces_dir), "--fid-weights", "inception-v3-fid", "-o", str(tmp_path / "r")], "inception-v3-fid")]
    for args, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["evaluate", "pairs", "--n", "2", *args, *model])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and words in err and "no-such-model" not in err, (args, err)
    assert (taken / "notes.txt").read_text() == "mine" and not (tmp_path / "r").exists()


class FaceGenerator(torch.nn.Module):
    """A stand-in generator whose samples are real aligned faces, in turn: sample i is faces[i % K]. Lets
    make-dataset write a generated dataset that holds faces (the tiny generator's 32x32 samples hold none)."""

    source, fingerprint, z_dim, w_dim, num_ws = "random", "real-faces-for-tests", 4, 4, 1

    def __init__(self, faces: torch.Tensor):
        super().__init__()
        self.faces, self.resolution, self.next = faces, faces.shape[-1], 0

    def mapping(self, z, truncation_psi=1.0):
        return z

    def synthesis(self, w, noise_mode="const"):
        picked = [self.faces[(self.next + k) % len(self.faces)] for k in range(len(w))]
        self.next += len(w)
        return torch.stack(picked)


@pytest.fixture(scope="module")
def face_dataset(faces_dir, tmp_path_factory):
    """A generated dataset of 8 real faces at 128 px: carphone frames 0, 60, 119 and the astronaut, twice.
    Returns (dataset dir, the person of each sample)."""
    from deid.faces.alignment import align_photo_file
    from deid.train.make_dataset import MakeDatasetConfig, make_dataset

    photos = sorted(p for p in faces_dir.iterdir() if not p.name.startswith("zz_"))
    # (crops as [-1, 1] tensors: make-dataset's x * 127.5 + 128, rounded down, gives back the same bytes)
    faces = torch.stack([align_photo_file(p, Passthrough.resolution).tensor for p in photos])
    out = tmp_path_factory.mktemp("faces_dataset") / "ds"
    make_dataset(MakeDatasetConfig(out=out, n=8, generator="random", batch_size=4, device="cpu"), generator=FaceGenerator(faces))
    return out, [photos[i % len(photos)].name.split("_")[0].removesuffix(".png") for i in range(8)]


@pytest.mark.slow
def test_pairs_on_a_generated_dataset_of_real_faces_give_the_known_answers(face_dataset, tmp_path):
    dataset, person = face_dataset
    job = PairsJob(output=tmp_path / "ds", dataset=dataset, n=6, seed=5, batch_size=4, fid_weights="random", fid_dims=64, samples=1)
    metrics = run_pairs(job, Passthrough(), model_source="passthrough")
    assert metrics["source"]["images"] == 8 and "generated dataset" in metrics["source"]["description"]
    table1, table2 = metrics["pairs"], metrics["reconstruction"]
    assert table1["counts"]["evaluated"] == 6 and table1["counts"]["skipped_no_face"] == 0
    assert table1["expression"]["mean"] == 0.0 and table1["pose"]["mean"] == 0.0
    assert table2["counts"]["evaluated"] == 6 and table2["rmse"]["mean"] == 0.0
    for line in (tmp_path / "ds" / "pairs.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert item["same_person"] == (person[item["id"]] == person[item["attr"]])
