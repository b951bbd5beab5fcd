"""Generator file readers on files built here in each published on-disk format, and the unpickler's refusals."""

import argparse
import collections
import dataclasses
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from deid.atomic import TEMPORARY_GLOB
from deid.checkpoints import read_network_pickle, read_state_dict
from deid.errors import WeightsError
from deid.stylegan.loading import convert_generator, load_generator
from deid.stylegan.ops import fir_filter
from tests.fixtures.generator import TINY_GENERATOR_CONFIG, reference_generate


def _z(n, dim, seed=3):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ an NVIDIA-format writer
# NVIDIA's pickles name `torch_utils.persistence._reconstruct_persistent_obj` (and `dnnlib.util.EasyDict`);
# to emit those globals we register throw-away modules under those names while writing.

def _fake_reconstruct(meta):
    raise AssertionError("never called while writing")


class _EasyDict(dict):
    pass


@pytest.fixture
def nvidia_names(monkeypatch):
    persistence = types.ModuleType("torch_utils.persistence")
    _fake_reconstruct.__module__, _fake_reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _fake_reconstruct
    util = types.ModuleType("dnnlib.util")
    _EasyDict.__module__, _EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = _EasyDict
    for name, mod in [("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                      ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", util)]:
        monkeypatch.setitem(sys.modules, name, mod)


class _Persistent:
    """Pickles exactly as an NVIDIA persistent network module: reconstructor(meta) with source and state."""

    def __init__(self, class_name, state, module_src):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return _fake_reconstruct, (meta,)


# Code that the official loader would exec(); it must never run here.
def _module_src(marker):
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\nclass Generator: pass\n"


_NVIDIA_CLASS = {"Generator": "Generator", "MappingNetwork": "MappingNetwork", "EqualizedLinear": "FullyConnectedLayer",
                 "SynthesisNetwork": "SynthesisNetwork", "SynthesisBlock": "SynthesisBlock",
                 "SynthesisLayer": "SynthesisLayer", "ToRGBLayer": "ToRGBLayer"}


def _as_nvidia_tree(module, src, init_kwargs=None):
    """One of deid's modules -> the persistent-object tree NVIDIA's code pickles for the same network."""
    children = collections.OrderedDict((n, _as_nvidia_tree(m, src)) for n, m in module._modules.items())
    params = collections.OrderedDict((n, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
                                     for n, p in module._parameters.items())
    buffers = collections.OrderedDict((n, b.clone()) for n, b in module._buffers.items())
    cls = type(module).__name__
    attrs = {}
    if cls == "SynthesisLayer":
        buffers.setdefault("resample_filter", fir_filter())  # NVIDIA keeps one in every synthesis layer
        attrs = dict(resolution=module.resolution, up=2 if module.up else 1, use_noise=True, activation="lrelu",
                     conv_clamp=module.conv_clamp, padding=1, act_gain=np.float64(np.sqrt(2)))
    elif cls == "EqualizedLinear":
        attrs = dict(activation="lrelu" if module.lrelu else "linear", weight_gain=np.float64(module.weight_gain),
                     bias_gain=module.bias_gain)
    elif cls == "SynthesisBlock":
        attrs = dict(architecture="skip", use_fp16=False, resolution=module.resolution, in_channels=module.in_channels)
    state = dict(training=False, _parameters=params, _buffers=buffers, _non_persistent_buffers_set=set(),
                 _backward_hooks=collections.OrderedDict(), _forward_hooks=collections.OrderedDict(),
                 _forward_pre_hooks=collections.OrderedDict(), _modules=children, _init_args=(),
                 _init_kwargs=init_kwargs or {}, **attrs)
    return _Persistent(_NVIDIA_CLASS[cls], state, src)


def _ada_kwargs(cfg, flat=False):
    synthesis = dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=4,
                     conv_clamp=cfg.conv_clamp, architecture="skip")
    kw = dict(z_dim=cfg.z_dim, c_dim=0, w_dim=cfg.w_dim, img_resolution=cfg.resolution, img_channels=3,
              mapping_kwargs=_EasyDict(num_layers=cfg.mapping_layers))
    if flat:  # the stylegan3 repo's StyleGAN2 passes synthesis settings flat
        return _EasyDict(kw, **synthesis, fused_modconv_default="inference_only")
    return _EasyDict(kw, synthesis_kwargs=_EasyDict(synthesis))


