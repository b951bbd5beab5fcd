"""Every speed figure deid's GPU goals depend on, from one command that survives whatever breaks.

    python bench/suite.py --device cuda --budget 420      # a GPU visit: every measurement within 7 minutes
    python bench/suite.py --quick --device cpu            # toy sizes in under two minutes (the test suite runs it)

Measurements (bench/suite_measures.py), in priority order: StyleGAN2 synthesis at 256 and 1024 (batches 1, 8,
32, 64 and the largest that fits; fp32, TF32, bf16, fp16; eager and torch.compile, compile time apart; PSNR
against fp32), make-dataset (end to end, and without PNG encoding), training steps/s (batch 6 and the largest
batch, fp32 and bf16, each precision at its own largest batch, with why the search stopped, the fraction of each
step spent waiting for data and peak GPU memory) and anonymize frames/s on a 1080p clip with one and with three
faces (per stage, and end to end without the privacy audit and with it, for the generate engine and for the mask
engine, which runs no model; a row whose replaced faces are not the faces the clip shows fails). Networks have
random weights of the published architectures (speed does not depend on the values); nothing is downloaded.

Each group of measurements runs in its own Python process, so an out-of-memory error, a CUDA error, a compile
failure or a crash is recorded with its message and the other groups still run. A group that no longer fits in
what is left of the budget is skipped, and the report says so. Results: bench-results/<device>-<date>.json
(every figure and the machine) and a Markdown table on stdout, ready for the README.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deid.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 20.0  # a group past its deadline gets this long to finish the variant it is in before it is killed


@dataclass(frozen=True)
class Group:
    """One subprocess: a measurement function of suite_measures with its settings."""

    name: str
    measure: str  # function name in suite_measures
    spec: dict = field(default_factory=dict)
    estimate_s: float = 30.0  # rough GPU time, start-up included; a group is skipped when less than this is left


# Published architectures: the 256 config of stylegan2-ada's FFHQ transfer source, and config-f FFHQ 1024.
GEN_256 = {"resolution": 256, "channel_base": 16384, "channel_max": 512}
GEN_1024 = {"resolution": 1024, "channel_base": 32768, "channel_max": 512}
PRECISIONS = ["fp32", "tf32", "bf16", "fp16"]


def plan(quick: bool, device: str) -> list[Group]:
    """The measurements in the order they run (most wanted first). --quick: the same code paths at toy sizes."""
    if quick:
        gens = {"256": "tiny", "1024": "tiny64"}
        synth = {"batches": [1, 2], "largest_cap": 4, "min_seconds": 0.0, "repeats": 1}
        precisions = PRECISIONS if device != "cpu" else ["fp32", "bf16"]
        clip = {"size": [160, 90], "frames": 2}  # faces of 54 px, still found by MTCNN (its smallest is 20 px)
        # training: "steps" 1 is one warm-up step and one timed step, the least that times a step
        return [
            Group("synthesis-256-eager", "synthesis", {"generator": gens["256"], "precisions": precisions, **synth}, 10),
            Group("train-256-batch6", "train", {"generator": "tiny", "model": "tiny", "batches": [6], "precisions": ["fp32"], "steps": 1, "samples": 12}, 20),
            Group("make-dataset-256", "make_dataset", {"generator": "tiny", "n": 24}, 8),
            Group("anonymize-1080p", "anonymize", {"model": "tiny", **clip, "faces": [1, 3]}, 20),
            Group("audit-pool-1080p", "audit_pool", {**clip, "faces": [3], "workers": [1],
                                                     "group": 2}, 20),
            Group("synthesis-1024-eager", "synthesis", {"generator": gens["1024"], "precisions": ["fp32"], **synth}, 8),
            # batch 8 is the PSNR check's: one shape, so one compilation
            Group("synthesis-256-compile", "synthesis", {"generator": gens["256"], "precisions": ["fp32"], "compile": True,
                                                         "compile_backend": "eager", **synth, "batches": [8],
                                                         "largest_cap": 0}, 15),
            Group("train-256-largest", "train", {"generator": "tiny", "model": "tiny", "batches": ["largest"], "precisions": ["fp32"],
                                                 "steps": 1, "largest_cap": 12, "samples": 24}, 15),
        ]
    synth = {"batches": [1, 8, 32, 64], "largest_cap": 4096, "min_seconds": 0.5, "repeats": 20}
    return [
        Group("synthesis-256-eager", "synthesis", {"generator": GEN_256, "precisions": PRECISIONS, **synth}, 45),
        Group("train-256-batch6", "train", {"generator": GEN_256, "model": "256", "batches": [6], "precisions": ["fp32", "bf16"], "steps": 30, "samples": 192}, 60),
        Group("make-dataset-256", "make_dataset", {"generator": GEN_256, "n": 4096}, 30),
        Group("anonymize-1080p", "anonymize", {"model": "256", "size": [1920, 1080], "frames": 90, "faces": [1, 3]}, 60),
        Group("audit-pool-1080p", "audit_pool", {"size": [1920, 1080], "frames": 90, "faces": [1, 3],
                                                 "workers": [1, 4, 8, "all"], "group": 8}, 60),
        Group("synthesis-1024-eager", "synthesis", {"generator": GEN_1024, "precisions": PRECISIONS, **synth,
                                                    "largest_cap": 512}, 60),
        Group("synthesis-256-channels-last", "synthesis", {"generator": GEN_256, "precisions": ["bf16", "fp16"],
                                                           "channels_last": True, **synth}, 30),
        Group("synthesis-256-compile", "synthesis", {"generator": GEN_256, "precisions": ["bf16", "fp32"], "compile": True,
                                                     **synth, "batches": [8, 64], "largest_cap": 0}, 90),
        Group("train-256-largest", "train", {"generator": GEN_256, "model": "256", "batches": ["largest"], "precisions": ["bf16", "fp32"],
                                             "steps": 10, "largest_cap": 384, "samples": 768}, 90),
        Group("synthesis-1024-compile", "synthesis", {"generator": GEN_1024, "precisions": ["bf16"], "compile": True,
                                                      **synth, "batches": [8], "largest_cap": 0}, 90),
    ]


# ------------------------------------------------------------------------------------------- running


def run_group(group: Group, args, deadline: float, results_dir: Path) -> dict:
    """Run one group in a fresh interpreter; returns its record (rows of variants, or the error that ended it)."""
    result_file = results_dir / f"{group.name}.jsonl"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", group.measure, "--spec", json.dumps(group.spec),
               "--device", args.device, "--result", str(result_file), "--deadline", str(deadline)]
    if args.inject_failure == group.name:
        command.append("--fail")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.time()
    record = {"group": group.name, "measure": group.measure, "spec": group.spec}
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.time() + GRACE_S))
        status, detail = ("ok", None) if proc.returncode == 0 else ("failed", _last_lines(proc.stderr or proc.stdout))
    except subprocess.TimeoutExpired:
        status, detail = "timeout", f"killed after {time.time() - start:.0f} s (its share of the budget ran out)"
    record["seconds"] = round(time.time() - start, 1)
    record["rows"] = _read_rows(result_file)
    record["status"] = status
    if detail:
        record["error"] = detail
    return record


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed process
            pass
    return rows


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-600:] or "exited without a message"


def machine(device: str) -> dict:
    """What the figures were measured on (read in a subprocess, so this process never initialises CUDA)."""
    code = ("import json, torch; d = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if d else None, "
            "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if d else None, "
            "'torch_threads': torch.get_num_threads()}))")
    try:
        info = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout)
    except (ValueError, subprocess.TimeoutExpired):
        info = {}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"device": device, **info, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in load] if load else None}


# ------------------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    """The README table: one line per variant, skipped and failed groups included."""
    m = report["machine"]
    title = f"{m.get('gpu') or m.get('cpu')} ({report['device']}), torch {m.get('torch')}, {report['date']}"
    lines = [f"Measured {title}{' (--quick: toy sizes)' if report['quick'] else ''}:", "",
             "| measurement | variant | figures | note |", "| --- | --- | --- | --- |"]
    for g in report["groups"]:
        if g["status"] == "skipped":
            lines.append(f"| {g['group']} | - | not measured | {g['reason']} |")
            continue
        for row in g["rows"]:
            note = row.get("error") or row.get("note") or ""
            lines.append(f"| {g['group']} | {row.get('variant', '-')} | {row.get('summary', row.get('status', ''))} | {_cell(note)} |")
        if g["status"] != "ok":
            lines.append(f"| {g['group']} | (group) | {g['status']} | {_cell(g.get('error', ''))} |")
    return "\n".join(lines)


def _finite(value):
    """The report with NaN and infinities (a broken fp16 image, say) as null: plain JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all measurements together")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that every measurement still runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="folder of the JSON results")
    parser.add_argument("--only", nargs="+", default=None, metavar="GROUP", help="run only these groups")
    parser.add_argument("--inject-failure", default=None, metavar="GROUP",
                        help="make this group raise at its start (tests that one failure spares the rest)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--fail", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import suite_measures  # bench/ is this script's folder, hence on sys.path

        suite_measures.run_worker(args.worker, json.loads(args.spec), args.device, args.result, args.deadline, args.fail)
        return 0

    start = time.time()
    end = start + args.budget
    groups = [g for g in plan(args.quick, args.device) if args.only is None or g.name in args.only]
    unknown = set(args.only or ()) - {g.name for g in plan(args.quick, args.device)}
    if unknown:
        parser.error(f"unknown group(s) {sorted(unknown)}")
    stamp = time.strftime("%Y-%m-%d-%H%M%S", time.gmtime(start))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / f".{args.device}-{stamp}"
    work.mkdir(exist_ok=True)
    report = {"suite": "deid bench", "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
              "quick": args.quick, "budget_s": args.budget, "machine": machine(args.device), "groups": []}
    for group in groups:
        left = end - time.time()
        if left < group.estimate_s:
            report["groups"].append({"group": group.name, "status": "skipped", "spec": group.spec, "rows": [],
                                     "reason": f"skipped: needs about {group.estimate_s:.0f} s, {max(left, 0):.0f} s of the "
                                               f"budget left (raise --budget)"})
            print(f"[suite] {group.name}: skipped ({max(left, 0):.0f} s left)", file=sys.stderr, flush=True)
            continue
        print(f"[suite] {group.name} ({left:.0f} s left) ...", file=sys.stderr, flush=True)
        record = run_group(group, args, end, work)
        print(f"[suite] {group.name}: {record['status']} in {record['seconds']} s"
              + (f" ({record['error']})" if record.get("error") else ""), file=sys.stderr, flush=True)
        report["groups"].append(record)
    report["seconds"] = round(time.time() - start, 1)
    path = args.out / f"{args.device}-{stamp}.json"
    write_text_atomic(path, json.dumps(_finite(report), indent=1, allow_nan=False))
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()
    print(markdown(report))
    print(f"\n[suite] results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
