"""Losses against hand computations and independent references (pytorch-msssim, per-sample autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F

from deid.nets.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    identity_loss,
    landmark_loss,
    ms_ssim,
    ms_ssim_scales,
    pixel_mask,
    r1_penalty,
    reconstruction_loss,
)
from deid.nets.mapper import DiscriminatorConfig, LatentDiscriminator


def _pair(size, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=g, dtype=torch.float64)
    y = (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


def test_ms_ssim_equals_pytorch_msssim_at_five_scales():
    x, y = _pair(176)
    assert ms_ssim_scales(176) == 5
    # the reference builds its window in float32, hence the 1e-5 agreement in float64
    torch.testing.assert_close(ms_ssim(x, y), pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False),
                               rtol=1e-5, atol=1e-5)


def test_ms_ssim_with_one_scale_is_ssim():
    x, y = _pair(16, seed=1)
    assert ms_ssim_scales(16) == 1
    torch.testing.assert_close(ms_ssim(x, y), pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False),
                               rtol=1e-5, atol=1e-5)


def test_ms_ssim_scale_rule():
    assert [ms_ssim_scales(s) for s in (11, 20, 21, 32, 41, 64, 81, 160, 161, 256, 1024)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    with pytest.raises(ValueError):
        ms_ssim_scales(10)


def test_ms_ssim_two_scales_by_hand():
    """At 32 px: the two standard weights renormalised; contrast-structure at full size, SSIM at half size."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim  # the reference's per-scale terms

    x, y = _pair(32, seed=2)
    w0, w1 = 0.0448 / (0.0448 + 0.2856), 0.2856 / (0.0448 + 0.2856)
    win = _fspecial_gauss_1d(11, 1.5).repeat([3, 1, 1, 1])
    _, cs0 = _ssim(x, y, data_range=1.0, win=win, size_average=False)
    ssim1, _ = _ssim(F.avg_pool2d(x, 2), F.avg_pool2d(y, 2), data_range=1.0, win=win, size_average=False)
    expected = (torch.relu(cs0) ** w0 * torch.relu(ssim1) ** w1).mean(dim=1)
    torch.testing.assert_close(ms_ssim(x, y), expected, rtol=1e-5, atol=1e-5)


def _official_inverse_gaussian(size: int) -> np.ndarray:
    """utils/general_utils.py of the official code, restated in NumPy: gaussian_image then
    inverse_gaussian_image with sigma = int(80 * size / 256) (trainer.py)."""
    sigma = int(80 * (size / 256))
    kernel = 1
    for grid in np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)):
        kernel = kernel * 1 / (sigma * np.sqrt(2 * np.pi)) * np.exp(-((grid - (size - 1) / 2) / sigma) ** 2 / 2)
    gauss = kernel / np.sum(kernel)
    inverse = np.max(gauss) + np.min(gauss) - gauss
    return inverse / np.sum(inverse)


def _official_l1(target: np.ndarray, pred: np.ndarray) -> float:
    """Keras MeanAbsoluteError(reduction=SUM)(target, pred, sample_weight=mask) on NHWC images in [0, 1]:
    the mean over the last (channel) axis, times the mask broadcast to [N, H, W], summed."""
    per_pixel = np.abs(target - pred).mean(axis=-1)
    return float((per_pixel * np.broadcast_to(_official_inverse_gaussian(target.shape[1]), per_pixel.shape)).sum())


@pytest.mark.parametrize("size,batch", [(256, 6), (32, 3)])
def test_reconstruction_loss_is_the_official_formula(size, batch):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731 - the official layout
    loss = reconstruction_loss(x * 2 - 1, y * 2 - 1).item()
    l1 = _official_l1(nhwc(x), nhwc(y))
    # rel 1e-7: the official grid is float32
    assert loss - 0.84 * float((1 - ms_ssim(x, y)).mean()) == pytest.approx(0.16 * l1, rel=1e-7)
    if size > 160:  # the whole formula with the independent MS-SSIM (its float32 window: 1e-5 agreement)
        msssim = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
        assert loss == pytest.approx(0.84 * float((1 - msssim).mean()) + 0.16 * l1, abs=2e-5)
    assert reconstruction_loss(x * 2 - 1, x * 2 - 1).abs().item() < 1e-12
    # the plain mean is the former (paper-like) reading: uniform weights, averaged over the batch
    plain = 0.84 * (1 - ms_ssim(x, y)).mean() + 0.16 * (x - y).abs().mean()
    torch.testing.assert_close(reconstruction_loss(x * 2 - 1, y * 2 - 1, mask="uniform", reduction="mean"), plain)


def test_pixel_mask_weighs_the_face_less_than_the_corners():
    mask = pixel_mask(256)
    np.testing.assert_allclose(mask.numpy(), _official_inverse_gaussian(256), rtol=1e-5)  # official grid: float32
    assert mask.sum().item() == pytest.approx(1.0)
    assert (mask[0, 0] / mask[128, 128]).item() == pytest.approx(12.68, abs=0.01)
    with pytest.raises(ValueError):
        reconstruction_loss(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), mask="circle")


def test_landmark_loss_is_in_160_pixel_units_at_every_resolution():
    """The same displacement relative to the image gives the same loss at 64 and at 256 pixels, and 1% of
    the side is 1.6 units of the official 160-pixel image."""
    losses = []
    for side in (64, 256):
        ref = torch.rand(2, 68, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * side
        out = ref + 0.01 * side
        losses.append(landmark_loss(ref, out, image_side=side).item())
    assert losses[0] == pytest.approx(losses[1]) == pytest.approx(1.6**2)
    assert landmark_loss(ref, out, image_side=256, unit_side=None).item() == pytest.approx(2.56**2)


def test_identity_and_landmark_losses_by_hand():
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, -1.0, 0.5], [1.0, 2.0, 1.0]])
    assert identity_loss(a, b).item() == pytest.approx((1 + 1 + 0 + 1 + 2 + 0) / 6)
    ref = torch.zeros(1, 68, 2)
    out = torch.zeros(1, 68, 2)
    out[0, :17] = 100.0  # the jawline is not part of the loss
    assert landmark_loss(ref, out).item() == 0.0
    out[0, 30, 0] = 3.0
    out[0, 60, 1] = -4.0
    assert landmark_loss(ref, out).item() == pytest.approx((9 + 16) / (51 * 2))


def test_adversarial_losses_are_logistic():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected_d = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(generator_adversarial_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_r1_matches_per_sample_autograd_reference():
    torch.manual_seed(0)
    d = LatentDiscriminator(DiscriminatorConfig(w_dim=16)).double()
    w = torch.randn(5, 16, dtype=torch.float64)
    gamma = 10.0
    norms = []
    for i in range(5):
        wi = w[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(d(wi).sum(), wi)
        norms.append(g.pow(2).sum())
    reference = 0.5 * gamma * torch.stack(norms).mean()
    penalty = r1_penalty(d, w, gamma)
    torch.testing.assert_close(penalty, reference)
    # the penalty trains D: it has a gradient with respect to D's weights (not the last bias, which
    # does not change grad_w D)
    penalty.backward()
    linears = [m for m in d.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears)
