"""bench/suite.py, the one command a GPU visit runs: at toy sizes on the CPU it still measures everything, a
failing measurement is recorded while the others report, and what no longer fits the budget is skipped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.ranks import OWN_PROCESSES

ROOT = Path(__file__).resolve().parents[1]
QUICK_GROUPS = {"synthesis-256-eager", "train-256-batch6", "make-dataset-256", "anonymize-1080p", "audit-pool-1080p",
                "synthesis-1024-eager", "synthesis-256-compile", "train-256-largest"}


def _suite(out: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--device", "cpu", "--out", str(out),
                           *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("cpu-*.json")
    return json.loads(path.read_text()), proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run in which the 1024 synthesis group is made to fail at its start."""
    return _suite(tmp_path_factory.mktemp("bench"), "--budget", "240", "--inject-failure", "synthesis-1024-eager")


@OWN_PROCESSES
@pytest.mark.slow
def test_quick_suite_measures_everything_and_survives_a_failing_measurement(quick_run):
    report, table = quick_run
    groups = {g["group"]: g for g in report["groups"]}
    assert set(groups) == QUICK_GROUPS
    failed = groups.pop("synthesis-1024-eager")
    assert failed["status"] == "failed" and "injected failure" in failed["error"] and not failed["rows"]
    for name, group in groups.items():
        assert group["status"] == "ok", (name, group.get("error"))
        assert group["rows"] and all(row["status"] == "ok" for row in group["rows"]), (name, group["rows"])

    synthesis = {row["variant"]: row for row in groups["synthesis-256-eager"]["rows"]}
    assert set(synthesis) == {"fp32", "bf16"}
    for row in synthesis.values():
        assert set(row["images_per_second"]) == {"1", "2"} and min(row["images_per_second"].values()) > 0
        assert row["largest_batch"] == 4  # doubling from 2 up to the quick cap
        assert row["largest_search_stopped"].startswith("the cap: batch 8")
    assert synthesis["fp32"]["psnr_vs_fp32_db"] is None  # identical: the reference itself
    assert 20 < synthesis["bf16"]["psnr_vs_fp32_db"] < 80  # rounded, not broken
    (compiled,) = groups["synthesis-256-compile"]["rows"]
    assert compiled["compile"] and (compiled["psnr_vs_fp32_db"] or math.inf) > 60  # the same maths, traced

    (step,) = groups["train-256-batch6"]["rows"]
    assert step["batch"] == 6 and step["steps_per_second"] > 0
    assert step["data_wait_fraction"] < 0.05  # the loader keeps up: decoding happens in a worker, ahead of time
    (largest,) = groups["train-256-largest"]["rows"]
    assert largest["batch"] == 12  # doubling from 12: nothing runs out of memory up to the quick cap
    assert largest["largest_search_stopped"].startswith("the cap: batch 24")

    dataset = {row["variant"]: row for row in groups["make-dataset-256"]["rows"]}
    assert set(dataset) == {"end to end", "without PNG", "PNG encoding alone"}
    assert all(row["images_per_second"] > 0 for row in dataset.values())

    faces = {row["variant"]: row for row in groups["anonymize-1080p"]["rows"]}
    assert list(faces) == [f"{label}{engine}, {audit}" for label in ("1 face", "3 faces")
                           for engine in ("", ", mask engine") for audit in ("no audit", "with the audit")]
    for label, count in (("1 face", 1), ("3 faces", 3)):
        for engine, name in (("generate", label), ("mask", f"{label}, mask engine")):
            plain, audited = faces[f"{name}, no audit"], faces[f"{name}, with the audit"]
            for row in (plain, audited):  # the synthetic clip shows `count` findable faces in every frame
                assert row["engine"] == engine and row["end_to_end_fps"] > 0
                assert row["faces_found"] == row["faces_shown"] == count * row["frames"]
            assert not plain["audited"] and audited["audited"]
            expected = {"decode", "detect", "detect_roll_robust", "track_smooth", "align", "synthesize", "paste", "audit",
                        "encode"} if engine == "generate" else {"decode", "detect_roll_robust", "track_smooth", "mask",
                                                                 "audit", "encode"}
            assert set(plain["stages_fps"]) == expected
            assert audited["audit_ms_per_frame"] > 0 and "with the audit" in audited["summary"]

    (pool,) = groups["audit-pool-1080p"]["rows"]  # 3 faces, 1 worker, the quick clip's 2 frames
    assert pool["workers"] == 1 and pool["frames"] == 2 and pool["faces_found"] > 0 and pool["fps"] > 0

    assert "| measurement | variant | figures | note |" in table
    for name in QUICK_GROUPS:
        assert f"| {name} |" in table


@OWN_PROCESSES
@pytest.mark.slow
def test_groups_that_do_not_fit_the_budget_are_skipped_and_reported(tmp_path):
    report, table = _suite(tmp_path, "--budget", "0")
    assert {g["group"] for g in report["groups"]} == QUICK_GROUPS
    assert all(g["status"] == "skipped" and "budget" in g["reason"] for g in report["groups"])
    assert table.count("not measured") == len(QUICK_GROUPS)


# ------------------------------------------------------------------------------------------- in process


