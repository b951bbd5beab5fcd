"""Validation during training (deid.train.validation): the held-out split, the official test() numbers in
losses.jsonl, the best checkpoints and `RUN:best-identity`, early stopping, and resume keeping the split."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from deid.errors import DatasetError, WeightsError
from deid.nets.model import load_model, read_checkpoint
from deid.nets.presets import TINY_MODEL_CONFIG
from deid.runs import best_checkpoint_path, named_checkpoint
from deid.distributed import Dist
from deid.train import validation as validation_module
from deid.train.config import TrainConfig, Validation
from deid.train.trainer import TrainingInterrupted, train
from deid.train.validation import ValidationState, Validator, holdout_count, validation_batches
from deid.weights import import_file
from tests.ranks import OWN_PROCESSES, free_port, spawn_ranks

METRICS = {"id_to_pred", "id_to_attr", "attr_to_pred", "score", "landmarks", "reconstruction_mse",
           "reconstruction_psnr", "reconstruction_identity"}


def _config(tiny_generator, data, out, **kw) -> TrainConfig:
    kw = {"steps": 4, "batch_size": 2, "device": "cpu", "checkpoint_every": 1000, "sample_every": 0,
          "tensorboard": False, "validation": Validation(every=2, batches=2, holdout=4), **kw}
    return TrainConfig(data=data, out=out, model=TINY_MODEL_CONFIG.for_generator(tiny_generator), **kw)


# One batch of held-out pairs per validation: enough for runs that check the log, the bests and resume (measure's
# averaging over batches has its own tests below).
ONE_BATCH = Validation(every=2, batches=1, holdout=4)


def _validations(run):
    lines = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    return [(e["step"], e["validation"]) for e in lines if "validation" in e]


def test_holdout_and_fixed_cross_identity_batches():
    assert holdout_count(Validation(holdout=0.01), 70_000) == 700
    assert holdout_count(Validation(holdout=5), 100) == 5
    assert holdout_count(Validation(holdout=0.01), 24) == 2  # at least one cross pair
    assert holdout_count(Validation(every=0, holdout=0.5), 100) == 0  # validation off: nothing held out
    pairs = validation_batches(first=20, holdout=4, batches=30, batch_size=3, seed=1)
    assert pairs == validation_batches(first=20, holdout=4, batches=30, batch_size=3, seed=1)
    for ids, attrs in pairs:
        assert all(20 <= i < 24 and 20 <= a < 24 and i != a for i, a in zip(ids, attrs))
    assert {i for ids, _ in pairs for i in ids} == {20, 21, 22, 23}


@pytest.mark.slow
def test_validation_logs_the_official_numbers_writes_loadable_bests_and_resume_keeps_the_split(
        tiny_generator, tiny_dataset, tmp_path):
    full = tmp_path / "full"
    train(_config(tiny_generator, tiny_dataset, full, steps=3, validation=ONE_BATCH))
    seen = _validations(full)
    # before the first step, every 2, and the final model after the last step, which is off that schedule
    assert [step for step, _ in seen] == [0, 2, 3]
    for _, metrics in seen:
        assert set(metrics) == METRICS and all(math.isfinite(v) for v in metrics.values())
        assert metrics["score"] == pytest.approx(metrics["id_to_pred"] - metrics["attr_to_pred"])
        assert -1 <= metrics["id_to_pred"] <= 1 and metrics["landmarks"] >= 0
        assert metrics["reconstruction_psnr"] == pytest.approx(10 * math.log10(1 / metrics["reconstruction_mse"]), rel=0.2)
    assert json.loads((full / "config.json").read_text())["validation"]["holdout"] == 4
    # the best checkpoints hold the step of the best numbers and load by name
    best_id = max(seen, key=lambda s: s[1]["id_to_pred"])[0]
    best_lnd = min(seen, key=lambda s: s[1]["landmarks"])[0]
    for kind, step in (("best-identity", best_id), ("best-landmarks", best_lnd)):
        header, _ = read_checkpoint(best_checkpoint_path(full, kind))
        assert header["step"] == step
        model = load_model(f"{full}:{kind}", generator=tiny_generator)
        assert model.step == step
    imported = import_file("deid-ffhq256", f"{full}:best-landmarks")  # `deid weights import deid-ffhq256 RUN:best-...`
    assert imported.read_bytes() == best_checkpoint_path(full, "best-landmarks").read_bytes()
    # interrupted after step 1 and resumed with another --holdout: the recorded split (4) is kept, so
    # weights and validation numbers equal the uninterrupted run's
    cut = tmp_path / "cut"

    def ctrl_c_at_step_1(step, losses):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(_config(tiny_generator, tiny_dataset, cut, steps=3, validation=ONE_BATCH), on_step=ctrl_c_at_step_1)
    resumed = train(_config(tiny_generator, tiny_dataset, cut, resume=True, steps=3,
                            validation=Validation(every=2, batches=1, holdout=8)))
    assert json.loads((cut / "config.json").read_text())["validation"]["holdout"] == 4
    a, b = load_file(str(full / "checkpoints" / "step-00000003.safetensors")), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _validations(cut) == seen


@pytest.mark.slow
def test_validation_numbers_equal_a_hand_computation_of_the_official_test(tiny_model):
    """Every number of `measure`, recomputed here per sample in float64 from the networks themselves (not the
    Disentangler's helpers): cosines of E_id codes on the output clipped to [-1, 1], the mean of per-sample
    landmark MSEs over points 17-67 in 160-pixel units, per-image MSE and PSNR on [0, 1], each averaged over
    samples."""
    import torch.nn.functional as F

    from deid.nets.encoders import LandmarkEncoder
    from deid.train.validation import measure

    m = tiny_model
    landmarks = LandmarkEncoder(TINY_MODEL_CONFIG.landmarks)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    pairs = validation_batches(0, 6, batches=3, batch_size=2, seed=4)
    got = measure(m, landmarks, pairs, lambda i: images[i], Dist(), torch.float32, 160)

    def output(identity_image, attribute_image):
        code = torch.cat([m.identity_encoder(identity_image), m.attribute_encoder(attribute_image)], dim=1)
        return m.generator.synthesis(m.mapper(code), noise_mode="const").clamp(-1, 1)

    rows = []
    with torch.no_grad():
        for ids, attrs in pairs:
            for i, a in zip(ids, attrs):
                I_id, I_attr = images[i:i + 1], images[a:a + 1]  # noqa: N806
                pred, recon = output(I_id, I_attr), output(I_id, I_id)
                e = {k: m.identity_encoder(x).double() for k, x in (("id", I_id), ("attr", I_attr), ("pred", pred),
                                                                      ("recon", recon))}
                cos = lambda x, y: float(F.cosine_similarity(e[x], e[y]))  # noqa: E731
                lnd = ((landmarks(I_attr) - landmarks(pred)).double()[0, 17:68] * (160 / 32)) ** 2
                mse = float((((recon.double() + 1) / 2 - (I_id.double() + 1) / 2) ** 2).mean())
                rows.append({"id_to_pred": cos("id", "pred"), "id_to_attr": cos("id", "attr"),
                             "attr_to_pred": cos("attr", "pred"), "landmarks": float(lnd.mean()),
                             "reconstruction_mse": mse, "reconstruction_psnr": 10 * math.log10(1 / mse),
                             "reconstruction_identity": cos("id", "recon")})
    assert len(rows) == 6
    expected = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    expected["score"] = expected["id_to_pred"] - expected["attr_to_pred"]
    assert set(got) == set(expected) == METRICS
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_validator_keeps_bests_and_stops_after_n_tests_without_one(tiny_model, tmp_path, monkeypatch):
    script = iter([(0.5, 10.0), (0.6, 12.0), (0.55, 9.0), (0.55, 11.0), (0.4, 20.0)])

    def fake_measure(*args, **kwargs):
        id_to_pred, lnd = next(script)
        return {"id_to_pred": id_to_pred, "landmarks": lnd, "score": 0.0, "id_to_attr": 0.0, "attr_to_pred": 0.0,
                "reconstruction_mse": 0.1, "reconstruction_psnr": 10.0, "reconstruction_identity": 0.0}

    monkeypatch.setattr(validation_module, "measure", fake_measure)
    validator = Validator(Validation(every=10, early_stop=2), tmp_path, tiny_model, None, [], None, Dist(),
                          torch.float32, 160)
    stops = [validator.run(step) for step in (0, 10, 20, 30, 40)]
    assert stops == [False, False, False, False, True]
    s = validator.state
    assert (s.best_identity, s.best_identity_step, s.best_landmarks, s.best_landmarks_step, s.not_improved) == (
        0.6, 10, 9.0, 20, 2)
    assert read_checkpoint(best_checkpoint_path(tmp_path, "best-identity"))[0]["step"] == 10
    assert read_checkpoint(best_checkpoint_path(tmp_path, "best-landmarks"))[0]["step"] == 20
    assert ValidationState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert ValidationState.from_dict(ValidationState().to_dict()) == ValidationState()


@pytest.mark.slow
def test_early_stop_ends_training_with_a_checkpoint(tiny_generator, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(Validator, "run", lambda self, step: step == 2)
    last = train(_config(tiny_generator, tiny_dataset, tmp_path / "run", steps=10, validation=Validation(every=1, holdout=2)))
    assert last.name == "step-00000002.safetensors" and last.is_file()


def test_named_checkpoints_and_too_small_training_splits(tiny_generator, tiny_dataset, tiny_model_path, tmp_path):
    run = tiny_model_path.parent.parent
    assert named_checkpoint(f"{run}:latest") == tiny_model_path == named_checkpoint(f"{run}:step-0")
    assert named_checkpoint(str(run)) is None and named_checkpoint(f"{tmp_path}/nowhere:best-identity") is None
    with pytest.raises(WeightsError, match="no best-identity checkpoint"):
        load_model(f"{run}:best-identity")
    with pytest.raises(WeightsError, match="unknown checkpoint name"):
        named_checkpoint(f"{run}:best")
    with pytest.raises(DatasetError, match="held out for validation"):  # 24 samples, 21 held out; two batches need 4
        train(_config(tiny_generator, tiny_dataset, tmp_path / "r", validation=Validation(holdout=21)))


def test_cli_train_passes_the_validation_and_1024_options(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import deid.cli
    from deid.cli import cli

    seen = []
    monkeypatch.setattr(deid.cli, "launch", seen.append)
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"),
                                      "--holdout", "500", "--validate-every", "200", "--validation-batches", "10",
                                      "--early-stop", "3", "--recipe-1024", "official"])
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.validation == Validation(every=200, batches=10, holdout=500, early_stop=3)
    assert config.schedule.recipe_1024 == "official"


def _measure_rank(rank: int, world: int, port: int, images: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_tiny_measure(images, Dist(rank=rank, world=world)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def _tiny_measure(images: torch.Tensor, dist: Dist) -> dict:
    from deid.nets.encoders import LandmarkEncoder
    from deid.nets.model import Disentangler
    from deid.nets.presets import TINY_GENERATOR_CONFIG
    from deid.stylegan.loading import load_generator
    from deid.train.validation import measure

    torch.set_num_threads(1)
    model = Disentangler(TINY_MODEL_CONFIG, load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)).eval()
    pairs = validation_batches(0, len(images), 3, 2, seed=0)  # 3 batches: uneven over 2 ranks
    return measure(model, LandmarkEncoder(TINY_MODEL_CONFIG.landmarks), pairs, lambda i: images[i], dist, torch.float32, 160)


@OWN_PROCESSES
@pytest.mark.slow
def test_validation_across_two_ranks_equals_one_process(tmp_path):
    """Each rank measures every other batch and the sums are all-reduced: the numbers of one process."""
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spawn_ranks(_measure_rank, (2, free_port(), images, str(tmp_path)))
    expected = _tiny_measure(images, Dist())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
