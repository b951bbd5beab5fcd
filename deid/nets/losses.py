"""The training losses of the method (DESIGN.md §3), each a plain function of tensors.

Reductions and units follow the official code (trainer.py, docs/recipe.md), so the loss weights
(λ_id = 1, λ_lnd = 0.001, λ_rec = 0.02, λ_adv = 1) keep their meaning: means over every element, except the
L1 half of the reconstruction loss (an inverse-Gaussian-weighted sum over pixels and batch) and the landmark
distances (in 160-pixel units at every resolution).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The five-scale MS-SSIM weights of Wang et al. (2003).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
LANDMARK_POINTS = slice(17, 68)  # inner points: brows, nose, eyes, mouth (the jawline drags head shape)
LANDMARK_UNIT_SIDE = 160  # the official landmark network sees every image resized to 160x160
PIXEL_MASKS = ("gaussian", "uniform")  # the official --pixel_mask_type choices
PIXEL_REDUCTIONS = ("sum", "mean")  # over the batch: official Keras SUM, or a per-image mean


def identity_loss(id_ref: Tensor, id_out: Tensor) -> Tensor:
    """L_id = mean |E_id(I_id) - E_id(I_out)| over batch and the 512 dimensions. [N, 512] x2 -> scalar."""
    return (id_ref - id_out).abs().mean()


def landmark_loss(lnd_ref: Tensor, lnd_out: Tensor, image_side: int | None = None,
                  unit_side: int | None = LANDMARK_UNIT_SIDE) -> Tensor:
    """L_lnd = mean squared distance of landmarks 17-67, over batch, points and both coordinates.

    lnd_*: [N, 68, 2] in pixels of an image `image_side` pixels wide -> scalar. Distances are measured in
    pixels of a `unit_side`-pixel image (the official 160 at every resolution), so λ_lnd weighs the same
    relative displacement equally at 256 and at 1024. Without image_side (or unit_side None) the input's own
    pixels are used."""
    d = lnd_ref[:, LANDMARK_POINTS] - lnd_out[:, LANDMARK_POINTS]
    if image_side and unit_side:
        d = d * (unit_side / image_side)
    return d.pow(2).mean()


# ------------------------------------------------------------------------------------- pixel mask


def mask_sigma(side: int) -> int:
    """The official pixel mask's σ: int(80 · side / 256), so 80 at 256 and 320 at 1024."""
    return int(80 * side / 256)


@functools.lru_cache(maxsize=8)
def pixel_mask(side: int, kind: str = "gaussian") -> Tensor:
    """The reconstruction L1's per-pixel weights, [side, side] float64 summing to 1 (cached; do not modify).

    "gaussian" (official default): a 2-D Gaussian g with σ = `mask_sigma(side)` centred at
    ((side-1)/2, (side-1)/2), normalised to sum 1, inverted as max(g) + min(g) - g and normalised again: a
    corner weighs ~12.7 times the centre at 256, so the L1 looks mostly at hair and background, which the
    identity loss and MS-SSIM cover less. "uniform": 1/side² everywhere."""
    if kind == "uniform":
        return torch.full((side, side), 1.0 / side**2, dtype=torch.float64)
    if kind != "gaussian":
        raise ValueError(f"pixel mask {kind!r}: expected one of {PIXEL_MASKS}")
    sigma = mask_sigma(side)
    if sigma <= 0:
        raise ValueError(f"the Gaussian pixel mask needs images of at least 4 pixels a side, got {side}")
    coords = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    g1 = torch.exp(-(coords / sigma).pow(2) / 2)
    g = torch.outer(g1, g1)
    g = g / g.sum()
    inverse = g.max() + g.min() - g
    return inverse / inverse.sum()


# ------------------------------------------------------------------------------------------ MS-SSIM


