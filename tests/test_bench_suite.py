"""bench/suite.py, the one command a GPU visit runs: at toy sizes on the CPU it still measures everything, a
failing measurement is recorded while the others report, and what no longer fits the budget is skipped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert synthesis["fp32"]["psnr_vs_fp32_db"] is None  # identical: the reference itself
    assert 20 < synthesis["bf16"]["psnr_vs_fp32_db"] < 80  # rounded, not broken
    (compiled,) = groups["synthesis-256-compile"]["rows"]
    assert compiled["compile"] and (compiled["psnr_vs_fp32_db"] or math.inf) > 60  # the same maths, traced

    (step,) = groups["train-256-batch6"]["rows"]
    assert step["batch"] == 6 and step["steps_per_second"] > 0
    assert step["data_wait_fraction"] < 0.05  # the loader keeps up: decoding happens in a worker, ahead of time
    (largest,) = groups["train-256-largest"]["rows"]
    assert largest["batch"] == 12  # doubling from 6: nothing runs out of memory up to the quick cap

    dataset = {row["variant"]: row for row in groups["make-dataset-256"]["rows"]}
    assert set(dataset) == {"end to end", "without PNG", "PNG encoding alone"}
    assert all(row["images_per_second"] > 0 for row in dataset.values())

    faces = {row["variant"]: row for row in groups["anonymize-1080p"]["rows"]}
    for variant, count in (("1 face", 1), ("3 faces", 3)):
        row = faces[variant]
        assert row["faces_found"] == count * row["frames"]  # the synthetic clip shows `count` findable faces
        assert set(row["stages_fps"]) == {"decode", "detect", "detect_roll_robust", "track_smooth", "align", "synthesize",
                                          "paste", "audit", "encode"}
        assert row["audited"] and row["end_to_end_fps"] > 0 and row["end_to_end_no_audit_fps"] > 0

    (pool,) = groups["audit-pool-1080p"]["rows"]  # 3 faces, 1 worker
    assert pool["workers"] == 1 and pool["frames"] == 4 and pool["faces_found"] > 0 and pool["fps"] > 0

    assert "| measurement | variant | figures | note |" in table
    for name in QUICK_GROUPS:
        assert f"| {name} |" in table


def test_groups_that_do_not_fit_the_budget_are_skipped_and_reported(tmp_path):
    report, table = _suite(tmp_path, "--budget", "0")
    assert {g["group"] for g in report["groups"]} == QUICK_GROUPS
    assert all(g["status"] == "skipped" and "budget" in g["reason"] for g in report["groups"])
    assert table.count("not measured") == len(QUICK_GROUPS)
