"""`deid anonymize --ray`: one batch spread over the actors of a Ray cluster.

The driver (this process) expands and checks the inputs as a local run does, drops finished targets, sizes each file
(frames x pixels) and hands the largest first to the least loaded of a pool of actors, at most `QUEUE_PER_WORKER` per
actor. Each actor (`AnonymizeWorker`) loads the model, detector and auditor once, then runs `Anonymizer.run` for each
file and returns its `FileReport`. Files never travel through Ray: inputs and outputs are paths on a filesystem every
node sees, written through `atomic_output` as in a local run.

A worker that dies (killed, out of memory, a lost node) is restarted by Ray; the driver charges the death to the file
that was running on it (an actor runs its calls in order: the oldest of its calls that neither returned nor wrote its
output), cleans up what it left half-written and tries the file again, up to `RayOptions.retries` times. The files
that were only queued behind it are handed out again without a charge; a file whose output was written but whose
report died with the worker is finished, reported from its output. A `DeidError` inside a file (a corrupt input) is
that file's report, never a retry.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import torch
from PIL import Image

from deid.atomic import is_partial, remove_stale_partials
from deid.console import progress, set_quiet, warn
from deid.devices import Precision, resolve_device, resolve_precision
from deid.distributed import rank_device
from deid.errors import DeidError
from deid.evaluation.audit import audit_path
from deid.media.video import probe
from deid.nets.model import load_model
from deid.pipelines.anonymize import AnonymizeJob, Anonymizer, FileReport, print_summary, raise_failures
from deid.pipelines.inputs import Task, preview_path
from deid.weights import weights_home

QUEUE_PER_WORKER = 2  # calls handed to one actor at a time: the next file is there when one finishes
RESTART_TIMEOUT_S = 600.0  # an actor not back this long after its worker died is left out of the pool
PING_EVERY_S = 0.5  # how often a restarting actor is asked whether it is back
DEATH_SETTLE_S = 10.0  # after a worker died, how long its other calls are given to resolve (they fail at once)
RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'deid[ray]' (or pip install ray)."


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: Ray on this machine (RAY_ADDRESS, else a new local instance); "auto": the
    #                             cluster `ray start` made; else a cluster's address (HOST:PORT, ray://HOST:PORT)
    workers: int | None = None  # actors; None: the cluster's GPUs / gpus_per_worker, or its CPUs without GPUs
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    retries: int = 2  # times a file whose worker died is tried again before it is reported as failed


@dataclass(frozen=True)
class ModelOptions:
    """What a worker loads its model from: the `--model`, `--device` and `--precision` of the command (the model
    object itself never travels; each actor loads it from a path every node sees, or from the registry in
    DEID_HOME)."""

    model: str
    device: str = "auto"
    precision: str = "auto"

    def load(self, engine: str = "generate") -> tuple[torch.nn.Module | None, torch.device, Precision]:
        """(model, device, precision): the one way a command gets its trained model (the CLI's and each Ray actor's). Under
        torchrun `auto` is the rank's own GPU; the covering engines run no model, so none is loaded for them."""
        device = resolve_device(rank_device(self.device))
        model = load_model(self.model, device=device) if engine == "generate" else None
        return model, device, resolve_precision(self.precision, device)


@dataclass(frozen=True)
class WorkerStamp:
    """Which actor process ran a file, when (time.time() on its node), and how many times that process has built its
    Anonymizer (once, unless a bug)."""

    node: str
    pid: int
    models_built: int
    started: float
    finished: float


@dataclass
class RayResult:
    report: FileReport
    worker: WorkerStamp | None = None  # None: not run (skipped, or failed with no worker left to blame)


_models_built = 0  # per worker process: how often an AnonymizeWorker built its models here


class AnonymizeWorker:
    """The actor: an `Anonymizer` built once, then one file per call. Wrapped by `ray.remote` in the driver.

    A failure while building (a model that does not resolve on this node) is kept and raised by every call, so that
    the driver stops with its message instead of Ray restarting the actor forever."""

    def __init__(self, job: AnonymizeJob, model: ModelOptions, threads: int):
        global _models_built
        set_quiet(True)  # the driver shows progress and the summary; warnings here would interleave with them
        torch.set_num_threads(threads)  # the CPUs Ray gave the actor, for torch and OpenCV alike
        cv2.setNumThreads(threads)
        self.error: Exception | None = None
        try:
            self.anonymizer = Anonymizer(job, *model.load(job.engine))
            _models_built += 1
        except Exception as exc:  # noqa: BLE001 - raised again by every call, in the driver
            self.error = exc

    def ready(self) -> bool:
        """Answers once the actor is up (after a restart: once it has loaded its models again)."""
        return True

    def run(self, task: Task) -> tuple[FileReport, WorkerStamp]:
        if self.error is not None:
            raise self.error
        started = time.time()
        report = self.anonymizer.run(task, _NoProgress(), batch=True, shared_tree=True)
        return report, WorkerStamp(socket.gethostname(), os.getpid(), _models_built, started, time.time())


