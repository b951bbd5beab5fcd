"""The StyleGAN2 generator against a plain per-layer statement of the published math, plus its invariants."""

import dataclasses
import math

import pytest
import torch

import deid.stylegan.ops as ops
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator
from deid.stylegan.network import EqualizedLinear, Generator
from deid.stylegan.ops import demod_coefficients, fir_filter, modulated_conv2d, upsample2d
from tests.fixtures.generator import TINY_GENERATOR_CONFIG, _modconv, reference_generate


def _z(n, dim, seed=5):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("conv_clamp", [256.0, 0.5, None])  # 0.5 makes the clamp bite in most layers
@pytest.mark.parametrize("psi", [1.0, 0.7])
def test_images_match_plain_reference_math(conv_clamp, psi):
    cfg = dataclasses.replace(TINY_GENERATOR_CONFIG, conv_clamp=conv_clamp)
    G = load_generator("random", config=cfg, seed=1)
    z = _z(3, cfg.z_dim)
    img = G.synthesis(G.mapping(z, truncation_psi=psi), noise_mode="const")
    ref = reference_generate(G.state_dict(), "nvidia", cfg.resolution, z, psi, conv_clamp=conv_clamp)
    assert img.shape == (3, 3, 32, 32) and img.dtype == torch.float32
    assert (img.double() - ref).abs().max().item() <= 1e-4
    assert ref.std() > 0.05  # a non-trivial image: the comparison means something


def test_per_layer_w_plus_matches_broadcast_and_mixing_changes_image(tiny_generator):
    G = tiny_generator
    w = G.mapping(_z(2, G.z_dim))
    wplus = w[:, None].repeat(1, G.num_ws, 1)
    assert torch.equal(G.synthesis(w), G.synthesis(wplus))
    mixed = wplus.clone()
    mixed[:, -3:] = w.flip(0)[:, None]
    assert (G.synthesis(mixed) - G.synthesis(wplus)).abs().max() > 1e-3
    with pytest.raises(ValueError):
        G.synthesis(wplus[:, :-1])


@pytest.mark.parametrize("split", [16, 1024])
def test_batch_and_single_sample_paths_agree(tiny_generator, monkeypatch, split):
    # on the CPU, blocks from cpu_split_resolution up run one sample at a time; lower ones batched
    G = tiny_generator
    monkeypatch.setattr(G.synthesis, "cpu_split_resolution", split)
    w = G.mapping(_z(4, G.z_dim), truncation_psi=0.7)
    batch = G.synthesis(w)
    single = torch.cat([G.synthesis(w[i:i + 1]) for i in range(4)])
    assert (batch - single).abs().max() < 1e-5


@pytest.mark.parametrize("up", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("polyphase_max", [0, 1000])  # transposed conv / polyphase ordinary conv
def test_modulated_conv_paths_match_reference(up, fused, polyphase_max, monkeypatch):
    monkeypatch.setattr(ops, "POLYPHASE_MAX_CHANNELS", polyphase_max)
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(3, 6, 5, 5, generator=gen), torch.randn(7, 6, 3, 3, generator=gen)
    styles = torch.randn(3, 6, generator=gen) + 1
    out = modulated_conv2d(x, weight, styles, up=up, resample_filter=fir_filter(), fused=fused, gain=1.5)
    f4 = fir_filter().double() * 4
    ref = torch.stack([_modconv(x[n].double(), weight.double(), styles[n].double(), True, up, f4) for n in range(3)])
    assert out.shape == ref.shape == (3, 7, 10 if up else 5, 10 if up else 5)
    assert (out.double() - 1.5 * ref).abs().max() < 1e-5


def test_truncation_lerps_toward_w_avg(tiny_generator):
    G = tiny_generator
    z = _z(5, G.z_dim)
    w1, w07, w0 = G.mapping(z), G.mapping(z, 0.7), G.mapping(z, 0.0)
    assert torch.allclose(w07, G.w_avg + 0.7 * (w1 - G.w_avg), atol=1e-5)
    assert torch.allclose(w0, G.w_avg.expand_as(w0), atol=1e-6)


def test_noise_modes(tiny_generator):
    G = tiny_generator
    w = G.mapping(_z(2, G.z_dim))
    const = G.synthesis(w, noise_mode="const")
    assert torch.equal(const, G.synthesis(w, noise_mode="const"))
    r1, r2 = G.synthesis(w, noise_mode="random"), G.synthesis(w, noise_mode="random")
    assert (r1 - r2).abs().max() > 1e-3 and (r1 - const).abs().max() > 1e-3
    silent = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)
    with torch.no_grad():
        for name, p in silent.named_parameters():
            if name.endswith("noise_strength"):
                p.zero_()
    assert torch.allclose(G.synthesis(w, noise_mode="none"), silent.synthesis(w, noise_mode="const"), atol=1e-6)
    with pytest.raises(ValueError):
        G.synthesis(w, noise_mode="fixed")