def write_nvidia_pickle(path, G, marker, init_kwargs):
    tree = _as_nvidia_tree(G, _module_src(marker), init_kwargs)
    dummy_d = _Persistent("Discriminator", dict(_parameters=collections.OrderedDict(w=torch.randn(3)),
                                                _modules=collections.OrderedDict(), _init_kwargs={}), _module_src(marker))
    data = dict(G=tree, D=dummy_d, G_ema=tree, augment_pipe=None,
                training_set_kwargs=_EasyDict(path="~/datasets/ffhq.zip", resolution=G.resolution))
    with open(path, "wb") as f:
        pickle.dump(data, f)


@pytest.mark.parametrize("flat", [False, True])
def test_nvidia_pickle_loads_to_same_images(tmp_path, nvidia_names, tiny_generator, flat):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "network-snapshot.pkl"
    write_nvidia_pickle(path, tiny_generator, marker, _ada_kwargs(TINY_GENERATOR_CONFIG, flat))
    G = load_generator(path)
    assert not marker.exists()  # the embedded module source never ran
    assert G.config == dataclasses.replace(TINY_GENERATOR_CONFIG, num_fp16_res=4)
    z = _z(3, G.z_dim)
    for psi in (1.0, 0.7):
        img = G.synthesis(G.mapping(z, psi), noise_mode="const")
        assert torch.equal(img, tiny_generator.synthesis(tiny_generator.mapping(z, psi), noise_mode="const"))
        ref = reference_generate(G.state_dict(), "nvidia", 32, z, psi, conv_clamp=256)
        assert (img.double() - ref).abs().max() <= 1e-4
    assert G.fingerprint == tiny_generator.fingerprint
    assert G.state_dict().keys() == tiny_generator.state_dict().keys()


def test_nvidia_kwargs_decide_architecture(tmp_path, nvidia_names, tiny_generator):
    # the same tensors, read with a different conv_clamp from _init_kwargs, must give different images
    kw = _ada_kwargs(TINY_GENERATOR_CONFIG)
    kw["synthesis_kwargs"]["conv_clamp"] = 0.25
    path = tmp_path / "clamped.pkl"
    tree = _as_nvidia_tree(tiny_generator, "", kw)
    with open(path, "wb") as f:
        pickle.dump({"G_ema": tree}, f)
    with pytest.raises(WeightsError, match="conv_clamp"):  # the layers' own attribute says 256: inconsistent
        load_generator(path)
    for layer in _walk(tree):
        if "conv_clamp" in layer.state:
            layer.state["conv_clamp"] = 0.25
    with open(path, "wb") as f:
        pickle.dump({"G_ema": tree}, f)
    G = load_generator(path)
    assert G.config.conv_clamp == 0.25
    z = _z(2, G.z_dim)
    ref = reference_generate(G.state_dict(), "nvidia", 32, z, 1.0, conv_clamp=0.25)
    assert (G.synthesis(G.mapping(z)).double() - ref).abs().max() <= 1e-4


def _walk(node):
    yield node
    for child in node.state["_modules"].values():
        yield from _walk(child)


@pytest.mark.parametrize("change,match", [
    (lambda kw: kw.update(c_dim=10), "conditional"),
    (lambda kw: kw["synthesis_kwargs"].update(architecture="resnet"), "resnet"),
    (lambda kw: kw["synthesis_kwargs"].update(magnitude_ema_beta=0.999), "magnitude_ema_beta"),
])
def test_unsupported_nvidia_variants_are_refused(tmp_path, nvidia_names, tiny_generator, change, match):
    kw = _ada_kwargs(TINY_GENERATOR_CONFIG)
    change(kw)
    path = tmp_path / "variant.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": _as_nvidia_tree(tiny_generator, "", kw)}, f)
    with pytest.raises(WeightsError, match=match):
        load_generator(path)


