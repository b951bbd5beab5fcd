"""`deid anonymize --ray` on one local Ray instance shared by these tests: the same outputs as a local run, models built
once per actor, the long file balanced against the short ones, a worker killed mid-file, corrupt input, reruns."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from deid import cli
from deid.atomic import is_partial
from deid.errors import DeidError
from deid.interrupts import sigterm_as_interrupt
from deid.evaluation.audit import audit_path
from deid.faces.orientation import OrientationConfig
from deid.media.samples import make_crowd_clip
from deid.media.video import EncodeOptions, probe, read_frames
from deid.pipelines.anonymize import AnonymizeJob, run_anonymize
from deid.pipelines.inputs import Task
from deid.pipelines.cluster import ModelOptions, RayOptions, _Pending, _Scheduler, _pool_size, anonymize_on_ray
from tests.ranks import OWN_PROCESSES

SHORT, LONG = 3, 24  # frames of the short clips and of the 8x-long one (crowd clips: 352x288, 0-4 faces)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every Ray test: 2 CPUs, and 2 GPUs declared as logical resources (so the actors'
    `num_gpus` is scheduled as on a GPU cluster; torch still runs on the CPU)."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_options(tiny_model_path) -> ModelOptions:
    return ModelOptions(str(tiny_model_path), device="cpu", precision="fp32")


def _clip(folder: Path, name: str, frames: int, seed: int) -> Path:
    return make_crowd_clip(folder / name, seconds=frames / 4, fps=4, seed=seed)


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_partial(p)]


@OWN_PROCESSES
@pytest.mark.slow
def test_ray_run_equals_local_run_and_builds_models_once(ray_cluster, tiny_model_options, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _clip(inputs, "a.mp4", 2, seed=1)
    _clip(inputs, "b.mp4", 3, seed=2)
    _clip(inputs, "c.mp4", 2, seed=3)
    # Lossless H.264 (crf 0) here: libx264's bitstream is not reproducible from run to run (its B-frame lookahead
    # decides otherwise now and then for the same frames, in one process too), so compare the pixels deid made.
    lossless = EncodeOptions(crf=0)
    job = AnonymizeJob(inputs=(inputs,), output=tmp_path / "ray", encode=lossless)
    results = anonymize_on_ray(job, tiny_model_options, RayOptions(workers=2, gpus_per_worker=1))
    local = run_anonymize(AnonymizeJob(inputs=(inputs,), output=tmp_path / "local", encode=lossless),
                          *tiny_model_options.load())

    assert [r.report.target.relative_to(tmp_path / "ray") for r in results] == \
           [r.target.relative_to(tmp_path / "local") for r in local]
    for result, mine in zip(results, local):
        ray_out, local_out = result.report.target, mine.target
        assert result.report.error is None and not result.report.skipped
        assert (result.report.frames, result.report.faces, result.report.persons) == (mine.frames, mine.faces, mine.persons)
        assert audit_path(ray_out).read_text() == audit_path(local_out).read_text()
        for a, b in zip(read_frames(ray_out), read_frames(local_out), strict=True):
            assert np.array_equal(a.image, b.image), f"{ray_out.name} frame {a.index}: not the local run's pixels"
    assert [r.report.frames for r in results] == [2, 3, 2]

    stamps = [r.worker for r in results]
    assert len({(s.node, s.pid) for s in stamps}) == 2, "two actors, one of them ran two files"
    assert all(s.models_built == 1 for s in stamps), "each actor built its models once, for all its files"
    assert not _partials(tmp_path)

    # A rerun skips every finished file, and starts no actor for them.
    rerun = anonymize_on_ray(job, tiny_model_options, RayOptions(workers=2))
    assert [(r.report.skipped, r.worker) for r in rerun] == [(True, None)] * 3


@OWN_PROCESSES
@pytest.mark.slow
def test_the_long_file_goes_first_and_the_short_ones_to_the_other_actor(ray_cluster, tiny_model_options, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _clip(inputs, "long.mp4", LONG, seed=3)
    for i in range(5):
        _clip(inputs, f"short{i}.mp4", SHORT, seed=10 + i)
    # upright detection only: every frame costs about the same (the turned views' sweep every 8th frame would make a
    # short clip's first frame weigh as much as several of the long one's)
    job = AnonymizeJob(inputs=(inputs,), output=tmp_path / "out", audit=None, orientation=OrientationConfig(views=(0,)))
    results = anonymize_on_ray(job, tiny_model_options, RayOptions(workers=2))
    frames = {r.report.target.name: r.report.frames for r in results}
    assert frames == {"long.mp4": LONG, **{f"short{i}.mp4": SHORT for i in range(5)}}
    stamps = {r.report.target.name: r.worker for r in results}
    long = stamps.pop("long.mp4")
    beside = [name for name, s in stamps.items() if s.pid != long.pid]
    behind = [name for name, s in stamps.items() if s.pid == long.pid]
    # No short file waited behind the long one: the other actor took them while it ran. (That actor takes them all
    # when their total time is under the long one's, as on a quiet machine; on a busy one the long one may end
    # first, and its actor then takes the last ones: correct, and so allowed here.)
    assert beside, f"the short files went to the other actor: {stamps}"
    assert all(stamps[name].started >= long.finished for name in behind), "a short file waited behind the long one"


class _Killer(threading.Thread):
    """Kills (SIGKILL, as the kernel's OOM killer does) the process writing a target's temporary file as soon as one
    appears: `once` names targets killed the first time, `always` ones killed every time."""

    def __init__(self, folder: Path, once: set[str], always: set[str]):
        super().__init__(daemon=True)
        self.folder, self.once, self.always = folder, once, always
        self.kills: dict[str, int] = {}  # attempts killed per target (one temporary file per attempt)
        self.seen: set[Path] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for partial in _partials(self.folder):
                name = next((n for n in self.once | self.always if partial.name.startswith(f".{Path(n).stem}.")), None)
                if partial in self.seen or not name or not (name in self.always or not self.kills.get(name)):
                    continue
                writers = _writers(partial)  # more than one process may hold it open: kill them all, count one attempt
                if writers:
                    for pid in writers:
                        os.kill(pid, signal.SIGKILL)
                    self.seen.add(partial)
                    self.kills[name] = self.kills.get(name, 0) + 1
            time.sleep(0.02)


def _writers(path: Path) -> set[int]:
    """Processes that hold `path` open (Linux /proc)."""
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                found.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return found - {os.getpid()}


@OWN_PROCESSES
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the worker's process through /proc (Linux)")
def test_worker_killed_mid_file_gives_one_output_and_a_file_that_always_kills_fails(ray_cluster, tiny_model_options, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    # The files to kill are long, so the killer (a thread that polls) finds them mid-file on a loaded machine too:
    # CI once ran a 6-frame file from start to finish between two of its looks.
    frames = {"killed_once.mp4": LONG, "kills_always.mp4": LONG, "fine.mp4": 2 * SHORT}
    for i, (name, count) in enumerate(frames.items()):
        _clip(inputs, name, count, seed=20 + i)
    out = tmp_path / "out"
    killer = _Killer(out, once={"killed_once.mp4"}, always={"kills_always.mp4"})
    killer.start()
    try:
        results = anonymize_on_ray(AnonymizeJob(inputs=(inputs,), output=out, audit=None), tiny_model_options,
                                   RayOptions(workers=2, gpus_per_worker=0, retries=1))
    finally:
        killer.done.set()
    reports = {r.report.target.name: r.report for r in results}
    assert sorted(reports) == ["fine.mp4", "killed_once.mp4", "kills_always.mp4"]  # one report per file
    assert killer.kills == {"killed_once.mp4": 1, "kills_always.mp4": 2}  # killed, retried once, killed again
    once = reports["killed_once.mp4"]
    assert once.error is None and once.frames == probe(once.target).frame_count == LONG
    assert reports["fine.mp4"].error is None and reports["fine.mp4"].target.is_file()
    always = reports["kills_always.mp4"]
    assert "died 2 times" in always.error and not always.target.exists()
    assert sorted(p.name for p in (out / "in").iterdir()) == ["fine.mp4", "killed_once.mp4"]
    assert not _partials(out)


@OWN_PROCESSES
@pytest.mark.slow
def test_cli_corrupt_input_is_listed_as_failed_and_the_others_finish(ray_cluster, tiny_model_path, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _clip(inputs, "good.mp4", SHORT, seed=30)
    (inputs / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    out = tmp_path / "out"
    args = ["anonymize", str(inputs), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu", "--no-audit",
            "--ray", "--workers", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "1 of 2 files failed" in err and "bad.mp4" in err, err  # the reasons, should another file fail
    assert sorted(p.name for p in (out / "in").iterdir()) == ["good.mp4"]
    assert probe(out / "in" / "good.mp4").frame_count == SHORT

    (inputs / "bad.mp4").unlink()
    cli.main(args)  # a rerun: nothing left to do, exit 0
    assert "skipped" in capsys.readouterr().err


@OWN_PROCESSES
@pytest.mark.slow
def test_sigterm_stops_the_actors_and_leaves_nothing_partial(ray_cluster, tiny_model_options, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        _clip(inputs, f"clip{i}.mp4", LONG, seed=40 + i)
    out = tmp_path / "out"

    def terminate_once_writing() -> None:
        deadline = time.monotonic() + 300
        while not _partials(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or Slurm would, to the driver

    threading.Thread(target=terminate_once_writing, daemon=True).start()
    job = AnonymizeJob(inputs=(inputs,), output=out, audit=None)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():  # Terminated; Ray's wait re-raises it as its base
        anonymize_on_ray(job, tiny_model_options, RayOptions(workers=2))
    assert not _partials(out), "nothing partial"
    # A file an actor finished in the moment before it was stopped is whole (its rename is the last step).
    assert all(probe(path).frame_count == LONG for path in out.rglob("*.mp4"))
    deadline = time.monotonic() + 30  # the actors are gone: their CPUs are free again
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == 2, "the actors were stopped"


def test_ray_goes_with_neither_shard_nor_without_its_extra(tmp_path, ntsc_clip, monkeypatch, capsys):
    base = ["anonymize", str(ntsc_clip), "-o", str(tmp_path / "out.mp4")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--ray", "auto", "--shard", "0/2"])
    assert exit_info.value.code == 2 and "--shard" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--workers", "2"])
    assert exit_info.value.code == 2 and "go with --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["anonymize", "--ray", str(ntsc_clip), str(tmp_path), "-o", str(tmp_path / "out")])  # --ray took an input
    assert exit_info.value.code == 2 and "--ray auto" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--ray"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "pip install 'deid[ray]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.mp4").exists()


def test_pool_size_follows_the_cluster_and_refuses_what_it_cannot_hold():
    assert _pool_size({"CPU": 16.0, "GPU": 4.0}, RayOptions(), files=100) == (4, 1.0)  # one actor per GPU
    assert _pool_size({"CPU": 16.0, "GPU": 4.0}, RayOptions(gpus_per_worker=0.5), files=100) == (8, 0.5)
    assert _pool_size({"CPU": 2.0}, RayOptions(), files=100) == (2, 0.0)  # no GPU: one actor per CPU
    assert _pool_size({"CPU": 8.0}, RayOptions(), files=3) == (3, 0.0)  # never more actors than files
    with pytest.raises(DeidError, match="needs 4 GPUs; the Ray cluster has 2"):
        _pool_size({"CPU": 8.0, "GPU": 2.0}, RayOptions(workers=4, gpus_per_worker=1), files=10)
    with pytest.raises(DeidError, match="needs a CPU each"):
        _pool_size({"CPU": 2.0}, RayOptions(workers=3), files=10)


class _FakeRay:
    """The part of `ray` a scheduler uses to read its calls: each ref is the name of a call's outcome ("done": it
    returned a report, "died": it failed with its worker)."""

    class exceptions:
        class RayActorError(Exception):
            pass

        class RayTaskError(Exception):
            pass

    def __init__(self, outcomes: dict[str, str]):
        self.outcomes = outcomes

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs), []

    def get(self, ref):
        if self.outcomes[ref] == "died":
            raise self.exceptions.RayActorError(ref)
        return ref


class _FakeActor:
    class ready:
        @staticmethod
        def remote():
            return "ping"


def _scheduler_with(outcomes: dict[str, str], read_first: str, folder: Path) -> tuple[_Scheduler, dict[str, _Pending]]:
    """A scheduler whose one actor held the calls `outcomes` names, in that order, as its worker died; the driver is
    about to read `read_first`'s failure. Each call's file has its own target in `folder`, handed out before."""
    (folder / "out").mkdir(parents=True, exist_ok=True)
    items = {name: _Pending(Task(folder / f"{name}.mp4", folder / "out" / f"{name}.mp4"), 1, 1) for name in outcomes}
    for item in items.values():
        item.handed_out()
    scheduler = _Scheduler.__new__(_Scheduler)
    scheduler.ray = _FakeRay(outcomes)
    scheduler.actors, scheduler.queues = [_FakeActor()], [deque(items)]
    scheduler.calls = {name: (0, item) for name, item in items.items() if name != read_first}
    scheduler.settled, scheduler.pings, scheduler.restarting = set(), {}, {}
    return scheduler, items


def test_a_death_is_charged_to_the_call_that_was_running_not_to_one_finished_but_unread(tmp_path):
    """One actor held three calls: the first returned its report an instant before the worker died running the
    second, and the third waited behind. Whichever failed call the driver reads first, the second is charged."""
    for read_first in ("running", "queued"):
        scheduler, items = _scheduler_with({"finished": "done", "running": "died", "queued": "died"}, read_first, tmp_path)
        scheduler._charge_death(0, read_first, items[read_first])
        assert {name: item.deaths for name, item in items.items()} == {"finished": 0, "running": 1, "queued": 0}
        assert scheduler.settled == {"running", "queued"} - {read_first}  # read later without a second charge
        assert scheduler.restarting and list(scheduler.pings.values()) == [0]  # asked when it is back


def test_a_file_written_before_its_worker_died_is_finished_not_charged(tmp_path):
    """The worker wrote the first file's output and died starting the second, before the first's report was sent:
    the second is charged, and the first is reported from its output, not run again."""
    scheduler, items = _scheduler_with({"written": "died", "running": "died"}, "written", tmp_path)
    make_crowd_clip(items["written"].task.target, seconds=1, fps=3, seed=0)  # the output the worker finished
    scheduler._charge_death(0, "written", items["written"])
    assert {name: item.deaths for name, item in items.items()} == {"written": 0, "running": 1}
    assert scheduler.settled == {"running"}

    # Its worker died between two files: nothing is charged, and the file is done, with what its output tells.
    scheduler, items = _scheduler_with({"written": "died"}, None, tmp_path / "again")
    make_crowd_clip(items["written"].task.target, seconds=1, fps=3, seed=0)
    pending = deque()
    task, result = scheduler._collect("written", pending)
    assert task == items["written"].task and not pending and items["written"].deaths == 0
    assert result.report.error is None and result.report.frames == 3 and "died just after" in result.report.notes[0]
