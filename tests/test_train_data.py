"""The training input pipeline (deid.train.data): worker processes decode ahead, yet the batches, their values
and the recorded data order are exactly those of reading each batch on the spot."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deid.dataset import GeneratedDataset, image_relpath
from deid.errors import DatasetError
from deid.nets.presets import TINY_MODEL_CONFIG
from deid.distributed import Dist
from deid.train.config import TrainConfig, Validation
from deid.train.data import TrainBatches
from deid.train.trainer import DataOrder, load_batch, train


def test_batches_equal_reading_on_the_spot_and_the_order_records_only_what_was_consumed(tiny_dataset):
    dataset = GeneratedDataset(tiny_dataset)
    consumed, reference = DataOrder(len(dataset), 5, seed=1, dist=Dist()), DataOrder(len(dataset), 5, seed=1, dist=Dist())
    with TrainBatches(dataset, consumed, torch.device("cpu"), workers=2, prefetch=3) as batches:
        for _ in range(7):  # 4 batches per 24-sample epoch: crosses an epoch boundary
            images, ws = batches.next()
            expected_images, expected_ws = load_batch(dataset, reference.next_indices(), torch.device("cpu"))
            assert torch.equal(images, expected_images) and torch.equal(ws, expected_ws)
            # the workers are batches ahead, but the run's order (what a checkpoint saves) is where training is
            assert consumed.state() == reference.state()
        assert batches.stats.batches == 7 and consumed.state()["epoch"] == 1
    resumed = DataOrder(len(dataset), 5, seed=1, dist=Dist())
    resumed.restore(consumed.state())
    with TrainBatches(dataset, resumed, torch.device("cpu"), workers=1) as batches:
        images, _ = batches.next()
    assert torch.equal(images, load_batch(dataset, reference.next_indices(), torch.device("cpu"))[0])


def test_an_unreadable_image_stops_training_with_one_line(tiny_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    dataset = GeneratedDataset(broken)
    order = DataOrder(len(dataset), 24, seed=0, dist=Dist())  # one batch holds every sample
    (broken / image_relpath(3)).write_bytes(b"not a png")
    with TrainBatches(dataset, order, torch.device("cpu"), workers=1) as batches:
        with pytest.raises(DatasetError) as caught:
            batches.next()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(broken / image_relpath(3))) and "--verify" in message


@pytest.mark.slow
def test_losses_are_logged_as_window_means(tiny_generator, tiny_dataset, tmp_path):
    """log_every=2 over 3 steps: entries after steps 1 (mean of 0-1) and 2 (the last step, a window of one)."""
    config = TrainConfig(data=tiny_dataset, out=tmp_path / "run", model=TINY_MODEL_CONFIG.for_generator(tiny_generator),
                         steps=3, batch_size=2, device="cpu", checkpoint_every=1000, sample_every=0, tensorboard=False,
                         log_every=2, validation=Validation(every=0))
    seen: dict[int, dict[str, float]] = {}
    train(config, on_step=lambda step, losses: seen.__setitem__(step, {k: float(v) for k, v in losses.items()}))
    entries = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert [(e["step"], e["steps"]) for e in entries] == [(1, 2), (2, 1)]
    assert entries[0]["identity"] == pytest.approx((seen[0]["identity"] + seen[1]["identity"]) / 2, rel=1e-6)
    assert entries[0]["reconstruction"] == pytest.approx(seen[1]["reconstruction"], rel=1e-6)  # step 0 is a cross step
    assert entries[1]["non_adversarial"] == pytest.approx(seen[2]["non_adversarial"], rel=1e-6)
    assert all(e["steps_per_second"] > 0 and 0 <= e["data_wait_fraction"] <= 1 for e in entries)