def test_stylegan3_synthesis_is_refused(tmp_path, nvidia_names, tiny_generator):
    tree = _as_nvidia_tree(tiny_generator, "", _ada_kwargs(TINY_GENERATOR_CONFIG))
    synthesis = tree.state["_modules"]["synthesis"].state["_modules"]
    synthesis["input"] = synthesis.pop("b4")  # StyleGAN3: input, L0_36_512, ... instead of b4, b8, ...
    path = tmp_path / "sg3.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": tree}, f)
    with pytest.raises(WeightsError, match="StyleGAN3"):
        load_generator(path)


class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", [os.system, eval, exec])
def test_malicious_pickle_is_refused_before_running(tmp_path, func):
    marker = tmp_path / "pwned"
    command = {os.system: f"touch {marker}", eval: f"open({str(marker)!r}, 'w').close()",
               exec: f"open({str(marker)!r}, 'w').close()"}[func]
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": _Payload(func, command)}, f)
    # sanity: the payload is live (plain pickle would run it)
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(WeightsError, match="refused"):
        load_generator(path)
    with pytest.raises(WeightsError, match="refused"):
        read_network_pickle(path)
    assert not marker.exists()


def test_truncated_pickle_is_a_weights_error(tmp_path, nvidia_names, tiny_generator):
    path = tmp_path / "cut.pkl"
    write_nvidia_pickle(path, tiny_generator, tmp_path / "m", _ada_kwargs(TINY_GENERATOR_CONFIG))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="not a readable network pickle"):
        load_generator(path)


# ----------------------------------------------------------------------------------- rosinality format