class _NoProgress:
    """The progress bar `Anonymizer.run` updates, inside a worker (the driver counts files and frames)."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass


@dataclass
class _Pending:
    task: Task
    size: int  # frames x pixels: what the scheduler balances
    frames: int
    deaths: int = 0  # times a worker died while running it
    target_before: tuple[int, int] | None = None  # the target's (inode, mtime) when last handed out (None: absent)

    def handed_out(self) -> None:
        self.target_before = _file_stamp(self.task.target)

    def written(self) -> bool:
        """Whether its output appeared (or was replaced: the atomic rename brings a new inode) since it was handed out:
        the file is finished, even when its report went down with a worker that died just after."""
        now = _file_stamp(self.task.target)
        return now is not None and now != self.target_before


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def import_ray():
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DeidError(RAY_MISSING) from None
    return ray


def run_anonymize_on_ray(job: AnonymizeJob, model: ModelOptions, options: RayOptions) -> list[RayResult]:
    """`deid anonymize --ray`: anonymize every input on the cluster, print the summary as a local run does, and end in
    one error naming the failed files (exit 1) when there are any."""
    results = anonymize_on_ray(job, model, options)
    reports = [result.report for result in results]
    print_summary(reports, job)
    raise_failures(reports)
    return results


def anonymize_on_ray(job: AnonymizeJob, model: ModelOptions, options: RayOptions) -> list[RayResult]:
    """Anonymize every input of the job on a Ray cluster; one result per input, in the order of `job.check()`.

    Uses the Ray connection this process already has, else connects (or starts Ray here) and disconnects at the end."""
    if job.shard:
        raise DeidError("--ray and --shard do not go together: Ray hands out the files itself. Drop --shard.")
    ray = import_ray()
    tasks = job.check()
    results = {task: RayResult(FileReport(task.source, task.target, skipped=True))
               for task in tasks if task.target.exists() and not job.overwrite}
    todo = sorted((_sized(task) for task in tasks if task not in results), key=lambda p: p.size, reverse=True)
    if todo:
        with _connected(ray, options.address):
            workers, gpus = _pool_size(ray.cluster_resources(), options, len(todo))
            results.update(_Scheduler(ray, job, model, workers, gpus, options.retries).run(todo))
    return [results[task] for task in tasks]


def _sized(task: Task) -> _Pending:
    """A task with its work: frames x pixels from the probe (an image: one frame). A file that cannot be read gets
    size 0: it goes last, and its worker reports why it failed."""
    try:
        if task.is_image:
            with Image.open(task.source) as image:
                return _Pending(task, image.width * image.height, 1)
        video = probe(task.source)
        return _Pending(task, video.frame_count * video.width * video.height, video.frame_count)
    except (DeidError, OSError, ValueError):
        return _Pending(task, 0, 0)


@contextlib.contextmanager
def _connected(ray, address: str | None) -> Iterator[None]:
    """Within the block, this process is connected to Ray (its own connection, if it has one, is kept open)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # a Ray started here sends no usage statistics
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise DeidError(f"--ray {address or ''}: cannot connect to Ray ({str(exc).splitlines()[0][:200]}). Start it with "
                        "`ray start --head` (and `ray start --address HEAD:6379` on the other nodes), or drop the "
                        "address to start Ray on this machine.") from None
    try:
        yield
    finally:
        ray.shutdown()