@pytest.fixture
def measures(monkeypatch):
    """bench/suite_measures.py imported as the suite's worker process imports it (bench/ on sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import suite_measures

    return suite_measures


def _rows(path: Path) -> dict:
    return {row["variant"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_the_batch_search_stops_for_a_recorded_reason(measures, tmp_path):
    rec = measures.Recorder(tmp_path / "rows.jsonl", deadline=time.time() + 600, device=torch.device("cpu"))
    tried = []

    def attempt(batch):
        tried.append(batch)
        if batch >= 48:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch / 10

    assert measures.largest_fitting(12, 384, attempt, torch.device("cpu"), rec, 0) == ((24, 2.4), "batch 48: out of memory")
    assert measures.largest_fitting(12, 24, attempt, torch.device("cpu"), rec, 0) == (
        (24, 2.4), "the cap: batch 48 is over the search's limit of 24 (a larger one may fit)")
    assert tried == [12, 24, 48, 12, 24]
    found, stopped = measures.largest_fitting(12, 384, attempt, torch.device("cpu"), rec, reserve_s=10**6)
    assert found is None and stopped.startswith("the budget:") and stopped.endswith("before batch 12")


def test_each_precision_searches_its_largest_training_batch_once_and_trains_at_it(measures, tmp_path, monkeypatch):
    searched, trained = [], []
    largest = {"bf16": (48, "batch 96: out of memory"), "fp32": (24, "batch 48: out of memory"),
               "fp16": (None, "batch 12: out of memory")}

    def search(G, model_config, precision, spec, device, rec):
        searched.append(precision)
        return largest[precision]

    def run(data, out, G, model_config, batch, precision, spec, device):
        trained.append((precision, batch))
        return {"batch": batch, "precision": precision, "summary": "1.5 steps/s"}

    monkeypatch.setattr(measures, "_largest_train_batch", search)
    monkeypatch.setattr(measures, "_train_run", run)
    monkeypatch.setattr(measures, "make_dataset", lambda config, generator: None)
    rec = measures.Recorder(tmp_path / "rows.jsonl", deadline=time.time() + 600, device=torch.device("cpu"))
    spec = {"generator": "tiny", "model": "tiny", "batches": ["largest"], "precisions": ["bf16", "fp32", "fp16"],
            "samples": 24}
    measures.measure_train(spec, torch.device("cpu"), rec)
    assert searched == ["bf16", "fp32", "fp16"]
    assert trained == [("bf16", 48), ("fp32", 24)]
    rows = _rows(tmp_path / "rows.jsonl")
    assert rows["largest batch, bf16"]["batch"] == 48 and rows["largest batch, bf16"]["summary"] == "batch 48: 1.5 steps/s"
    assert rows["largest batch, fp32"]["largest_search_stopped"] == "batch 48: out of memory"
    failed = rows["largest batch, fp16"]
    assert failed["status"] == "failed" and "no batch fits" in failed["error"] and "batch 12: out of memory" in failed["error"]


def _stages_result(faces_found: int, audited: bool) -> dict:
    """What bench/video_pipeline.run_stages returns for a 4-frame clip (figures made up, keys real)."""
    result = {"clip": "320x180", "frames": 4, "peak_rss_mib": 900.0,
              "stages": {"decode": {"fps": 400.0}, "synthesize": {"fps": 20.0}, "audit": {"skipped": "dlib is missing"}},
              "pipeline_no_audit": {"frames": 4, "faces": faces_found, "seconds": 0.4, "fps": 10.0}}
    if audited:
        result["stages"]["audit"] = {"fps": 8.0, "ms_per_frame": 125.0}
        result["pipeline"] = {"frames": 4, "faces": faces_found, "seconds": 0.5, "fps": 8.0}
        result["audit_adds"] = 0.25
    return result


def test_anonymize_rows_fail_when_faces_go_missing_or_the_audit_cannot_run(measures, tmp_path, monkeypatch):
    import video_pipeline  # bench/, on sys.path through the fixture

    results = {1: _stages_result(faces_found=3, audited=False), 3: _stages_result(faces_found=12, audited=True)}
    calls = []

    def run_stages(clip, model, frames, device):
        faces = int(clip.stem.removeprefix("faces"))
        calls.append(faces)
        return results[faces]

    monkeypatch.setattr(video_pipeline, "run_stages", run_stages)
    monkeypatch.setattr(measures, "make_face_clip", lambda path, size, frames, faces: path)
    rec = measures.Recorder(tmp_path / "rows.jsonl", deadline=time.time() + 600, device=torch.device("cpu"))
    measures.measure_anonymize({"model": "tiny", "size": [320, 180], "frames": 4, "faces": [1, 3]}, torch.device("cpu"), rec)
    assert calls == [1, 3]  # one run feeds both rows of a face count
    rows = _rows(tmp_path / "rows.jsonl")
    missing = rows["1 face, no audit"]  # 3 faces replaced in 4 frames of one face: a failed row, figures kept
    assert missing["status"] == "failed" and missing["faces_found"] == 3 and missing["faces_shown"] == 4
    assert missing["error"] == "3 faces replaced, the clip shows 4 (1 in each of 4 frames)"
    assert missing["end_to_end_fps"] == 10.0
    no_audit = rows["1 face, with the audit"]
    assert no_audit["status"] == "failed" and no_audit["error"] == "RuntimeError: audit not measured: dlib is missing"
    plain, audited = rows["3 faces, no audit"], rows["3 faces, with the audit"]
    assert plain["status"] == audited["status"] == "ok"
    assert (plain["audited"], plain["end_to_end_fps"], audited["audited"], audited["end_to_end_fps"]) == (False, 10.0, True, 8.0)
    assert audited["audit_adds"] == 0.25 and "adds 25 %" in audited["summary"]
