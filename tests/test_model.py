"""Disentangler: shapes, exact layer widths, save/load round trip, refusal of a foreign generator."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deid.errors import WeightsError
from deid.nets.mapper import DiscriminatorConfig, LatentDiscriminator, LatentMapper, MapperConfig
from deid.nets.model import load_model
from deid.runs import checkpoint_path, latest_checkpoint


def _layers(module):
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def _activations(module):
    return [m for m in module.net if not isinstance(m, nn.Linear)]


def test_mapper_and_discriminator_have_the_papers_widths():
    m = LatentMapper(MapperConfig())
    assert _layers(m) == [(2560, 2048), (2048, 1024), (1024, 512), (512, 512)]
    d = LatentDiscriminator(DiscriminatorConfig())
    assert _layers(d) == [(512, 256), (256, 128), (128, 64), (64, 1)]
    for net, n_linear in ((m, 4), (d, 4)):
        acts = _activations(net)
        assert len(acts) == n_linear - 1 and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.2 for a in acts)
        assert isinstance(net.net[-1], nn.Linear)  # nothing after the last layer
    assert d(torch.zeros(3, 512)).shape == (3,)


def test_tiny_model_shapes(tiny_model, tiny_generator):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tiny_model.encode_identity(x)
    attrs = tiny_model.encode_attributes(x)
    assert ids.shape == (2, 512) and attrs.shape == (2, 2048)
    torch.testing.assert_close(ids.norm(dim=1), torch.ones(2))
    w = tiny_model.map(ids, attrs)
    assert w.shape == (2, tiny_generator.w_dim)
    out = tiny_model(x, x.flip(0))
    assert out.shape == (2, 3, 32, 32) and tiny_model.resolution == 32


def test_identity_comes_from_the_first_image_and_attributes_from_the_second(tiny_model):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids, attrs = tiny_model.encode_identity(x), tiny_model.encode_attributes(x)
    expected = tiny_model.generate(tiny_model.map(ids, attrs.flip(0)))
    torch.testing.assert_close(tiny_model(x, x.flip(0)), expected)


def test_saved_model_round_trips_without_pickle(tiny_model, tiny_model_path, tiny_generator):
    from safetensors import safe_open

    with safe_open(str(tiny_model_path), framework="pt") as f:
        header = json.loads(f.metadata()["deid"])
        keys = list(f.keys())
    assert header["generator_fingerprint"] == tiny_generator.fingerprint
    assert header["config"]["identity"]["source"] == "random" and header["step"] == 0
    assert all(k.startswith(("attribute_encoder.", "mapper.")) for k in keys)  # frozen parts are referenced
    loaded = load_model(tiny_model_path)  # rebuilds the seeded random generator and E_id from the config
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.testing.assert_close(loaded(x, x.flip(0)), tiny_model(x, x.flip(0)))
    # a run directory resolves to its latest checkpoint
    assert latest_checkpoint(tiny_model_path.parent.parent) == tiny_model_path
    assert load_model(tiny_model_path.parent.parent).step == 0


def test_model_refuses_another_generator(tiny_model_path):
    from deid.stylegan.loading import load_generator
    from tests.fixtures.generator import TINY_GENERATOR_CONFIG

    other = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=1)
    with pytest.raises(WeightsError, match="generator"):
        load_model(tiny_model_path, generator=other)


def test_latest_checkpoint_is_the_highest_step(tiny_model, tmp_path):
    for step in (5, 120, 40):
        tiny_model.save(checkpoint_path(tmp_path, step), step=step)
    assert latest_checkpoint(tmp_path).name == "step-00000120.safetensors"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [  # atomic writes leave no temp files
        "step-00000005.safetensors", "step-00000040.safetensors", "step-00000120.safetensors"]
    with pytest.raises(WeightsError, match="deid train"):
        latest_checkpoint(tmp_path / "empty")


def test_default_model_missing_says_how_to_make_one():
    with pytest.raises(WeightsError) as err:
        load_model("deid-ffhq256")
    assert "deid make-dataset" in str(err.value) and "deid train" in str(err.value)


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="not a deid model"):
        load_model(path)