def test_bf16_agrees_with_fp32():
    G = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)
    w = G.mapping(_z(4, G.z_dim), truncation_psi=0.7)
    ref = G.synthesis(w)
    Gb = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0).to(torch.bfloat16)
    assert Gb.synthesis.b32.conv1.weight.dtype == torch.bfloat16
    assert torch.allclose(Gb.mapping(_z(4, G.z_dim), truncation_psi=0.7), w, atol=0.05)
    out = Gb.synthesis(w)
    assert out.dtype == torch.float32
    err = (out - ref).abs()
    assert err.mean() < 0.01 and err.max() < 0.08, (err.mean(), err.max())


def test_gradient_reaches_w(tiny_generator):
    w = tiny_generator.mapping(_z(2, tiny_generator.z_dim)).requires_grad_(True)
    tiny_generator.synthesis(w).square().mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in tiny_generator.parameters())


def test_equalized_lr_gains_and_filter():
    lin = EqualizedLinear(512, 512, lr_multiplier=0.01)
    assert math.isclose(lin.weight_gain, 0.01 / math.sqrt(512)) and lin.bias_gain == 0.01
    G = Generator(GeneratorConfig(resolution=64))
    assert math.isclose(G.mapping.fc0.weight_gain, 0.01 / math.sqrt(512))
    assert math.isclose(G.synthesis.b64.conv0.affine.weight_gain, 1 / math.sqrt(512))
    assert math.isclose(G.synthesis.b64.torgb.weight_gain, 1 / math.sqrt(G.synthesis.b64.torgb.weight.shape[1]))
    f = fir_filter()
    assert torch.allclose(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    assert torch.allclose(G.synthesis.b64.conv0.resample_filter, f)
    # up-sampling keeps a constant image constant (filter sums to 1, gain 4 = 2x2 zero insertion)
    up = upsample2d(torch.full((1, 2, 8, 8), 3.0), f)
    assert up.shape == (1, 2, 16, 16) and torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))


def test_demodulation_gives_unit_output_scale():
    # demodulated weights have unit L2 norm per output channel, so iid unit-variance input -> unit-variance output
    gen = torch.Generator().manual_seed(0)
    weight, styles = torch.randn(64, 128, 3, 3, generator=gen), torch.randn(2, 128, generator=gen) * 3 + 1
    x = torch.randn(2, 128, 48, 48, generator=gen)
    y = modulated_conv2d(x, weight, styles)[..., 1:-1, 1:-1]
    assert abs(y.var().item() - 1) < 0.05
    d = demod_coefficients(weight.square().sum(dim=[2, 3]), styles)
    direct = ((weight[None] * styles[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    assert torch.allclose(d, direct, rtol=1e-5)


@pytest.mark.parametrize("res,base,mx,expect", [
    (256, 16384, 512, {4: 512, 32: 512, 64: 256, 128: 128, 256: 64}),
    (1024, 32768, 512, {4: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}),
])
def test_channel_widths_and_num_ws(res, base, mx, expect):
    with torch.device("meta"):
        G = Generator(GeneratorConfig(resolution=res, channel_base=base, channel_max=mx))
    for r, c in expect.items():
        assert getattr(G.synthesis, f"b{r}").conv1.weight.shape == (c, c, 3, 3)
    assert G.num_ws == {256: 14, 1024: 18}[res]
    assert G.synthesis.b256.conv0.noise_const.shape == (256, 256)


def test_fingerprint_is_content_hash(tiny_generator):
    same = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)
    assert same.fingerprint == tiny_generator.fingerprint and len(same.fingerprint) == 64
    with torch.no_grad():
        same.synthesis.b8.conv1.bias[0] += 1e-3
    same.load_state_dict(same.state_dict())
    assert same.fingerprint != tiny_generator.fingerprint
    assert load_generator("random", config=TINY_GENERATOR_CONFIG, seed=1).fingerprint != tiny_generator.fingerprint


def test_sampling_under_inference_mode_does_not_poison_later_gradients(tiny_generator):
    # The generator caches tensors derived from its weights; ones made in inference mode must not be reused
    # where autograd needs them (the video pipeline samples in inference mode, training then backpropagates).
    w = tiny_generator.mapping(torch.randn(2, tiny_generator.z_dim, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        tiny_generator.synthesis(w, noise_mode="const")
    w = w.clone().requires_grad_(True)
    tiny_generator.synthesis(w, noise_mode="const").square().mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
