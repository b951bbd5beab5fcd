"""The three encoders: published weight formats, input conventions, soft-argmax landmarks, frozenness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deid.errors import WeightsError
from deid.nets.encoders import (
    AttributeEncoder,
    AttributeEncoderConfig,
    IdentityEncoder,
    IdentityEncoderConfig,
    LandmarkEncoder,
    LandmarkEncoderConfig,
    weights_fingerprint,
)

# the official code's 10%-90% crop (a pair: the same fraction of both axes), checked by hand below
ID_SMALL = IdentityEncoderConfig(source="random", seed=1, input_size=80, crop=(0.1, 0.9))
ATTR_SMALL = AttributeEncoderConfig(source="random", seed=2, input_size=75)
LND_SMALL = LandmarkEncoderConfig(source="random", seed=3, modules=1, input_size=64)


@pytest.fixture(scope="module")
def identity_encoder():
    return IdentityEncoder(ID_SMALL)


@pytest.fixture(scope="module")
def landmark_encoder():
    return LandmarkEncoder(LND_SMALL)


def _images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identity_codes_are_unit_length_and_use_facenet_scaling_on_the_central_crop(identity_encoder):
    img = _images(size=40)
    codes = identity_encoder(img)
    assert codes.shape == (2, 512)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2))
    # hand reference: rows/cols 4..35 (10%-90% of 40), resized to 80, (x*255 - 127.5)/128 from [0, 255]
    crop = img[:, :, 4:36, 4:36]
    x = F.interpolate(crop, size=(80, 80), mode="bilinear", align_corners=False, antialias=True)
    pixels = (x + 1) * 127.5
    ref = F.normalize(identity_encoder.net((pixels - 127.5) / 128.0), dim=1)
    torch.testing.assert_close(codes, ref, atol=1e-5, rtol=1e-5)


def test_identity_ignores_the_border_outside_the_fixed_crop(identity_encoder):
    img = _images(size=40)
    changed = img.clone()
    changed[:, :, :4] = -1.0  # top 10% rows
    changed[:, :, :, 36:] = 1.0  # right 10% columns
    torch.testing.assert_close(identity_encoder(img), identity_encoder(changed))
    changed[:, :, 20, 20] += 0.5  # inside the crop: the code must move
    assert not torch.allclose(identity_encoder(img), identity_encoder(changed))


def test_identity_encoder_is_frozen_but_passes_gradients(identity_encoder):
    identity_encoder.train()
    assert not identity_encoder.training and not identity_encoder.net.training
    assert not any(p.requires_grad for p in identity_encoder.parameters())
    img = _images().requires_grad_(True)
    identity_encoder(img).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_identity_loads_the_published_facenet_file_and_drops_its_classifier(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(5)
    published = InceptionResnetV1(classify=True, num_classes=8631)  # the VGGFace2 file carries logits.*
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(published.state_dict(), path)
    enc = IdentityEncoder(IdentityEncoderConfig(source=str(path), input_size=80))
    for name, value in enc.net.state_dict().items():
        torch.testing.assert_close(value, published.state_dict()[name])
    bad = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="not a facenet"):
        IdentityEncoder(IdentityEncoderConfig(source=str(bad)))


def test_random_sources_are_seeded_and_reproducible():
    a, b = IdentityEncoder(ID_SMALL), IdentityEncoder(ID_SMALL)
    c = IdentityEncoder(IdentityEncoderConfig(source="random", seed=9, input_size=80))
    assert weights_fingerprint(a) == weights_fingerprint(b) != weights_fingerprint(c)


def test_attribute_encoder_loads_torchvision_inception_file_and_trains(tmp_path):
    from torchvision.models import inception_v3

    published = inception_v3(weights=None, aux_logits=True, init_weights=False)  # the ImageNet file's layout
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(published.state_dict(), path)
    enc = AttributeEncoder(AttributeEncoderConfig(source=str(path), input_size=75))
    torch.testing.assert_close(enc.net.Conv2d_1a_3x3.conv.weight, published.Conv2d_1a_3x3.conv.weight)
    assert not any(k.startswith(("fc.", "AuxLogits.")) for k in enc.net.state_dict())
    enc.train()
    codes = enc(_images(size=32))
    assert codes.shape == (2, 2048)
    codes.pow(2).mean().backward()
    # BatchNorm in inference mode (the official default): its scale is frozen, the rest trains
    frozen = {id(bn.weight) for bn in enc.batchnorms()}
    assert len(frozen) == 94 and not any(bn.training for bn in enc.batchnorms())
    assert all((p.grad is not None) == (id(p) not in frozen) for p in enc.parameters())


def test_soft_argmax_lands_on_a_synthetic_heatmap_peak(monkeypatch):
    # A 16x16 heatmap (64-pixel FAN input) with landmark k peaked at column 3+k%10, row 5.
    hm = torch.zeros(1, 68, 16, 16)
    for k in range(68):
        hm[0, k, 5, 3 + k % 10] = 1.0
    enc = LandmarkEncoder(LandmarkEncoderConfig(source="random", modules=1, input_size=64, beta=1000.0, crop=(0.1, 0.9)))
    monkeypatch.setattr(enc, "heatmaps", lambda img: hm)
    img = torch.zeros(1, 3, 40, 40)
    pts = enc(img)
    # cell centre (c + 0.5) of a 16-cell map over the 10%-90% crop (pixels 4..36, 32 wide): 4 + (c + 0.5) * 2
    expected_x = torch.tensor([4 + (3 + k % 10 + 0.5) * 2 for k in range(68)])
    torch.testing.assert_close(pts[0, :, 0], expected_x)
    torch.testing.assert_close(pts[0, :, 1], torch.full((68,), 4 + 5.5 * 2))


def test_landmarks_are_differentiable_and_frozen(landmark_encoder):
    img = _images(size=32).requires_grad_(True)
    pts = landmark_encoder(img)
    assert pts.shape == (2, 68, 2)
    # inside FAN's crop, which reaches beyond the 32-pixel image: -0.13 * 32 .. 1.09 * 32
    assert (pts >= -4).all() and (pts <= 35).all()
    pts[:, 17:].sum().backward()
    assert img.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in landmark_encoder.parameters())


def test_landmark_encoder_loads_a_fan_state_dict(tmp_path):
    from face_alignment.models.fan import FAN

    torch.manual_seed(3)
    published = FAN(1)
    path = tmp_path / "2DFAN-1.pth.tar"
    torch.save(published.state_dict(), path)
    enc = LandmarkEncoder(LandmarkEncoderConfig(source=str(path), modules=1, input_size=64))
    assert weights_fingerprint(enc.net) == weights_fingerprint(published)
    with pytest.raises(WeightsError, match="FAN"):
        LandmarkEncoder(LandmarkEncoderConfig(source=str(path), modules=2, input_size=64))
