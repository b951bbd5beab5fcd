"""Interpret generator files: NVIDIA pickles, rosinality `.pt`, deid `.safetensors` -> (GeneratorConfig, state).

The state dict uses deid's canonical (NVIDIA) names; see deid/stylegan/network.py. Variants that deid does not
implement (StyleGAN3 synthesis, conditional models, orig/resnet toRGB) are refused, never loaded wrong.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from deid.checkpoints import (
    PersistentObject,
    module_tensors,
    read_network_pickle,
    read_safetensors,
    read_torch_checkpoint,
)
from deid.errors import WeightsError
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.network import MappingNetwork
from deid.stylegan.ops import fir_filter

DEID_FORMAT = "deid-stylegan2"
STANDARD_FILTER = fir_filter()

# Synthesis settings of the NVIDIA code that we read (or that do not change the function computed).
_SYNTHESIS_KEYS = {"channel_base", "channel_max", "num_fp16_res", "conv_clamp", "architecture", "resample_filter",
                   "fp16_channels_last", "fused_modconv_default", "use_noise", "activation", "kernel_size"}
_MAPPING_KEYS = {"num_layers", "lr_multiplier", "w_avg_beta", "layer_features", "embed_features", "activation"}


def read_generator_file(path: str | Path) -> tuple[GeneratorConfig, dict[str, Tensor]]:
    """Dispatch on the file's kind (suffix, then magic bytes)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file. Give a generator file (.pkl, .pt, .safetensors) or a registry name.")
    suffix = "".join(path.suffixes[-1:]).lower()
    with open(path, "rb") as f:
        magic = f.read(8)
    if suffix == ".safetensors":
        return read_deid(path)
    if suffix == ".pkl" or (magic[:1] == b"\x80" and suffix not in (".pt", ".pth")):
        return read_nvidia(path)
    if magic[:2] == b"PK" or suffix in (".pt", ".pth"):
        return read_rosinality(path)
    raise WeightsError(f"{path}: unknown generator file kind. Use an NVIDIA .pkl, a rosinality .pt or a deid .safetensors.")


# ------------------------------------------------------------------------------------------ deid


def read_deid(path: Path) -> tuple[GeneratorConfig, dict[str, Tensor]]:
    tensors, meta = read_safetensors(path)
    if meta.get("format") != DEID_FORMAT or "config" not in meta:
        raise WeightsError(f"{path}: not a deid generator file (no '{DEID_FORMAT}' metadata). Convert a generator with "
                           "`deid weights import`.")
    return GeneratorConfig.from_json(meta["config"]), tensors


# ---------------------------------------------------------------------------------------- NVIDIA


def _refuse(path: Path, what: str) -> WeightsError:
    return WeightsError(f"{path}: {what}. deid supports unconditional StyleGAN2 generators with the skip toRGB "
                        "architecture (NVIDIA stylegan2-ada-pytorch / stylegan3-repo StyleGAN2 pickles, rosinality .pt).")


def read_nvidia(path: Path) -> tuple[GeneratorConfig, dict[str, Tensor]]:
    top = read_network_pickle(path)
    G = top.get("G_ema")
    if not isinstance(G, PersistentObject):
        raise _refuse(path, f"no G_ema network in the pickle (keys: {sorted(map(str, top))[:8]})")
    config = nvidia_config(path, G)
    state = module_tensors(G)
    for name in [n for n in state if n.endswith("resample_filter")]:
        f = state[name].float()
        if f.shape != STANDARD_FILTER.shape or not torch.allclose(f, STANDARD_FILTER, atol=1e-7):
            raise _refuse(path, f"{name} is not the standard [1,3,3,1] filter")
        if ".conv1." in name:  # the non-up-sampling layers carry an unused copy
            del state[name]
    _check_gains(path, G, config)
    return config, state


