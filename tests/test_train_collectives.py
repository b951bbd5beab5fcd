"""Multi-process training talks once per step: one all-reduce carries every gradient and the losses (and one
broadcast the BatchNorm statistics), yet ranks that saw different data end the step with identical weights."""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from deid.nets.encoders import LandmarkEncoder
from deid.nets.model import Disentangler, build_discriminator
from deid.nets.presets import TINY_GENERATOR_CONFIG, TINY_MODEL_CONFIG
from deid.distributed import Dist
from deid.stylegan.loading import load_generator
from deid.train.config import TrainConfig
from deid.train.trainer import Trainer


def _step_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    # A spawned process starts with torch's default thread pool: two ranks of it spinning on a 2-core machine
    # slowed this one step from seconds to many minutes (seen in CI). One thread per rank, as conftest does.
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = {"all_reduce": 0, "broadcast": 0}
    for name in calls:
        real = getattr(tdist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        setattr(tdist, name, counted)
    try:
        G = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)
        config = TrainConfig(data=None, out=None, model=TINY_MODEL_CONFIG.for_generator(G), batch_size=2)
        trainer = Trainer(config, Disentangler(config.model, G), LandmarkEncoder(config.model.landmarks),
                          build_discriminator(config.model, G.w_dim), Dist(rank=rank, world=world))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        images, w = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, G.w_dim, generator=g)
        losses = trainer.step(0, images, images.flip(0), w)  # step 0: cross pair and adversarial: all three updates
        torch.save({"calls": calls, "losses": {k: v.clone() for k, v in losses.items()},
                    "params": [p.detach().clone() for p in trainer.g_params + trainer.d_params]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_one_all_reduce_per_step_and_ranks_stay_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.spawn(_step_rank, args=(2, port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # a hung rank fails this test instead of stalling the whole run
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            raise AssertionError("the two training ranks did not finish one step within 300 s")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for rank in (a, b):
        assert rank["calls"]["all_reduce"] == 1
        assert rank["calls"]["broadcast"] <= 1  # BatchNorm statistics, while E_attr's BatchNorm trains
    assert {"adversarial", "discriminator", "r1"} <= set(a["losses"])
    for key in a["losses"]:  # averaged over ranks: the same on both
        assert torch.equal(a["losses"][key], b["losses"][key]), key
    assert len(a["params"]) == len(b["params"]) > 0
    for pa, pb in zip(a["params"], b["params"]):  # every gradient was averaged: the same update everywhere
        assert torch.equal(pa, pb)