def _pool_size(resources: dict, options: RayOptions, files: int) -> tuple[int, float]:
    """(actors, GPUs per actor) for the cluster's resources; refuses a pool the cluster cannot hold (its actors would
    wait for resources forever)."""
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    per_worker = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    workers = options.workers or (int(gpus // per_worker) if per_worker else cpus)
    if per_worker and workers * per_worker > gpus:
        raise DeidError(f"--workers {workers} x --gpus-per-worker {per_worker:g} needs {workers * per_worker:g} GPUs; the "
                        f"Ray cluster has {gpus:g}. Use fewer workers or add nodes.")
    if workers > cpus:
        raise DeidError(f"--workers {workers} needs a CPU each; the Ray cluster has {cpus}. Use fewer workers or add nodes.")
    if workers < 1:
        raise DeidError("the Ray cluster has no CPU for a worker. Check `ray status`.")
    return min(workers, files), per_worker


def _worker_env() -> dict[str, str]:
    """Workers run offline on the cache the user names: no worker downloads anything on its own."""
    return {"DEID_OFFLINE": "1", "DEID_HOME": str(weights_home()), "RAY_USAGE_STATS_ENABLED": "0"}


class _Scheduler:
    """Hands the files (largest first) to the actor with the least work queued, at most QUEUE_PER_WORKER each; collects
    the reports as they finish; retries files whose worker died."""

    def __init__(self, ray, job: AnonymizeJob, model: ModelOptions, workers: int, gpus: float, retries: int):
        self.ray, self.job, self.retries = ray, job, retries
        actor = ray.remote(AnonymizeWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=-1, max_task_retries=0,
                                                    runtime_env={"env_vars": _worker_env()})
        self.actors = [actor.remote(job, model, 1) for _ in range(workers)]
        self.queues: list[deque] = [deque() for _ in self.actors]  # per actor: its calls' refs, oldest first
        self.calls: dict = {}  # ref -> (actor index, _Pending)
        self.settled: set = set()  # refs queued behind a file that killed their worker: already accounted for
        self.pings: dict = {}  # ref of `ready()` -> actor index: a restarting actor gets no file until it answers
        self.restarting: dict[int, float] = {}  # actor index -> when its worker died
        self.due: list[tuple[float, int]] = []  # (when, actor index): ask again whether it is back
        self.lost: set[int] = set()  # actors that did not come back: left out

    def run(self, todo: list[_Pending]) -> dict[Task, RayResult]:
        pending, results = deque(todo), {}
        with progress() as bar:
            files = bar.add_task("files", total=len(todo))
            frames = bar.add_task("frames", total=sum(p.frames for p in todo))
            try:
                while pending or self.calls:
                    self._hand_out(pending)
                    ref = self._next_answer()
                    if ref is None or ref in self.pings:
                        if ref is not None:
                            self._check_restarted(ref)
                        continue
                    finished = self._collect(ref, pending)
                    if finished is not None:
                        results[finished[0]] = finished[1]
                        bar.update(files, advance=1)
                        bar.update(frames, advance=finished[1].report.frames)
            finally:
                self._stop()
        return results

    def _hand_out(self, pending: deque) -> None:
        """Give the next files to the actor with the least work queued while it has room (longest processing time
        first: a long file is started early, and the short ones go to the other actors meanwhile)."""
        while pending:
            up = [i for i in range(len(self.actors)) if i not in self.restarting and i not in self.lost]
            if not up:
                return
            index = min(up, key=lambda i: sum(self.calls[r][1].size for r in self.queues[i]))
            if len(self.queues[index]) >= QUEUE_PER_WORKER:
                return
            item = pending.popleft()
            item.handed_out()
            ref = self.actors[index].run.remote(item.task)
            self.queues[index].append(ref)
            self.calls[ref] = (index, item)

    def _collect(self, ref, pending: deque) -> tuple[Task, RayResult] | None:
        """The finished call's (task, result); None when its file goes back to `pending` (its worker died)."""
        index, item = self.calls.pop(ref)
        queue = self.queues[index]
        try:
            report, stamp = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            if ref in self.settled:  # its worker's death is already charged to the file that was running
                self.settled.discard(ref)
            else:  # the first call seen failing from this death
                self._charge_death(index, ref, item)
            queue.remove(ref)
            if item.written():  # finished, and its worker died before the report reached here
                return item.task, RayResult(_report_of_output(item))
            return self._after_death(item, pending)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            raise (cause if isinstance(cause, DeidError) else exc) from None  # a local run stops on these too
        queue.remove(ref)
        if report.error:
            warn(f"{item.task.source}: failed; going on with the other files.")
        return item.task, RayResult(report, stamp)

    def _charge_death(self, index: int, ref, item: _Pending) -> None:
        """Charge a worker's death to the file it was running; the calls queued behind it are settled (they go back
        without a charge) and the actor is asked when it is back.

        The running call is the oldest one on the actor that did not finish. Not simply the oldest one the driver has
        not collected yet: a call may have finished in the instant before the death, its report not yet read here, or
        lost (a worker killed as it starts the next file may not have sent it). So every call on the actor is first
        let resolve (after a death they all do at once), and a call whose output was written counts as finished.
        A worker that died between two files charges none."""
        queue = self.queues[index]
        self.ray.wait(list(queue), num_returns=len(queue), timeout=DEATH_SETTLE_S)
        items = {r: item if r == ref else self.calls[r][1] for r in queue}
        returned = {r for r in queue if r != ref and self._finished(r)}  # collected as usual later
        running = next((r for r in queue if r not in returned and not items[r].written()), None)
        if running is not None:
            items[running].deaths += 1
        self.settled.update(r for r in queue if r != ref and r not in returned)
        self._ping(index)

    def _finished(self, ref) -> bool:
        """Whether a call has returned a report (rather than failed with its worker, or not answered yet)."""
        if not self.ray.wait([ref], timeout=0)[0]:
            return False
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            return False
        except self.ray.exceptions.RayTaskError:
            return True  # an error inside the file: it ran to its end, and `_collect` raises it
        return True

    def _next_answer(self):
        """The next finished call or ping (None when it is time to ask a restarting actor again)."""
        now = time.monotonic()
        for when, index in [d for d in self.due if d[0] <= now]:
            self.due.remove((when, index))
            self._ping(index)
        refs = [*self.calls, *self.pings]
        timeout = max(0.0, min(when for when, _ in self.due) - now) if self.due else None
        if not refs:
            time.sleep(timeout or 0.0)
            return None
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        return ready[0] if ready else None

    def _ping(self, index: int) -> None:
        """Ask a restarting actor whether it is back. It gets no file until it is: a call made while Ray restarts it
        fails at once (and would count as a death of the file it carried)."""
        self.restarting.setdefault(index, time.monotonic())
        self.pings[self.actors[index].ready.remote()] = index

    def _check_restarted(self, ref) -> None:
        """A restarting actor answered: back, it takes files again; still restarting, ask again shortly; not back after
        RESTART_TIMEOUT_S, it is left out (the run fails when none is left)."""
        index = self.pings.pop(ref)
        try:
            self.ray.get(ref)
            del self.restarting[index]
            return
        except self.ray.exceptions.RayActorError:
            pass
        if time.monotonic() - self.restarting[index] < RESTART_TIMEOUT_S:
            self.due.append((time.monotonic() + PING_EVERY_S, index))
            return
        self.lost.add(index)
        if len(self.lost) == len(self.actors):
            raise DeidError(f"no Ray worker came back within {RESTART_TIMEOUT_S:.0f} s of dying (out of memory? a lost "
                            "node?). See `ray status` and the Ray logs, fix it and run again: finished files are skipped.")

    def _after_death(self, item: _Pending, pending: deque) -> tuple[Task, RayResult] | None:
        """Clean up what the dead worker left of this file; try it again, or report it failed after `retries` deaths."""
        remove_leftovers(item.task)
        if item.deaths <= self.retries:
            if item.deaths:
                warn(f"{item.task.source}: its worker died; trying again ({item.deaths} of {self.retries} retries).")
            pending.appendleft(item)
            return None
        reason = (f"{item.task.source}: its worker died {item.deaths} times while anonymizing it (killed, out of memory, "
                  "a crash in a library?); no output was written. Try it alone without --ray to see why.")
        warn(f"{item.task.source}: failed; going on with the other files.")
        return item.task, RayResult(FileReport(item.task.source, item.task.target, error=reason))

    def _stop(self) -> None:
        """End every actor (done, an error or Ctrl-C/SIGTERM here) and remove what the files they were writing left."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        if self.calls:
            self.ray.wait(list(self.calls), num_returns=len(self.calls), timeout=30)  # the processes are gone
            for _, item in self.calls.values():
                remove_leftovers(item.task)


def _report_of_output(item: _Pending) -> FileReport:
    """The report of a file whose worker died right after writing it: what the output itself tells (its frames), and a
    note that the rest was lost."""
    task = item.task
    report = FileReport(task.source, task.target, frames=1 if task.is_image else probe(task.target).frame_count)
    report.notes.append("its Ray worker died just after writing it: the output is whole, its face counts and "
                        "audit totals were lost with the worker (OUTPUT.audit.json has the audit)")
    return report


def remove_leftovers(task: Task, wait_s: float = 10.0) -> None:
    """Remove the temporary files a killed worker left for this task's outputs (the output, its audit and preview),
    waiting up to `wait_s` for the dead process to release them (its lock goes with it)."""
    outputs = (task.target, audit_path(task.target), preview_path(task.target, task.target.suffix if task.is_image else ".mp4"))
    deadline = time.monotonic() + wait_s
    while True:
        for path in outputs:
            remove_stale_partials(path, min_age_s=0)
        left = [p for path in outputs for p in path.parent.glob(f".{glob.escape(path.stem)}.*.partial{glob.escape(path.suffix)}")
                if is_partial(p)]
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.2)
