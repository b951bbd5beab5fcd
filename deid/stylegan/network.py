"""StyleGAN2 generator (mapping + synthesis, skip toRGB architecture) in plain PyTorch.

Parameter names and shapes are those of NVIDIA's published networks (`mapping.fc0.weight`,
`synthesis.b64.conv0.affine.bias`, ...), so an NVIDIA pickle loads by name; rosinality files are renamed on
reading (deid/stylegan/formats.py). Weights are stored raw and scaled at run time (equalized learning rate).

    G = load_generator("stylegan2-ffhq-256", device="cuda")      # or a .pkl / .pt / .safetensors path, or "random"
    w = G.mapping(z, truncation_psi=0.7)                          # z: [N, z_dim] -> w: [N, w_dim]
    img = G.synthesis(w, noise_mode="const")                      # -> [N, 3, R, R], about [-1, 1], float32

Precision: `G.to(torch.bfloat16)` (or float16 on CUDA) runs the convolutions in that dtype; styles,
demodulation and the image accumulator stay float32, and the output is float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deid.stylegan.config import NOISE_MODES, GeneratorConfig
from deid.stylegan.ops import (
    LRELU_GAIN,
    LRELU_SLOPE,
    DerivedWeights,
    add_noise_bias_lrelu,
    fir_filter,
    modulated_conv2d,
    normalize_2nd_moment,
    upsample2d,
)


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalized learning rate: y = x (W * lr/sqrt(in))^T + b * lr."""

    def __init__(self, in_features: int, out_features: int, lr_multiplier: float = 1.0, bias_init: float = 0.0,
                 lrelu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.lrelu = lrelu

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, in] float32 -> [N, out] float32 (computed in float32 whatever the parameters' dtype)."""
        x = torch.addmm(self.bias.float() * self.bias_gain, x.float(), self.weight.float().t() * self.weight_gain)
        if self.lrelu:
            x = F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN
        return x


class MappingNetwork(nn.Module):
    """z -> w: normalise z, then `mapping_layers` equalized linear layers with leaky ReLU; truncation toward w_avg."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.num_layers = config.mapping_layers
        features = [config.z_dim] + [config.w_dim] * config.mapping_layers
        for idx in range(config.mapping_layers):
            setattr(self, f"fc{idx}", EqualizedLinear(features[idx], features[idx + 1],
                                                      lr_multiplier=config.mapping_lr_multiplier, lrelu=True))
        self.register_buffer("w_avg", torch.zeros(config.w_dim))

    def forward(self, z: Tensor, truncation_psi: float = 1.0) -> Tensor:
        """z: [N, z_dim] -> w: [N, w_dim] float32; psi < 1 pulls w toward `w_avg` (w_avg + psi (w - w_avg))."""
        x = normalize_2nd_moment(z.float())
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if truncation_psi != 1:
            x = self.w_avg.float().lerp(x, truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x up-sampling), per-pixel noise, bias, leaky ReLU, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool,
                 conv_clamp: float | None):
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        if up:
            self.register_buffer("resample_filter", fir_filter())
        self.derived = DerivedWeights()
        self.fused: bool | None = None  # modulated_conv2d's evaluation; None: its choice by size

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "const") -> Tensor:
        """x: [N, in, R/2 or R, ...]; w: [N, w_dim] -> [N, out, R, R]."""
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, up=self.up, gain=LRELU_GAIN,
                             resample_filter=self.resample_filter if self.up else None, derived=self.derived,
                             fused=self.fused)
        noise = None
        if noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        elif noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device) * self.noise_strength
        return add_noise_bias_lrelu(x, self.bias, noise, self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to RGB, no demodulation; the style carries the equalized-lr gain 1/sqrt(in)."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int, conv_clamp: float | None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)
        self.derived = DerivedWeights()
        self.fused: bool | None = None  # as SynthesisLayer.fused

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """x: [N, in, R, R]; w: [N, w_dim] -> [N, img_channels, R, R] float32."""
        styles = self.affine(w) * self.weight_gain
        y = modulated_conv2d(x, self.weight, styles, demodulate=False, derived=self.derived, fused=self.fused).float()
        y = y + self.bias.float().reshape(1, -1, 1, 1)
        if self.conv_clamp is not None:
            y = y.clamp(-self.conv_clamp, self.conv_clamp)
        return y


class SynthesisBlock(nn.Module):
    """One resolution: (const | up-conv) + conv, and its toRGB added to the up-sampled image (skip architecture)."""

    def __init__(self, in_channels: int, out_channels: int, config: GeneratorConfig, resolution: int):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.register_buffer("resample_filter", fir_filter())
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, config.w_dim, resolution, up=True,
                                        conv_clamp=config.conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, config.w_dim, resolution, up=False,
                                    conv_clamp=config.conv_clamp)
        self.torgb = ToRGBLayer(out_channels, config.img_channels, config.w_dim, conv_clamp=config.conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str, dtype: torch.dtype):
        """ws: [N, num_conv + 1, w_dim] (the last one is toRGB's). Returns (features, float32 image)."""
        if self.in_channels == 0:
            x = self.const.to(dtype)[None].expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0], noise_mode)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
            x = self.conv1(x, ws[:, 1], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """w (broadcast or per layer) -> image, blocks b4 ... b{resolution}."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.resolutions = config.block_resolutions
        self.num_ws = config.num_ws
        self.w_dim = config.w_dim
        self.cpu_split_resolution = 64
        self.channels_last = False
        for res in self.resolutions:
            in_ch = config.channels(res // 2) if res > 4 else 0
            setattr(self, f"b{res}", SynthesisBlock(in_ch, config.channels(res), config, res))

    def set_channels_last(self, enabled: bool = True) -> "SynthesisNetwork":
        """Run on channels-last (NHWC) feature maps, the layout GPU tensor cores prefer, with every modulated conv
        as one shared convolution between per-sample scalings (a per-sample grouped convolution cannot run NHWC).
        The same maths: images agree with the default up to rounding. bench/suite.py measures whether it pays."""
        self.channels_last = enabled
        for layer in self.modules():
            if isinstance(layer, (SynthesisLayer, ToRGBLayer)):
                layer.fused = False if enabled else None
        return self

    def forward(self, w: Tensor, noise_mode: str = "const") -> Tensor:
        """w: [N, w_dim] (same w for every layer) or [N, num_ws, w_dim] -> image [N, C, R, R] float32, about [-1, 1]."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if w.ndim == 2:
            w = w[:, None].expand(-1, self.num_ws, -1)
        if w.ndim != 3 or w.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"w must be [N, {self.w_dim}] or [N, {self.num_ws}, {self.w_dim}], got {list(w.shape)}")
        w = w.float()
        dtype = self.b4.const.dtype
        x = img = None
        idx = 0
        for res in self.resolutions:
            block = getattr(self, f"b{res}")
            # a block's toRGB shares its w with the next block's first conv
            ws = w[:, idx: idx + block.num_conv + 1]
            if self.channels_last and x is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            if w.device.type == "cpu" and w.shape[0] > 1 and res >= self.cpu_split_resolution:
                # one sample at a time: the feature maps stay in cache (measured ~1.4x faster per image at 256 px)
                outs = [block(x[i:i + 1], img[i:i + 1], ws[i:i + 1], noise_mode, dtype) for i in range(w.shape[0])]
                x, img = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            else:
                x, img = block(x, img, ws, noise_mode, dtype)
            idx += block.num_conv
        return img


