"""Multi-process training, as two gloo ranks run the real loop (`train`, hence `_loop`):

* each step talks once: one all-reduce carries every gradient, the losses and the stop vote, and with E_attr's
  BatchNorm in inference mode nothing is broadcast; the ranks, fed different data, end with identical weights;
* Ctrl-C on one rank stops both after the same step, with one checkpoint;
* when rank 0 cannot write (a full disk) a log line, a sample grid or a best checkpoint, rank 1 stops at once
  with rank 0's message instead of waiting in its next collective until the process group's timeout.

Both tests read the files of one spawn of the two ranks (the `scenario_dirs` fixture): a rank's start costs
seconds of imports and a rendezvous."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from deid.nets.model import Disentangler
from deid.nets.presets import TINY_GENERATOR_CONFIG, TINY_MODEL_CONFIG
from deid.stylegan.loading import load_generator
from deid.train import trainer as trainer_module
from deid.train.config import TrainConfig, Validation
from deid.train.trainer import RunLog, Trainer, train
from tests.ranks import OWN_PROCESSES, free_port, spawn_ranks

pytestmark = [pytest.mark.slow, OWN_PROCESSES]

WORLD = 2
GROUP_TIMEOUT_S = 120  # a rank left waiting in a collective fails after this, not gloo's default 30 minutes
SPAWN_TIMEOUT_S = 600  # two ranks running five tiny trainings: about a minute alone, minutes on a shared 2-core CI


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    generator = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)
    kw = {"steps": 4, "batch_size": 2, "device": "cpu", "checkpoint_every": 1000, "sample_every": 0, "log_every": 2,
          "tensorboard": False, "data_workers": 0, "validation": Validation(every=0), **kw}
    return TrainConfig(data=data, out=out, model=TINY_MODEL_CONFIG.for_generator(generator), **kw)


def _join(rank: int, port: int) -> None:
    """Join the 2-rank group as torchrun would have it (init_distributed then finds it started)."""
    # A spawned process starts with torch's default thread pool: two ranks of it spinning on a 2-core machine
    # slowed one step from seconds to many minutes (seen in CI). One thread per rank, as conftest does.
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                             timeout=timedelta(seconds=GROUP_TIMEOUT_S))


def _count_collectives() -> dict[str, int]:
    """Wrap the collectives the trainer calls (`tdist.all_reduce`, `tdist.broadcast`) with counters."""
    calls = {"all_reduce": 0, "broadcast": 0}
    for name in calls:
        real = getattr(tdist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        setattr(tdist, name, counted)
    return calls


# ------------------------------------------------------------------------------------- collectives


def _loop_rank(rank: int, data: str, out_dir: str) -> None:
    """Two runs (4 steps; 6 steps with Ctrl-C on rank 1), counting the collectives of each step. Writes rankR.pt."""
    real_collectives, real_step = (tdist.all_reduce, tdist.broadcast), Trainer.step
    try:
        calls = _count_collectives()
        per_step, losses, seen = [], [], {}

        def keep_trainer(self, *args, **kwargs):
            seen["trainer"] = self
            return real_step(self, *args, **kwargs)

        Trainer.step = keep_trainer
        before = dict(calls)

        def on_step(step, step_losses):
            per_step.append({k: calls[k] - before[k] for k in calls})
            before.update(calls)
            losses.append({k: float(v) for k, v in step_losses.items()})

        # Each rank shuffles the dataset with the same seed but draws its own shard of every global batch.
        train(_config(Path(data), Path(out_dir) / "run"), on_step=on_step)
        trainer = seen["trainer"]
        result = {"per_step": per_step, "losses": losses,
                  "params": [p.detach().clone() for p in trainer.g_params + trainer.d_params]}

        # Ctrl-C on rank 1 during step 0: its vote reaches rank 0 in a later step's all-reduce, and both stop
        # after the same step (the first log boundary), each with the same TrainingInterrupted.
        def ctrl_c_on_rank_1(step, step_losses):
            if rank == 1 and step == 0:
                os.kill(os.getpid(), signal.SIGINT)

        try:
            train(_config(Path(data), Path(out_dir) / "stopped", steps=6), on_step=ctrl_c_on_rank_1)
            result["stopped"] = "finished"
        except trainer_module.TrainingInterrupted as exc:
            result["stopped"] = str(exc)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        (tdist.all_reduce, tdist.broadcast), Trainer.step = real_collectives, real_step


def _both_scenarios(rank: int, port: int, data: str, loop_dir: str, failing_dir: str) -> None:
    """One process group for both tests' scenarios: each rank's start (imports, rendezvous) costs seconds."""
    _join(rank, port)
    try:
        _failing_rank(rank, data, failing_dir)
        _loop_rank(rank, data, loop_dir)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def scenario_dirs(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """{"loop": folder of _loop_rank's files, "failing": folder of _failing_rank's}, from one spawn of two ranks."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("loop", "failing")}
    spawn_ranks(_both_scenarios, (free_port(), str(tiny_dataset), str(dirs["loop"]), str(dirs["failing"])),
                timeout=SPAWN_TIMEOUT_S)
    return dirs