def _rosinality_state(size, style_dim, n_mlp, widths, seed=0):
    """Random tensors with the names and shapes of rosinality's Generator state dict."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    blur = torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64 * 4
    sd = {}
    for k in range(1, n_mlp + 1):
        sd[f"style.{k}.weight"], sd[f"style.{k}.bias"] = r(style_dim, style_dim) / 0.01, r(style_dim) * 0.1

    def styled(name, cin, cout, up):
        sd[f"{name}.conv.weight"] = r(1, cout, cin, 3, 3)
        sd[f"{name}.conv.modulation.weight"] = r(cin, style_dim)
        sd[f"{name}.conv.modulation.bias"] = torch.ones(cin) + 0.1 * r(cin)
        sd[f"{name}.noise.weight"] = 0.1 * r(1)
        sd[f"{name}.activate.bias"] = 0.1 * r(cout)
        if up:
            sd[f"{name}.conv.blur.kernel"] = blur.clone()

    def torgb(name, cin, up):
        sd[f"{name}.conv.weight"] = r(1, 3, cin, 1, 1) * 0.3
        sd[f"{name}.conv.modulation.weight"] = r(cin, style_dim)
        sd[f"{name}.conv.modulation.bias"] = torch.ones(cin)
        sd[f"{name}.bias"] = 0.1 * r(1, 3, 1, 1)
        if up:
            sd[f"{name}.upsample.kernel"] = blur.clone()

    res_list = [2 ** i for i in range(2, int(np.log2(size)) + 1)]
    sd["input.input"] = r(1, widths[4], 4, 4)
    styled("conv1", widths[4], widths[4], False)
    torgb("to_rgb1", widths[4], False)
    for i, res in enumerate(res_list[1:]):
        styled(f"convs.{2 * i}", widths[res // 2], widths[res], True)
        styled(f"convs.{2 * i + 1}", widths[res], widths[res], False)
        torgb(f"to_rgbs.{i}", widths[res], True)
    for j in range(2 * len(res_list) - 1):
        res = 2 ** ((j + 5) // 2)
        sd[f"noises.noise_{j}"] = r(1, 1, res, res)
    return sd


TINY_WIDTHS = {4: 32, 8: 32, 16: 16, 32: 8}


def _write_rosinality(path, sd, latent_avg=None):
    ckpt = {"g": sd, "d": {"convs.0.0.weight": torch.randn(2)}, "g_ema": sd, "g_optim": {}, "d_optim": {},
            "args": argparse.Namespace(size=32, channel_multiplier=2, r1=10.0)}
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg
    torch.save(ckpt, path)


@pytest.mark.parametrize("psi", [1.0, 0.7])
def test_rosinality_checkpoint_matches_reference_math(tmp_path, psi):
    sd = _rosinality_state(32, 48, 3, TINY_WIDTHS)
    latent_avg = torch.randn(48) * 0.1
    path = tmp_path / "550000.pt"
    _write_rosinality(path, sd, latent_avg)
    G = load_generator(path)
    cfg = G.config
    assert (cfg.resolution, cfg.w_dim, cfg.mapping_layers, cfg.conv_clamp) == (32, 48, 3, None)
    assert [G.synthesis.b8.conv1.weight.shape[0], G.synthesis.b32.conv1.weight.shape[0]] == [32, 8]
    z = _z(3, 48)
    img = G.synthesis(G.mapping(z, psi), noise_mode="const")
    ref = reference_generate({**sd, "latent_avg": latent_avg}, "rosinality", 32, z, psi, conv_clamp=None)
    assert ref.std() > 0.05
    assert (img.double() - ref).abs().max() <= 1e-4


def test_rosinality_real_width_rule_and_missing_latent_avg(tmp_path):
    # widths are inferred from the tensors (channel_max from the 4 px block, channel_base from the last)
    sd = _rosinality_state(8, 16, 2, {4: 24, 8: 12})
    path = tmp_path / "no_avg.pt"
    _write_rosinality(path, sd)
    G = load_generator(path)
    assert G.config.channel_base == 12 * 8 and G.config.channel_max == 24
    # without a stored average, w_avg is the mean w of seeded z's: reproducible, and near the sample mean
    assert torch.equal(load_generator(path).w_avg, G.w_avg)
    sample = G.mapping(_z(4000, 16, seed=9)).mean(0)
    assert (sample - G.w_avg).norm() < 0.1 * G.w_avg.norm() + 0.05


def test_rosinality_blur_kernel_must_be_the_standard_filter(tmp_path):
    sd = _rosinality_state(8, 16, 2, {4: 8, 8: 8})
    sd["convs.0.conv.blur.kernel"] = torch.ones(4, 4) / 4
    path = tmp_path / "odd.pt"
    _write_rosinality(path, sd)
    with pytest.raises(WeightsError, match="blur"):
        load_generator(path)


def test_pt_with_other_pickled_classes_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"g_ema": {}, "x": _Payload(os.system, f"touch {marker}")}, path)
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        load_generator(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- deid safetensors


def test_convert_to_safetensors_roundtrip(tmp_path, nvidia_names, tiny_generator):
    pkl = tmp_path / "g.pkl"
    write_nvidia_pickle(pkl, tiny_generator, tmp_path / "m", _ada_kwargs(TINY_GENERATOR_CONFIG))
    out = convert_generator(pkl, tmp_path / "g.safetensors")
    from_pkl, from_st = load_generator(pkl), load_generator(out)
    assert from_st.config == from_pkl.config
    assert from_st.fingerprint == from_pkl.fingerprint  # content hash, independent of the file format
    z = _z(2, from_st.z_dim)
    assert torch.equal(from_st(z, 0.7), from_pkl(z, 0.7))
    assert read_state_dict(out).keys() == from_pkl.state_dict().keys()
    assert not list(tmp_path.glob(TEMPORARY_GLOB))


def test_plain_safetensors_without_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="not a deid generator"):
        load_generator(path)


def test_read_state_dict_still_reads_plain_files(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    assert torch.equal(read_state_dict(tmp_path / "a.pt")["w"], torch.ones(2))
