"""StyleGAN2 building blocks as plain functions: modulated convolution and FIR up-sampling.

The conventions follow the published networks exactly (they decide whether pretrained weights reproduce the
published images): the 2x up-sampling convolution is a *transposed* convolution (a true convolution of the
zero-inserted input, so the kernel is not flipped as in `conv2d`), followed by the 4x4 low-pass filter
`outer([1,3,3,1]) / 64` scaled by 4 (the up-sampling gain).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' second moment through leaky ReLU (the published def_gain)
DEMOD_EPS = 1e-8


def fir_filter(taps=(1.0, 3.0, 3.0, 1.0)) -> Tensor:
    """The separable low-pass filter [K, K] (float32), normalised to sum 1."""
    f = torch.tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    """x: [N, C] -> x / RMS over C (the mapping network's input normalisation)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def can_write_inplace(*tensors: Tensor) -> bool:
    """In-place updates avoid allocating (and page-faulting) large activations, but autograd needs the
    originals when anything here requires grad."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def add_noise_bias_lrelu(x: Tensor, bias: Tensor, noise: Tensor | None, clamp: float | None) -> Tensor:
    """lrelu(x + noise + bias) then clamp, for x (the caller's own tensor) already scaled by LRELU_GAIN: the gain
    is folded into the conv (lrelu is positively homogeneous), so noise and bias get it here.
    x: [N, C, H, W]; bias: [C]; noise: broadcastable to x, or None."""
    b = (bias * LRELU_GAIN).to(x.dtype).reshape(1, -1, 1, 1)
    n = None if noise is None else (noise * LRELU_GAIN).to(x.dtype)
    if can_write_inplace(x, b) and (n is None or not n.requires_grad):
        x.add_(b)
        if n is not None:
            x.add_(n)
        F.leaky_relu_(x, LRELU_SLOPE)
        return x.clamp_(-clamp, clamp) if clamp is not None else x
    x = x + b if n is None else x + b + n
    x = F.leaky_relu(x, LRELU_SLOPE)
    return x.clamp(-clamp, clamp) if clamp is not None else x


def upsample2d(x: Tensor, f: Tensor) -> Tensor:
    """2x FIR up-sampling (zero insertion, then the filter with gain 4). x: [N, C, H, W] -> [N, C, 2H, 2W]."""
    c = x.shape[1]
    k = (f * 4).to(x.dtype)[None, None].expand(c, 1, *f.shape)
    pad = (f.shape[-1] - 2) // 2  # 1 for the 4-tap filter: crops the transposed output to exactly 2H
    return F.conv_transpose2d(x, k, stride=2, padding=pad, groups=c)


def blur_after_up_conv(x: Tensor, f: Tensor, size: int) -> Tensor:
    """The low-pass filter (gain 4) that follows the 3x3 up-sampling conv: x [N, C, >= 2H+1, >= 2W+1], the full
    transposed-conv output (2H+1 values, any further rows/columns zero) -> [N, C, size=2H, 2W]."""
    c = x.shape[1]
    k = (f * 4).to(x.dtype).flip([0, 1])[None, None].expand(c, 1, *f.shape)
    x = F.pad(x, (1, size + 2 - x.shape[3], 1, size + 2 - x.shape[2]))  # one zero in front, crop or pad behind
    return F.conv2d(x, k, groups=c)


# Output phase p (even/odd row or column) of a 3x3 stride-2 transposed conv reads input rows m-1 and m of the
# (1-padded) input with these kernel taps; index 3 is a zero tap.
_PHASE_TAPS = torch.tensor([[2, 0], [3, 1]])


def polyphase_weight(weight: Tensor) -> Tensor:
    """[O, I, 3, 3] transposed-conv kernel -> [4 O, I, 2, 2] ordinary conv kernel, channel o*4 + 2*row_phase +
    col_phase, so that conv2d(pad(x, 1), K) followed by pixel_shuffle(2) equals conv_transpose2d(x, W, stride=2)
    (plus one trailing zero row and column). For narrow layers an ordinary conv is faster on the CPU."""
    o, i = weight.shape[:2]
    wz = F.pad(weight, (0, 1, 0, 1))  # [O, I, 4, 4], last row/column zero
    taps = _PHASE_TAPS.to(weight.device)
    k = wz[:, :, taps][..., taps]  # [O, I, row_phase, r, 4] -> [O, I, row_phase, r, col_phase, c]
    return k.permute(0, 2, 4, 1, 3, 5).reshape(o * 4, i, 2, 2)


# Below this many output channels per group, the polyphase form of the up-sampling conv is faster on the
# CPU than oneDNN's transposed conv (measured: 64 channels at 256 px ~1.4x faster, 256+ channels slower).
POLYPHASE_MAX_CHANNELS = 64


def up_conv(x: Tensor, weight: Tensor, groups: int, resample_filter: Tensor, polyphase: Tensor | None = None) -> Tensor:
    """2x up-sampling 3x3 conv (transposed conv, then the FIR filter).
    x: [N', I*groups, H, W]; weight: [O*groups, I, 3, 3] -> [N', O*groups, 2H, 2W]; `polyphase`: the
    precomputed polyphase_weight(weight), if any."""
    size = 2 * x.shape[2]
    o, i = weight.shape[0] // groups, weight.shape[1]
    if o <= POLYPHASE_MAX_CHANNELS:
        k4 = polyphase if polyphase is not None else polyphase_weight(weight)
        y = F.pixel_shuffle(F.conv2d(F.pad(x, (1, 1, 1, 1)), k4, groups=groups), 2)
    else:
        wt = weight.reshape(groups, o, i, 3, 3).transpose(1, 2).reshape(groups * i, o, 3, 3)
        y = F.conv_transpose2d(x, wt, stride=2, groups=groups)
    return blur_after_up_conv(y, resample_filter, size)


def demod_coefficients(weight_sq: Tensor, styles: Tensor) -> Tensor:
    """1 / ||weight * style|| per (sample, output channel). weight_sq: [O, I] = sum over the kernel of weight^2;
    styles: [N, I] -> [N, O] (float32). Uses sum_ik (w_oik s_ni)^2 = sum_i s_ni^2 sum_k w_oik^2."""
    return (styles.float().square() @ weight_sq.float().t() + DEMOD_EPS).rsqrt()


class DerivedWeights:
    """Tensors derived from a layer's weight (kernel energy, polyphase kernel), recomputed only when the weight
    changes (new storage, in-place update, dtype or device) or the inference mode does: values made under
    torch.inference_mode() are inference tensors, which autograd refuses later (e.g. training after sampling)."""

    def __init__(self):
        self._key, self._values = None, {}

    def get(self, weight: Tensor, name: str, make) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.requires_grad,
               torch.is_inference_mode_enabled())
        if key != self._key or weight.requires_grad:
            self._key, self._values = key, {}
        if name not in self._values:
            self._values[name] = make(weight)
        return self._values[name]


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, up: bool = False,
                     resample_filter: Tensor | None = None, gain: float = 1.0, fused: bool | None = None,
                     derived: DerivedWeights | None = None) -> Tensor:
    """StyleGAN2 modulated (and demodulated) convolution, 'same' padding, output scaled by `gain`.

    x: [N, I, H, W] in the compute dtype; weight: [O, I, k, k] (raw, without gain: demodulation cancels it);
    styles: [N, I] float32 (already scaled by the caller where no demodulation follows).
    Returns [N, O, H, W], or [N, O, 2H, 2W] when `up` (transposed conv + FIR filter `resample_filter`).

    Two evaluations, equal in exact arithmetic: `fused` builds one weight per sample (a grouped conv); the
    other scales the activations before and after one shared conv. Default: whichever touches fewer numbers
    (fused where the feature maps are larger than the kernels, i.e. at high resolution).
    """
    n, i = styles.shape
    o, _, kh, kw = weight.shape
    dtype = x.dtype
    derived = derived or DerivedWeights()
    if fused is None:
        fused = o * kh * kw < x.shape[2] * x.shape[3]
    if fused:
        w = weight.float()[None] * styles.float()[:, :, None, None][:, None]  # [N, O, I, k, k]
        if demodulate:
            w = w * ((w.square().sum(dim=[2, 3, 4]) + DEMOD_EPS).rsqrt() * gain)[:, :, None, None, None]
        elif gain != 1:
            w = w * gain
        x = x.reshape(1, n * i, *x.shape[2:])
        if up:
            x = up_conv(x, w.reshape(n * o, i, kh, kw).to(dtype), n, resample_filter)
        else:
            x = F.conv2d(x, w.reshape(n * o, i, kh, kw).to(dtype), padding=kh // 2, groups=n)
        return x.reshape(n, o, *x.shape[2:])

    if demodulate and dtype == torch.float16:
        # demodulation cancels any per-sample style scale; unit-max styles keep fp16 conv sums in range
        styles = styles / styles.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
    x = x * styles.to(dtype)[:, :, None, None]
    w = derived.get(weight, f"w_{dtype}", lambda w: w.to(dtype))
    if up:
        poly = derived.get(weight, f"polyphase_{dtype}", lambda w: polyphase_weight(w.to(dtype))) \
            if o <= POLYPHASE_MAX_CHANNELS else None
        x = up_conv(x, w, 1, resample_filter, poly)
    else:
        x = F.conv2d(x, w, padding=kh // 2)
    if demodulate:
        wsq = derived.get(weight, "sq", lambda w: w.float().square().sum(dim=[2, 3]))
        scale = demod_coefficients(wsq, styles) * gain
    elif gain != 1:
        scale = torch.full((n, o), gain, device=x.device)
    else:
        return x
    scale = scale.to(dtype)[:, :, None, None]
    return x.mul_(scale) if can_write_inplace(x, scale) else x * scale