def test_the_loop_talks_once_per_step_and_ranks_stay_identical(scenario_dirs):
    tmp_path = scenario_dirs["loop"]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for rank in (a, b):
        # one all-reduce per step (gradients, losses and the stop vote); no broadcast: E_attr's BatchNorm is
        # in inference mode, its statistics never change
        assert rank["per_step"] == [{"all_reduce": 1, "broadcast": 0}] * 4
    assert {"adversarial", "discriminator", "r1"} <= set(a["losses"][0])
    assert a["losses"] == b["losses"]  # averaged over ranks: the same on both
    assert len(a["params"]) == len(b["params"]) > 0
    for pa, pb in zip(a["params"], b["params"]):  # every gradient was averaged: the same update everywhere
        assert torch.equal(pa, pb)
    assert a["stopped"] == b["stopped"] and "interrupted after step 2" in a["stopped"]
    checkpoints = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").glob("step-*[0-9].safetensors"))
    assert checkpoints == ["step-00000002.safetensors"]


# ------------------------------------------------------------------------------------ rank 0 failures

DISK_FULL = "No space left on device"


def _disk_full(*args, **kwargs):
    raise OSError(28, DISK_FULL)


def _failing_rank(rank: int, data: str, out_dir: str) -> None:
    """Three runs; in each, one of rank 0's writes fails at its first chance (after step 0, or the validation
    before it). Reports each rank's exception and when it came in rankR.json."""
    real_save = Disentangler.save

    def best_checkpoint_fails(self, path, *args, **kwargs):
        if Path(path).name.startswith("best-"):
            _disk_full()
        return real_save(self, path, *args, **kwargs)

    cases = {
        "log line": (lambda: setattr(RunLog, "write", _disk_full), {"log_every": 1}),
        "sample grid": (lambda: setattr(trainer_module, "save_sample_grid", _disk_full), {"sample_every": 1}),
        "best checkpoint": (lambda: setattr(Disentangler, "save", best_checkpoint_fails),
                            {"validation": Validation(every=2, batches=1, holdout=4)}),
    }
    reports = {}
    for name, (break_rank_0, options) in cases.items():
        saved = (RunLog.write, trainer_module.save_sample_grid, Disentangler.save)
        if rank == 0:
            break_rank_0()
        tdist.barrier()  # both ranks start each run together: the times below compare
        try:
            train(_config(Path(data), Path(out_dir) / name.replace(" ", "-"), **options))
            reports[name] = ("finished", "", time.monotonic())
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            reports[name] = (type(exc).__name__, str(exc), time.monotonic())
        RunLog.write, trainer_module.save_sample_grid, Disentangler.save = saved
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(reports))


def test_when_rank_0_cannot_write_every_rank_stops_at_once_with_its_message(scenario_dirs):
    tmp_path = scenario_dirs["failing"]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert set(rank0) == {"log line", "sample grid", "best checkpoint"}
    for case in rank0:
        kind0, message0, at0 = rank0[case]
        kind1, message1, at1 = rank1[case]
        assert (kind0, kind1) == ("OSError", "RankFailed"), case
        assert DISK_FULL in message0 and message1 == f"rank 0 failed: OSError: {message0}", case
        assert abs(at1 - at0) < GROUP_TIMEOUT_S / 4, case  # seconds apart, not a collective's timeout
