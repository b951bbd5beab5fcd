"""The training input pipeline (deid.train.data): worker processes decode ahead, yet the batches, their values
and the recorded data order are exactly those of reading each batch on the spot."""

from __future__ import annotations

import shutil

import pytest
import torch

from deid.dataset import GeneratedDataset, image_relpath
from deid.errors import DatasetError
from deid.runtime import Dist
from deid.train.data import TrainBatches
from deid.train.trainer import DataOrder, load_batch


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
