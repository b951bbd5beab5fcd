"""The training recipe as the official code runs it (docs/recipe.md): initialisers, E_attr's BatchNorm,
the robust soft-argmax, the calibrated crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from deid.nets.mapper import DiscriminatorConfig, LatentDiscriminator, LatentMapper, MapperConfig


def _linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _ks_pvalue(weights: torch.Tensor, distribution) -> float:
    return stats.kstest(weights.detach().double().flatten().numpy(), distribution.cdf).pvalue


def test_official_initialisers_draw_from_keras_distributions():
    """M: Glorot uniform for the first two layers, Keras VarianceScaling(2/(1+0.2^2), fan_in, truncated
    normal) for the last two; D_W: that variance scaling everywhere; all biases zero. Checked against the
    distributions themselves (Kolmogorov-Smirnov), with SciPy's truncnorm as the reference."""
    torch.manual_seed(0)
    mapper = LatentMapper(MapperConfig(id_dim=64, attr_dim=192, w_dim=64, hidden=(128, 96, 64)))
    torch.manual_seed(1)
    disc = LatentDiscriminator(DiscriminatorConfig(w_dim=64, hidden=(256, 128, 64)))
    scale = 2 / (1 + 0.2**2)
    for i, layer in enumerate(_linears(mapper) + _linears(disc)):
        fan_out, fan_in = layer.weight.shape
        assert torch.count_nonzero(layer.bias) == 0
        if i < 2:  # the mapper's first two
            limit = math.sqrt(6 / (fan_in + fan_out))
            reference = stats.uniform(loc=-limit, scale=2 * limit)
        else:
            # Keras: sigma = sqrt(scale/fan_in)/0.8796..., cut at +-2 sigma
            sigma = math.sqrt(scale / fan_in) / 0.87962566103423978
            reference = stats.truncnorm(-2, 2, scale=sigma)
            assert layer.weight.std().item() == pytest.approx(math.sqrt(scale / fan_in), rel=0.15 if layer.weight.numel() < 500 else 0.05)
        assert _ks_pvalue(layer.weight, reference) > 1e-3, f"layer {i} is not drawn from its initialiser"
    # PyTorch's defaults are a different distribution (uniform +-1/sqrt(fan_in), biases too): the test can fail
    torch.manual_seed(1)
    default = LatentDiscriminator(DiscriminatorConfig(w_dim=64, hidden=(256, 128, 64), initialiser="pytorch"))
    first = _linears(default)[0]
    assert _ks_pvalue(first.weight, stats.truncnorm(-2, 2, scale=math.sqrt(scale / 64) / 0.87962566103423978)) < 1e-6
    assert torch.count_nonzero(first.bias) > 0
    with pytest.raises(ValueError):
        LatentMapper(MapperConfig(initialiser="keras"))


# ------------------------------------------------------------------------------------- soft-argmax


def _gaussian_peaks(height: float, centres, side: int = 64, sigma: float = 1.5) -> torch.Tensor:
    """[1, K, side, side] heatmaps with a Gaussian bump of `height` at each (x, y) centre (cell units)."""
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    return torch.stack([height * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) for x, y in centres])[None]


CENTRES = [(10.3, 40.7), (60.2, 3.1), (0.7, 63.2), (32.0, 32.0)]


@pytest.mark.parametrize("height,tolerance", [(1.0, 0.2), (0.5, 0.1), (0.3, 0.35), (0.1, 1.2)])
def test_windowed_soft_argmax_finds_weak_and_strong_peaks(height, tolerance):
    """Within a fraction of a cell of the true peak for strong (1.0) and weak (0.1-0.5) peaks, edges
    included; over the whole map the same weak peaks are dragged many cells toward the centre."""
    from deid.nets.encoders import soft_argmax

    hm = _gaussian_peaks(height, CENTRES).requires_grad_(True)
    truth = torch.tensor(CENTRES)
    found = soft_argmax(hm, beta=20.0, radius=3)[0]
    assert (found - truth).norm(dim=-1).max().item() < tolerance
    whole = soft_argmax(hm, beta=20.0, radius=None)[0]
    if height <= 0.3:
        assert (whole - truth)[:3].norm(dim=-1).min().item() > 10
    # the gradient reaches only the window around each peak
    found[0, 0].backward()
    touched = hm.grad[0, 0].nonzero()
    assert len(touched) and (touched[:, 1] - 10).abs().max() <= 3 and (touched[:, 0] - 40).abs().max() <= 3


