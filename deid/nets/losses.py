"""The training losses of the method (DESIGN.md §3), each a plain function of tensors.

Reductions follow the official code: means over every element, so the loss weights (λ_id = 1,
λ_lnd = 0.001, λ_rec = 0.02, λ_adv = 1) keep their meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The five-scale MS-SSIM weights of Wang et al. (2003).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
LANDMARK_POINTS = slice(17, 68)  # inner points: brows, nose, eyes, mouth (the jawline drags head shape)


def identity_loss(id_ref: Tensor, id_out: Tensor) -> Tensor:
    """L_id = mean |E_id(I_id) - E_id(I_out)| over batch and the 512 dimensions. [N, 512] x2 -> scalar."""
    return (id_ref - id_out).abs().mean()


def landmark_loss(lnd_ref: Tensor, lnd_out: Tensor) -> Tensor:
    """L_lnd = mean squared distance of landmarks 17-67, over batch, points and both coordinates.

    lnd_*: [N, 68, 2] in pixels of the generator image -> scalar."""
    d = lnd_ref[:, LANDMARK_POINTS] - lnd_out[:, LANDMARK_POINTS]
    return d.pow(2).mean()


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


def reconstruction_loss(target: Tensor, output: Tensor) -> Tensor:
    """L_rec = 0.84 (1 - MS-SSIM) + 0.16 L1, both on images mapped from [-1, 1] to [0, 1] (the mix of
    Zhao et al., as in the official code). [N, 3, R, R] x2 -> scalar, meaned over the batch."""
    a, b = (target + 1) * 0.5, (output + 1) * 0.5
    return 0.84 * (1 - ms_ssim(a, b, data_range=1.0)).mean() + 0.16 * (a - b).abs().mean()


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
    "identity_loss", "landmark_loss", "ms_ssim", "ms_ssim_scales", "reconstruction_loss",
    "generator_adversarial_loss", "discriminator_loss", "r1_penalty",
]