def nvidia_config(path: Path, G: PersistentObject) -> GeneratorConfig:
    """Every architecture setting from the top object's `_init_kwargs` (stylegan2-ada nests the synthesis
    settings in `synthesis_kwargs`; the stylegan3 repo passes them flat)."""
    if G.class_name != "Generator":
        raise _refuse(path, f"G_ema is a {G.class_name}, not a Generator")
    kw = dict(G.state.get("_init_kwargs") or {})
    args = G.state.get("_init_args") or ()
    if args:
        raise _refuse(path, "the generator was built with positional arguments deid cannot interpret")
    for key in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"):
        if key not in kw:
            raise _refuse(path, f"_init_kwargs lacks {key}")
    if kw["c_dim"]:
        raise _refuse(path, f"it is a conditional generator (c_dim={kw['c_dim']})")
    synthesis = G.modules.get("synthesis")
    if not isinstance(synthesis, PersistentObject) or "b4" not in synthesis.modules:
        raise _refuse(path, "its synthesis network is not StyleGAN2's (a StyleGAN3 generator?)")
    mapping_kw = dict(kw.get("mapping_kwargs") or {})
    synth_kw = dict(kw.get("synthesis_kwargs") or {})
    synth_kw.update({k: v for k, v in kw.items() if k not in
                     ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")})
    unknown = (set(synth_kw) - _SYNTHESIS_KEYS) | (set(mapping_kw) - _MAPPING_KEYS)
    if unknown:
        raise _refuse(path, f"it uses settings deid does not implement: {sorted(unknown)}")
    if synth_kw.get("architecture", "skip") != "skip":
        raise _refuse(path, f"its toRGB architecture is {synth_kw['architecture']!r}")
    if list(synth_kw.get("resample_filter", [1, 3, 3, 1])) != [1, 3, 3, 1]:
        raise _refuse(path, f"its resample filter is {synth_kw['resample_filter']}")
    if not synth_kw.get("use_noise", True) or synth_kw.get("kernel_size", 3) != 3 or synth_kw.get("activation", "lrelu") != "lrelu":
        raise _refuse(path, "its synthesis layers are not the standard ones (noise, 3x3, lrelu)")
    if mapping_kw.get("activation", "lrelu") != "lrelu":
        raise _refuse(path, f"its mapping activation is {mapping_kw['activation']!r}")
    if mapping_kw.get("layer_features") not in (None, kw["w_dim"]):
        raise _refuse(path, "its mapping layers are not w_dim wide")
    if mapping_kw.get("w_avg_beta", 0.995) is None:
        raise _refuse(path, "it does not track w_avg, so truncation is undefined")
    conv_clamp = synth_kw.get("conv_clamp")
    return GeneratorConfig(
        resolution=int(kw["img_resolution"]), z_dim=int(kw["z_dim"]), w_dim=int(kw["w_dim"]),
        mapping_layers=int(mapping_kw.get("num_layers", 8)),
        channel_base=int(synth_kw.get("channel_base", 32768)), channel_max=int(synth_kw.get("channel_max", 512)),
        conv_clamp=None if conv_clamp is None else float(conv_clamp), img_channels=int(kw["img_channels"]),
        mapping_lr_multiplier=float(mapping_kw.get("lr_multiplier", 0.01)),
        num_fp16_res=int(synth_kw.get("num_fp16_res", 0)),
    )


def _check_gains(path: Path, G: PersistentObject, config: GeneratorConfig) -> None:
    """The equalized-lr gains stored in the modules must be those the config implies; a mismatch means the
    kwargs were misread, and the images would be wrong."""
    fc0 = G.modules["mapping"].modules.get("fc0")
    expect = config.mapping_lr_multiplier / math.sqrt(config.z_dim)
    got = fc0.state.get("weight_gain") if isinstance(fc0, PersistentObject) else None
    if got is not None and not math.isclose(float(got), expect, rel_tol=1e-6):
        raise _refuse(path, f"mapping.fc0 weight_gain {got} differs from the expected {expect}")
    layer = G.modules["synthesis"].modules["b4"].modules.get("conv1")
    if isinstance(layer, PersistentObject) and "conv_clamp" in layer.state:
        got = layer.state["conv_clamp"]
        if (got is None) != (config.conv_clamp is None) or (got is not None and float(got) != config.conv_clamp):
            raise _refuse(path, f"layer conv_clamp {got} differs from _init_kwargs ({config.conv_clamp})")


# ------------------------------------------------------------------------------------ rosinality


def read_rosinality(path: Path) -> tuple[GeneratorConfig, dict[str, Tensor]]:
    ckpt = read_torch_checkpoint(path)
    sd = ckpt.get("g_ema", ckpt)
    if not isinstance(sd, dict) or "style.1.weight" not in sd or "input.input" not in sd:
        raise WeightsError(f"{path}: not a rosinality StyleGAN2 checkpoint (no g_ema with style.* and input.input). "
                           "Give the .pt written by rosinality's train.py or convert_weight.py.")
    config = rosinality_config(path, sd)
    state = rosinality_rename(sd, config)
    latent_avg = ckpt.get("latent_avg")
    if isinstance(latent_avg, Tensor) and latent_avg.numel() == config.w_dim:
        state["mapping.w_avg"] = latent_avg.reshape(-1).float()
    else:
        state["mapping.w_avg"] = estimate_w_avg(config, state)
    return config, state


def rosinality_config(path: Path, sd: dict[str, Tensor]) -> GeneratorConfig:
    """Size, style dim, mapping depth and widths, inferred from the tensors. rosinality's widths are 512 up to
    32 px and 256 * channel_multiplier at 64 px, halving after: channel_base = 16384 * multiplier, max 512. We
    read channel_max from the 4 px block and channel_base from the last one; the loader checks every shape."""
    n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
    style_dim = sd["style.1.weight"].shape[1]
    if any(f"style.{k}.weight" not in sd for k in range(1, n_mlp + 1)) or sd["style.1.weight"].shape[0] != style_dim:
        raise WeightsError(f"{path}: mapping layers are not a plain MLP of width {style_dim}; unsupported variant.")
    n_torgb = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
    size = 2 ** (n_torgb + 2)
    last = sd[f"to_rgbs.{n_torgb - 1}.conv.weight"].shape[2] if n_torgb else sd["to_rgb1.conv.weight"].shape[2]
    return GeneratorConfig(resolution=size, z_dim=style_dim, w_dim=style_dim, mapping_layers=n_mlp,
                           channel_base=int(last) * size, channel_max=int(sd["input.input"].shape[1]), conv_clamp=None,
                           img_channels=int(sd["to_rgb1.conv.weight"].shape[1]))


def _styled(sd, src: str, dst: str, noise: Tensor, out: dict) -> None:
    out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
    out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
    out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
    out[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape([])
    out[f"{dst}.bias"] = sd[f"{src}.activate.bias"]
    out[f"{dst}.noise_const"] = noise.reshape(noise.shape[-2:])


def _torgb(sd, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
    out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
    out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
    out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(-1)


def _blur_to_filter(kernel: Tensor, name: str) -> Tensor:
    """rosinality stores its blur kernels pre-multiplied by the up-sampling gain (4x NVIDIA's filter)."""
    f = kernel.float() / 4
    if f.shape != STANDARD_FILTER.shape or not torch.allclose(f, STANDARD_FILTER, atol=1e-7):
        raise WeightsError(f"{name} is not 4 x the [1,3,3,1] filter; unsupported blur kernel.")
    return f


def rosinality_rename(sd: dict[str, Tensor], config: GeneratorConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k in range(1, config.mapping_layers + 1):
        out[f"mapping.fc{k - 1}.weight"] = sd[f"style.{k}.weight"]
        out[f"mapping.fc{k - 1}.bias"] = sd[f"style.{k}.bias"]
    out["synthesis.b4.const"] = sd["input.input"][0]
    out["synthesis.b4.resample_filter"] = STANDARD_FILTER.clone()
    _styled(sd, "conv1", "synthesis.b4.conv1", sd["noises.noise_0"], out)
    _torgb(sd, "to_rgb1", "synthesis.b4.torgb", out)
    for i, res in enumerate(config.block_resolutions[1:]):
        b = f"synthesis.b{res}"
        _styled(sd, f"convs.{2 * i}", f"{b}.conv0", sd[f"noises.noise_{2 * i + 1}"], out)
        _styled(sd, f"convs.{2 * i + 1}", f"{b}.conv1", sd[f"noises.noise_{2 * i + 2}"], out)
        _torgb(sd, f"to_rgbs.{i}", f"{b}.torgb", out)
        out[f"{b}.conv0.resample_filter"] = _blur_to_filter(sd[f"convs.{2 * i}.conv.blur.kernel"], f"convs.{2 * i}")
        out[f"{b}.resample_filter"] = _blur_to_filter(sd[f"to_rgbs.{i}.upsample.kernel"], f"to_rgbs.{i}")
    return out


@torch.no_grad()
def estimate_w_avg(config: GeneratorConfig, state: dict[str, Tensor], n: int = 10000, seed: int = 0) -> Tensor:
    """Mean w over n seeded z, for checkpoints without a stored average (rosinality's train.py keeps none)."""

    mapping = MappingNetwork(config)
    mapping.load_state_dict({k[len("mapping."):]: v.float() for k, v in state.items()
                             if k.startswith("mapping.") and k != "mapping.w_avg"}, strict=False)
    z = torch.randn(n, config.z_dim, generator=torch.Generator().manual_seed(seed))
    return mapping(z).mean(dim=0)