def ms_ssim_scales(side: int, window: int = SSIM_WINDOW) -> int:
    """How many MS-SSIM scales an image of this (smaller) side supports.

    Rule: the most of the standard five for which the coarsest scale still exceeds the 11-pixel window
    scaled the way pytorch-msssim checks it, side > (window - 1) * 2**(scales - 1). 5 scales from 161
    pixels up (256 gets the standard MS-SSIM), 2 scales at 32, 1 at 11-20."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side > (window - 1) * 2 ** scales:
        scales += 1
    if side < window:
        raise ValueError(f"MS-SSIM needs images of at least {window} pixels a side, got {side}.")
    return scales


def _gaussian_blur_valid(x: Tensor, kernel: Tensor) -> Tensor:
    """Separable Gaussian filter without padding ('valid'), per channel. x: [N, C, H, W]."""
    c, k = x.shape[1], kernel.numel()
    x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0, scales: int | None = None) -> Tensor:
    """Multi-scale SSIM per image, [N, C, H, W] x2 -> [N] (1 = identical).

    Gaussian window 11, sigma 1.5, K = (0.01, 0.03); `scales` defaults to `ms_ssim_scales(min(H, W))`, and
    the standard weights of the scales used are renormalised to sum to 1. With five scales this equals
    pytorch-msssim's `ms_ssim`, which refuses images of 160 pixels or less."""
    scales = scales or ms_ssim_scales(min(x.shape[-2:]))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    coords = torch.arange(SSIM_WINDOW, dtype=x.dtype, device=x.device) - SSIM_WINDOW // 2
    kernel = torch.exp(-coords.pow(2) / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    factors = []
    for level in range(scales):
        mu_x, mu_y = _gaussian_blur_valid(x, kernel), _gaussian_blur_valid(y, kernel)
        var_x = _gaussian_blur_valid(x * x, kernel) - mu_x.pow(2)
        var_y = _gaussian_blur_valid(y * y, kernel) - mu_y.pow(2)
        cov = _gaussian_blur_valid(x * y, kernel) - mu_x * mu_y
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        if level < scales - 1:
            factors.append(torch.relu(cs.flatten(2).mean(-1)))  # [N, C] contrast-structure
            pad = [s % 2 for s in x.shape[-2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
        else:
            luminance = (2 * mu_x * mu_y + c1) / (mu_x.pow(2) + mu_y.pow(2) + c1)
            factors.append(torch.relu((luminance * cs).flatten(2).mean(-1)))  # [N, C] full SSIM
    stacked = torch.stack(factors)  # [scales, N, C]
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean(dim=1)


def reconstruction_loss(target: Tensor, output: Tensor, *, mask: str = "gaussian", reduction: str = "sum") -> Tensor:
    """L_rec = 0.84 mean(1 - MS-SSIM) + 0.16 L1 on images mapped from [-1, 1] to [0, 1] (the mix of Zhao et
    al.), as the official trainer computes it. [N, 3, R, R] x2 -> scalar.

    The L1 is Keras' `MeanAbsoluteError(reduction=SUM)` with `sample_weight=pixel_mask`: per pixel the mean
    over the 3 channels of |target - output|, weighted by `pixel_mask(R, mask)` (which sums to 1 over an
    image) and summed over the pixels and the batch, so at batch 6 it is six times a per-image weighted
    mean. reduction="mean" divides by the batch size instead; mask="uniform", reduction="mean" is the plain
    mean absolute error."""
    if reduction not in PIXEL_REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: expected one of {PIXEL_REDUCTIONS}")
    a, b = (target + 1) * 0.5, (output + 1) * 0.5
    weights = pixel_mask(a.shape[-1], mask).to(device=a.device, dtype=a.dtype)
    l1 = (weights * (a - b).abs().mean(dim=1)).sum()
    if reduction == "mean":
        l1 = l1 / a.shape[0]
    return 0.84 * (1 - ms_ssim(a, b, data_range=1.0)).mean() + 0.16 * l1


# -------------------------------------------------------------------------------------- adversarial


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating: mean softplus(-D(M(z))) = -log sigmoid. [N] -> scalar."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Logistic loss of D_W: mean softplus(-D(w_real)) + mean softplus(D(w_fake)). [N] x2 -> scalar."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def r1_penalty(discriminator: nn.Module, real_w: Tensor, gamma: float = 10.0) -> Tensor:
    """R1 = 0.5 * gamma * mean over the batch of |grad_w D(w)|^2 at real w. [N, w_dim] -> scalar.

    The graph is kept (create_graph) so the penalty trains D."""
    w = real_w.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(w).sum(), w, create_graph=True)
    return 0.5 * gamma * grad.pow(2).sum(dim=1).mean()


__all__ = [
    "identity_loss", "landmark_loss", "ms_ssim", "ms_ssim_scales", "pixel_mask", "mask_sigma", "reconstruction_loss",
    "generator_adversarial_loss", "discriminator_loss", "r1_penalty",
]