class Generator(nn.Module):
    """StyleGAN2 generator: `.mapping(z, truncation_psi)` and `.synthesis(w, noise_mode)`."""

    def __init__(self, config: GeneratorConfig, source: str = "random"):
        super().__init__()
        self.config = config
        self.source = source
        self.z_dim, self.w_dim = config.z_dim, config.w_dim
        self.resolution = config.resolution
        self.num_ws = config.num_ws
        self.mapping = MappingNetwork(config)
        self.synthesis = SynthesisNetwork(config)
        self._fingerprint: str | None = None

    @property
    def w_avg(self) -> Tensor:
        """Average w of the mapping network, [w_dim] (the truncation centre)."""
        return self.mapping.w_avg

    def forward(self, z: Tensor, truncation_psi: float = 1.0, noise_mode: str = "const") -> Tensor:
        """z: [N, z_dim] -> image [N, C, R, R] float32 in about [-1, 1]."""
        return self.synthesis(self.mapping(z, truncation_psi), noise_mode)

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the architecture and every tensor (float32, canonical names): the same network read
        from any file format gives the same fingerprint."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.config, self.state_dict())
        return self._fingerprint

    def _apply(self, fn, *args, **kwargs):
        self._fingerprint = None  # a dtype change (rounding) may change the content
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._fingerprint = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def state_fingerprint(config: GeneratorConfig, state: dict[str, Tensor]) -> str:
    """sha256 over the function-defining config fields and every tensor as float32 under canonical names."""
    arch = {k: v for k, v in dataclasses.asdict(config).items() if k != "num_fp16_res"}  # informational only
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def random_generator(config: GeneratorConfig, seed: int = 0) -> Generator:
    """A generator with seeded random weights (published initialisation, except: noise strengths are small
    non-zero so the noise modes differ, toRGB weights are scaled so images lie roughly in [-1, 1], and w_avg
    is the mean w of 4096 seeded z, as training would track it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        G = Generator(config, source="random")
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.copy_(0.05 + 0.1 * torch.rand([], generator=gen))
            elif name.endswith("affine.bias"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.startswith("mapping."):
                p.copy_(torch.randn(p.shape, generator=gen) / config.mapping_lr_multiplier)
            elif ".torgb.weight" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in G.named_buffers():
            if name.endswith("noise_const"):
                b.copy_(torch.randn(b.shape, generator=gen))
        z = torch.randn(4096, config.z_dim, generator=gen)
        G.mapping.w_avg.copy_(G.mapping(z).mean(dim=0))
    return G.eval().requires_grad_(False)
