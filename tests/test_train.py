"""Training: what one step updates, each loss against a hand computation, the schedule, exact resume,
refusal of bad datasets. Tiny models: 32x32 generator, real encoder classes with random weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from deid.errors import DatasetError, DeidError
from deid.nets.encoders import LandmarkEncoder
from deid.nets.losses import ms_ssim
from deid.nets.model import Disentangler, build_discriminator
from deid.nets.presets import TINY_MODEL_CONFIG
from deid.runs import latest_checkpoint
from deid.distributed import Dist
from deid.train.config import TrainConfig, Validation
from deid.train.trainer import DataOrder, Trainer, TrainingInterrupted, load_batch, state_path_for, train
from tests.ranks import OWN_PROCESSES, free_port, spawn_ranks


def _config(tiny_generator, data, out, **kw) -> TrainConfig:
    kw = {"steps": 3, "batch_size": 2, "device": "cpu", "checkpoint_every": 1000, "sample_every": 0,
          "sample_count": 2, "tensorboard": False, "validation": Validation(every=0), "log_every": 1, **kw}
    return TrainConfig(data=data, out=out, model=TINY_MODEL_CONFIG.for_generator(tiny_generator), **kw)


@pytest.fixture(scope="module")
def parts(tiny_generator, tiny_dataset, tmp_path_factory):
    """A fresh trainer (not the shared tiny_model: steps change it) and a fixed batch."""
    from deid.dataset import GeneratedDataset

    config = _config(tiny_generator, tiny_dataset, tmp_path_factory.mktemp("run"))
    model = Disentangler(config.model, tiny_generator)
    trainer = Trainer(config, model, LandmarkEncoder(config.model.landmarks), build_discriminator(config.model, 64))
    dataset = GeneratedDataset(tiny_dataset)
    images, ws = load_batch(dataset, [0, 1], torch.device("cpu"))
    others, _ = load_batch(dataset, [2, 3], torch.device("cpu"))
    return trainer, images, ws, others


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_one_step_changes_exactly_the_attribute_encoder_mapper_and_discriminator(parts):
    trainer, images, ws, others = parts
    m = trainer.model
    frozen = {"E_id": m.identity_encoder, "E_lnd": trainer.landmarks, "G": m.generator}
    trained = {"E_attr": m.attribute_encoder, "M": m.mapper, "D_W": trainer.discriminator}
    before = {name: _snapshot(mod) for name, mod in {**frozen, **trained}.items()}
    losses = trainer.step(0, images, others, ws)  # step 0: cross pair, adversarial
    assert {"adversarial", "discriminator", "r1"} <= set(losses)
    for name, mod in frozen.items():
        assert not _changed(before[name], mod), f"{name} must stay frozen"
    for name in ("M", "D_W"):  # every weight and bias of the MLPs moves
        assert _changed(before[name], trained[name]) == set(before[name]), name
    assert any(k.endswith("conv.weight") for k in _changed(before["E_attr"], m.attribute_encoder))
    # step 1 is not adversarial: D_W keeps its weights, E_attr and M move
    d_before, m_before = _snapshot(trainer.discriminator), _snapshot(m.mapper)
    trainer.step(1, images, images, ws)
    assert not _changed(d_before, trainer.discriminator)
    assert _changed(m_before, m.mapper)


def test_losses_equal_a_hand_computation(parts):
    trainer, images, ws, others = parts
    m, lnd, d = trainer.model, trainer.landmarks, trainer.discriminator
    for step, I_attr in ((1, images), (2, images), (3, others)):
        got = trainer.compute_losses(step, images, I_attr, ws)
        with torch.no_grad():
            id_ref = m.identity_encoder(images)
            w = m.mapper(torch.cat([id_ref, m.attribute_encoder(I_attr)], dim=1))
            out = m.generator.synthesis(w, noise_mode="const")
            l_id = (id_ref - m.identity_encoder(out)).abs().mean()
            # landmarks in units of a 160-pixel image (the generator's are 32 pixels)
            l_lnd = ((lnd(I_attr)[:, 17:] - lnd(out)[:, 17:]) * (160 / 32)).pow(2).mean()
            a, b = (I_attr + 1) / 2, (out + 1) / 2
            # the official inverse-Gaussian mask at 32 (sigma int(80 * 32 / 256) = 10), summed over pixels and batch
            c = (torch.arange(32.0) - 15.5) / 10
            g = torch.outer(torch.exp(-c**2 / 2), torch.exp(-c**2 / 2))
            inverse = (g / g.sum()).max() + (g / g.sum()).min() - g / g.sum()
            l1 = (inverse / inverse.sum() * (a - b).abs().mean(dim=1)).sum()
            l_rec = 0.84 * (1 - ms_ssim(a, b)).mean() + 0.16 * l1
        torch.testing.assert_close(got["identity"], l_id)
        torch.testing.assert_close(got["landmarks"], l_lnd)
        if step % 3 == 0:  # cross step: no reconstruction term at all
            assert "reconstruction" not in got
            torch.testing.assert_close(got["non_adversarial"], 1.0 * l_id + 0.001 * l_lnd)
        else:
            torch.testing.assert_close(got["reconstruction"], l_rec)
            torch.testing.assert_close(got["non_adversarial"], 1.0 * l_id + 0.001 * l_lnd + 0.02 * l_rec)
        if step % 2 == 0:
            fake, real = d(w), d(ws)
            torch.testing.assert_close(got["adversarial"], -torch.log(torch.sigmoid(fake)).mean())
            torch.testing.assert_close(got["discriminator"],
                                       -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean())
            wr = ws.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(d(wr).sum(), wr)
            torch.testing.assert_close(got["r1"], 0.5 * 10.0 * g.pow(2).sum(1).mean())
        else:
            assert not {"adversarial", "discriminator", "r1"} & set(got)


def test_a_step_leaves_the_attribute_encoders_batchnorm_statistics_unchanged(parts):
    """The official Keras E_attr runs BatchNorm in inference mode: running statistics never change, the
    scale (which Keras' InceptionV3 lacks) stays fixed, only the offset trains."""
    trainer, images, ws, others = parts
    enc = trainer.model.attribute_encoder
    before = _snapshot(enc)
    trainer.step(0, images, others, ws)
    changed = _changed(before, enc)
    bn_names = {name for name, m in enc.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(bn_names) == 94
    for name in bn_names:
        for stat in ("running_mean", "running_var", "num_batches_tracked", "weight"):
            assert f"{name}.{stat}" not in changed, f"{name}.{stat} changed"
    assert sum(f"{name}.bias" in changed for name in bn_names) == 94
    assert trainer.model.training and not any(enc.get_submodule(n).training for n in bn_names)


def test_reconstruction_has_no_gradient_on_cross_steps(parts):
    """On a cross step the update direction is that of λ_id L_id + λ_lnd L_lnd alone."""
    trainer, images, ws, _ = parts
    got = trainer.compute_losses(3, images, images, ws)  # cross step, even with identical images
    params = list(trainer.model.mapper.parameters())
    g_total = torch.autograd.grad(got["non_adversarial"], params, retain_graph=True)
    g_parts = torch.autograd.grad(got["identity"] + 0.001 * got["landmarks"], params)
    for a, b in zip(g_total, g_parts):
        torch.testing.assert_close(a, b)


def test_data_order_shards_one_global_batch_across_ranks():
    single = DataOrder(20, 4, seed=3, dist=Dist())
    ranks = [DataOrder(20, 2, seed=3, dist=Dist(rank=r, world=2)) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (20 // 4 = 5 batches per epoch)
        expected = single.next_indices()
        shards = [o.next_indices() for o in ranks]
        assert shards[0] + shards[1] == expected and not set(shards[0]) & set(shards[1])
    resumed = DataOrder(20, 4, seed=3, dist=Dist())
    resumed.restore(single.state())
    assert resumed.next_indices() == single.next_indices()


@pytest.mark.slow
def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tiny_generator, tiny_dataset, tmp_path):
    """Steps 0-2 cover cross/same-image and adversarial/non-adversarial steps; the cut run stops after step 1."""
    full = train(_config(tiny_generator, tiny_dataset, tmp_path / "full", sample_every=3, tensorboard=True))
    assert full.name == "step-00000003.safetensors"

    def ctrl_c_at_step_1(step, losses):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # finishes the step, checkpoints, stops

    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(_config(tiny_generator, tiny_dataset, cut), on_step=ctrl_c_at_step_1)
    assert latest_checkpoint(cut).name == "step-00000002.safetensors"
    with pytest.raises(DeidError, match="--resume"):  # never overwrites a run
        train(_config(tiny_generator, tiny_dataset, cut))
    with (cut / "losses.jsonl").open("a") as log:  # a kill (OOM, SIGKILL) in the middle of writing a record
        log.write('{"step": 2, "identity": 0.12')
    resumed = train(_config(tiny_generator, tiny_dataset, cut, resume=True))

    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and any(k.startswith("discriminator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = load_file(str(state_path_for(full))), load_file(str(state_path_for(resumed)))
    for k in sa:
        if k.startswith("optimizer."):
            assert torch.equal(sa[k], sb[k]), k
    curve = lambda run: [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]  # noqa: E731
    full_curve, cut_curve = curve(tmp_path / "full"), curve(cut)
    assert [e["step"] for e in cut_curve] == [0, 1, 2]
    for x, y in zip(full_curve, cut_curve):
        assert x["non_adversarial"] == y["non_adversarial"]
    grid = tmp_path / "full" / "samples" / "step-00000003.png"
    from PIL import Image

    from deid.grid import GRID_GAP

    assert Image.open(grid).size == (3 * 32 + 2 * GRID_GAP,) * 2  # (K + 1) x (K + 1) cells, `deid mix` layout
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))


def test_bad_datasets_are_refused_before_training(tiny_generator, tiny_dataset, tmp_path):
    from deid.stylegan.loading import load_generator

    other = _config(tiny_generator, tiny_dataset, tmp_path / "a")
    other = dataclasses.replace(other, model=dataclasses.replace(other.model, generator_seed=7))  # another generator
    with pytest.raises(DatasetError, match="made by generator"):
        train(other)
    bigger = load_generator("random", config=dataclasses.replace(tiny_generator.config, resolution=64), seed=0)
    with pytest.raises(DatasetError, match="32x32"):
        train(_config(bigger, tiny_dataset, tmp_path / "b"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    next(broken.glob("images/*/*.png")).unlink()
    with pytest.raises(DatasetError, match="missing"):
        train(_config(tiny_generator, broken, tmp_path / "c"))
    with pytest.raises(DeidError, match="nothing to resume"):
        train(_config(tiny_generator, tiny_dataset, tmp_path / "d", resume=True))
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_cli_train_refuses_a_missing_dataset(tmp_path):
    from click.testing import CliRunner

    from deid.cli import cli

    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                                      "--generator", "random", "--identity-encoder", "random",
                                      "--attribute-encoder", "random", "--landmark-encoder", "random", "--device", "cpu"])
    assert result.exit_code != 0
    assert isinstance(result.exception, DatasetError) and "deid make-dataset" in str(result.exception)


def _r1_rank(rank: int, world: int, port: int, w: torch.Tensor, fake: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as tdist

    from deid.nets.losses import discriminator_loss, r1_penalty
    from deid.nets.model import ModelConfig
    from deid.train.trainer import average_across_ranks

    torch.set_num_threads(1)  # spawned ranks start with the default pool: oversubscribed on 2 cores
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        d = build_discriminator(ModelConfig(), w.shape[1])
        shard = slice(rank * len(w) // world, (rank + 1) * len(w) // world)
        loss = discriminator_loss(d(w[shard]), d(fake[shard])) + r1_penalty(d, w[shard], 10.0)
        grads = list(torch.autograd.grad(loss, list(d.parameters())))
        average_across_ranks(grads, Dist(rank=rank, world=world))
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@OWN_PROCESSES
@pytest.mark.slow
def test_discriminator_and_r1_gradients_across_two_ranks_equal_the_global_batch(tmp_path):
    """Two gloo processes, each with half the batch: averaged gradients equal one process with all of it."""
    from deid.nets.losses import discriminator_loss, r1_penalty
    from deid.nets.model import ModelConfig

    g = torch.Generator().manual_seed(0)
    w, fake = torch.randn(6, 512, generator=g), torch.randn(6, 512, generator=g)
    spawn_ranks(_r1_rank, (2, free_port(), w, fake, str(tmp_path)))
    d = build_discriminator(ModelConfig(), 512)
    loss = discriminator_loss(d(w), d(fake)) + r1_penalty(d, w, 10.0)
    expected = torch.autograd.grad(loss, list(d.parameters()))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cli_train_builds_the_papers_defaults(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import deid.cli
    from deid.cli import cli

    seen = []
    monkeypatch.setattr(deid.cli, "launch", seen.append)
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"),
                                      "--attribute-encoder", "random", "--steps", "10"])
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert (config.batch_size, config.steps, config.precision, config.gpus, config.resume) == (None, 10, "fp32", 1, False)
    assert (config.model.generator, config.model.identity.source, config.model.attributes.source,
            config.model.landmarks.source) == ("stylegan2-ffhq-256", "facenet-vggface2", "random", "fan-2d")
    w, s = config.losses, config.schedule
    assert (w.identity, w.landmarks, w.reconstruction, w.adversarial, w.r1_gamma) == (1.0, 0.001, 0.02, 1.0, 10.0)
    assert (s.cross_every, s.adversarial_every, tuple(s.betas)) == (3, 2, (0.9, 0.999))
    assert s.learning_rates(256) == pytest.approx((5e-5, 5e-6, 2e-5)) and s.batch_size(256) == 6
    # 1024: the paper's preset (appendix C) by default, the official code's on request
    assert s.learning_rates(1024) == pytest.approx((5e-6, 5e-7, 2e-6)) and s.batch_size(1024) == 2
    official = dataclasses.replace(s, recipe_1024="official")
    assert official.learning_rates(1024) == pytest.approx((1e-5, 1e-6, 4e-6)) and official.batch_size(1024) == 6
    v = config.validation
    assert (v.every, v.batches, v.holdout, v.early_stop, config.real_w) == (1000, 50, 0.01, 0, "random")
    assert (w.pixel_mask, w.pixel_reduction, w.landmark_units) == ("gaussian", "sum", 160)
    assert (config.model.initialiser, config.model.attributes.batchnorm) == ("official", "inference")


def test_cli_train_checks_the_dataset_before_fetching_any_network(tmp_path):
    from click.testing import CliRunner

    from deid.cli import cli

    # Default (registry) networks are not in the test cache and the tests are offline: the dataset error must
    # come first, not a complaint about weights the run would never have needed.
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code != 0
    assert isinstance(result.exception, DatasetError) and "deid make-dataset" in str(result.exception)


def test_record_files_drop_a_last_line_cut_by_a_kill_and_refuse_damage_elsewhere(tmp_path):
    from deid.runs import complete_lines, read_records

    path = tmp_path / "losses.jsonl"
    assert complete_lines(path) == []
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "loss": 0.1')  # no newline: cut mid-record
    assert read_records(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "lo\n')  # a cut record that did get a newline
    assert read_records(path) == [{"step": 0}]
    path.write_text('{"step": 0}\n{"step": 1}\n')
    assert complete_lines(path) == ['{"step": 0}', '{"step": 1}']
    path.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(DeidError, match="record 2 is not valid JSON"):
        complete_lines(path)


def test_training_turns_cudnn_autotuning_on_for_the_run_only():
    """cuDNN's autotuner is process-wide: a run on a GPU turns it on, and the caller's setting comes back after
    the run, also when it fails."""
    from deid.train.trainer import cudnn_autotuning

    cudnn, saved = torch.backends.cudnn, torch.backends.cudnn.benchmark
    try:
        cudnn.benchmark = False
        with cudnn_autotuning(torch.device("cuda")):
            assert cudnn.benchmark
        assert not cudnn.benchmark
        with pytest.raises(RuntimeError, match="boom"), cudnn_autotuning(torch.device("cuda")):
            raise RuntimeError("boom")
        assert not cudnn.benchmark
        with cudnn_autotuning(torch.device("cpu")):
            assert not cudnn.benchmark
    finally:
        cudnn.benchmark = saved


# ------------------------------------------------------------------- the recipe as the trainer runs it
# (docs/recipe.md, "Schedule and optimisers" and "Data": a wrong rate, a network under the wrong Adam, a cross
# step without its own attribute batch or D_W fed the batch's own w's must fail here)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_each_adam_updates_its_networks_at_the_recipes_rate(parts):
    """non-adversarial and adversarial: E_attr (less BatchNorm's frozen scales) and M, at 5e-5 and 5e-6; D_W
    alone at 2e-5; all three torch Adam with betas (0.9, 0.999), eps 1e-8, no weight decay. E_id, E_lnd and G in
    none of them."""
    trainer = parts[0]
    m = trainer.model
    attributes = [p for p in m.attribute_encoder.parameters() if p.requires_grad]
    assert 0 < len(attributes) < len(list(m.attribute_encoder.parameters()))  # BatchNorm's γ stays out
    generator_side = _ids(attributes + list(m.mapper.parameters()))
    expected = {"non_adversarial": (generator_side, 5e-5), "adversarial": (generator_side, 5e-6),
                "discriminator": (_ids(trainer.discriminator.parameters()), 2e-5)}
    assert set(trainer.optimizers) == set(expected)
    for name, (params, lr) in expected.items():
        optimizer = trainer.optimizers[name]
        (group,) = optimizer.param_groups
        assert type(optimizer) is torch.optim.Adam, name
        assert _ids(group["params"]) == params and len(group["params"]) == len(params), name
        assert group["lr"] == pytest.approx(lr, rel=1e-12), name
        assert tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0, name
    frozen = _ids(p for net in (m.identity_encoder, trainer.landmarks, m.generator) for p in net.parameters())
    assert not frozen & (generator_side | expected["discriminator"][0])


def _record_steps(monkeypatch) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Make Trainer.step record what the loop hands it: (step, I_id, I_attr, w_real)."""
    seen, real_step = [], Trainer.step

    def recording(self, step, I_id, I_attr, w_real, **kwargs):  # noqa: N803
        seen.append((step, I_id.clone(), I_attr.clone(), w_real.clone()))
        return real_step(self, step, I_id, I_attr, w_real, **kwargs)

    monkeypatch.setattr(Trainer, "step", recording)
    return seen


def test_a_cross_step_draws_a_second_batch_and_other_steps_reuse_the_first(tiny_generator, tiny_dataset, tmp_path,
                                                                            monkeypatch):
    """Step 0 (cross) takes the next two batches of the order as I_id and I_attr; steps 1 and 2 one batch each,
    as both I_id and I_attr."""
    from deid.dataset import GeneratedDataset

    seen = _record_steps(monkeypatch)
    train(_config(tiny_generator, tiny_dataset, tmp_path / "run", data_workers=0))
    dataset, order = GeneratedDataset(tiny_dataset), DataOrder(24, 2, seed=0, dist=Dist())
    batches = [load_batch(dataset, order.next_indices(), torch.device("cpu"))[0] for _ in range(4)]
    assert [s[0] for s in seen] == [0, 1, 2]
    (_, id0, attr0, _), (_, id1, attr1, _), (_, id2, attr2, _) = seen
    assert torch.equal(id0, batches[0]) and torch.equal(attr0, batches[1])
    assert torch.equal(id1, batches[2]) and torch.equal(attr1, batches[2])
    assert torch.equal(id2, batches[3]) and torch.equal(attr2, batches[3])


def test_the_discriminators_real_ws_are_random_training_samples_independent_of_the_batch(tiny_generator, tiny_dataset,
                                                                                       tmp_path):
    """The official get_real_w: each adversarial step draws its own w's from the training split (never a held-out
    sample), whatever the batch is; the same step draws the same w's again (exact resume)."""
    import numpy as np

    from deid.train.trainer import _start

    config = _config(tiny_generator, tiny_dataset, tmp_path / "run", data_workers=0,
                     validation=Validation(every=10, holdout=4))  # 24 samples: 20 train, 4 held out
    run, _ = _start(config, Dist(), torch.device("cpu"))
    try:
        ws = np.array(run.dataset.ws)  # a copy: the memory map is read-only
        not_a_w = torch.full((2, 64), 1e3)
        drawn = []
        for step in range(0, 400, 2):
            real = run.real_ws(step, not_a_w)
            assert real.shape == (2, 64)
            torch.testing.assert_close(run.real_ws(step, not_a_w), real, rtol=0, atol=0)
            # each row is a sample's w: find which
            distances = ((torch.from_numpy(ws)[None] - real[:, None]) ** 2).sum(-1)
            assert float(distances.min(dim=1).values.max()) == 0.0
            drawn.append(distances.argmin(dim=1).tolist())
    finally:
        run.batches.close()
    indices = [i for pair in drawn for i in pair]
    assert set(indices) == set(range(20))  # 400 draws reach every training sample, and no held-out one
    assert len({tuple(pair) for pair in drawn}) > 100  # a fresh draw per step, not a fixed set



@pytest.mark.parametrize("initialiser", ["official", "pytorch"])
def test_the_models_initialiser_reaches_the_mapper_and_the_discriminator(tiny_generator, initialiser):
    """ModelConfig.initialiser is forwarded to M and D_W: the official (Keras) one has zero biases and Glorot
    uniform first layers of M, PyTorch's nn.Linear defaults have neither."""
    import math

    config = dataclasses.replace(TINY_MODEL_CONFIG.for_generator(tiny_generator), initialiser=initialiser)
    mapper = Disentangler(config, tiny_generator).mapper
    discriminator = build_discriminator(config, tiny_generator.w_dim)
    linears = [m for net in (mapper, discriminator) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8
    first = linears[0].weight.detach()
    fan_out, fan_in = first.shape
    glorot, default = math.sqrt(6 / (fan_in + fan_out)), 1 / math.sqrt(fan_in)
    if initialiser == "official":
        assert all(torch.count_nonzero(layer.bias) == 0 for layer in linears)
        assert float(first.abs().max()) > 1.5 * default  # Glorot's wider limit is used, not PyTorch's
        assert float(first.abs().max()) <= glorot
    else:
        assert all(torch.count_nonzero(layer.bias) > 0 for layer in linears)
        assert float(first.abs().max()) <= default