def test_crops_may_reach_beyond_the_image_and_are_padded_black():
    from deid.nets.encoders import _crop_resize, crop_pixels

    assert crop_pixels((-0.13, -0.13, 1.09, 1.08), 256, 256) == (-33, -33, 279, 276)
    assert crop_pixels((0.1, 0.9), 40, 40) == (4, 4, 36, 36)
    img = torch.rand(1, 3, 10, 10)
    out = _crop_resize(img, (-0.2, 0.0, 1.0, 1.2), 12, fill=0.0)  # 2 columns left, 2 rows below: exactly 12x12
    torch.testing.assert_close(out[..., :10, 2:], img)
    assert out[..., :, :2].abs().sum() == 0 and out[..., 10:, :].abs().sum() == 0


# ------------------------------------------------------------------------------------ crop calibration


@pytest.fixture(scope="module")
def aligned_boxes(astronaut_png, carphone):
    """MTCNN boxes (x0, y0, x1, y1, fractions of the side) on 256-pixel aligned real faces: the astronaut
    and carphone frames 0, 40, 80."""
    from deid.faces.alignment import align_photo
    from deid.faces.detection import FaceDetector
    from deid.media.images import load_image
    from deid.media.video import read_frames

    photos = [load_image(astronaut_png)] + [f.image for f in read_frames(carphone) if f.index in (0, 40, 80)]
    detector = FaceDetector()
    boxes = []
    for photo in photos:
        crop = align_photo(photo, 256, detector=detector).crop
        found = detector([crop])[0]
        boxes.append(found.boxes[found.largest()][:4] / 256)
    return np.array(boxes, dtype=np.float64)


def test_encoder_crops_are_calibrated_to_each_networks_own_framing(aligned_boxes):
    """Measured on 7 faces (astronaut, carphone frames 0, 20, ..., 100) when calibrated; mean MTCNN box on the
    aligned 256 head: (0.227, 0.219, 0.734, 0.895), std about 0.02. FAN's framing (face-alignment: side
    200 (w + h) / 195, centre 0.12 h above the box's) gives (-0.126, -0.131, 1.087, 1.082); facenet-pytorch's
    MTCNN margin of 32 at 160 gives (0.164, 0.134, 0.797, 0.980). This re-measures 4 of those faces."""
    from deid.nets.encoders import IdentityEncoderConfig, LandmarkEncoderConfig

    x0, y0, x1, y1 = aligned_boxes.T
    w, h = x1 - x0, y1 - y0
    side, cx, cy = 200 * (w + h) / 195, (x0 + x1) / 2, (y0 + y1) / 2 - 0.12 * h
    fan = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1).mean(0)
    margin_x, margin_y = w * 32 / 128 / 2, h * 32 / 128 / 2
    facenet = np.stack([x0 - margin_x, y0 - margin_y, x1 + margin_x, y1 + margin_y], 1).mean(0)
    np.testing.assert_allclose(LandmarkEncoderConfig().crop, fan, atol=0.04)
    np.testing.assert_allclose(IdentityEncoderConfig().crop, facenet, atol=0.04)
    # the former fixed 10%-90% crop showed FAN a face about 1.5 times larger than its own framing
    assert (fan[2] - fan[0]) / 0.8 == pytest.approx(1.5, abs=0.08)


def test_a_face_alignment_without_models_fan_is_refused_with_the_fix(monkeypatch):
    """face-alignment 1.3/1.4 have no face_alignment.models.fan; setup.cfg asks for >= 1.5."""
    import sys

    from deid.errors import DeidError
    from deid.nets.encoders import LandmarkEncoder, LandmarkEncoderConfig

    monkeypatch.setitem(sys.modules, "face_alignment.models.fan", None)  # as if the module did not exist
    with pytest.raises(DeidError, match=r"face-alignment>=1.5"):
        LandmarkEncoder(LandmarkEncoderConfig(source="random", modules=1, input_size=64))
