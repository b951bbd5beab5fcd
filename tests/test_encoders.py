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


def _pool_branches(encoder):
    """(block name, block, its pool branch's 1x1 convolution) of every Inception block with a 3x3 average pool."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    return [(name, block, block.branch_pool) for name, block in encoder.net.named_children()
            if isinstance(block, (InceptionA, InceptionC, InceptionE))]


@pytest.mark.parametrize("pooling, count_include_pad", [("keras", False), ("torchvision", True)])
def test_attribute_encoder_pool_branches_average_like_keras(pooling, count_include_pad):
    """Keras' AveragePooling2D(3, 1, 'same'), as in the official E_attr, averages the pixels inside the map only;
    torchvision's avg_pool2d(padding=1) also counts the zeros around it. Each pool branch's input is checked
    against a manual average of its block's input."""
    enc = AttributeEncoder(AttributeEncoderConfig(**{**ATTR_SMALL.__dict__, "pooling": pooling})).eval()
    seen = {}
    for name, block, conv in _pool_branches(enc):
        block.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__((name, "x"), args[0]))
        conv.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__((name, "pooled"), args[0]))
    with torch.no_grad():
        enc(_images(size=75))
    names = [name for name, _, _ in _pool_branches(enc)]
    assert names == ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7b", "Mixed_7c"]
    for name in names:
        x = seen[(name, "x")]
        expected = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=count_include_pad)
        torch.testing.assert_close(seen[(name, "pooled")], expected, rtol=1e-5, atol=1e-6, msg=name)
    # the two differ exactly at the border: a map's corner averages 4 pixels, not 4 pixels and 5 zeros
    x = seen[("Mixed_5b", "x")]
    assert not torch.allclose(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)[..., 0, 0],
                              F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)[..., 0, 0])


def test_attribute_encoder_reads_images_in_minus_one_to_one_without_imagenet_normalisation():
    """The Google weights expect [-1, 1] (Keras' preprocess_input, the official code): the first convolution must
    see the resized image itself, not (x - ImageNet mean) / std nor torchvision's transform_input."""
    enc = AttributeEncoder(ATTR_SMALL).eval()
    assert enc.net.transform_input is False
    seen = []
    enc.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    for value in (-1.0, 0.25, 1.0):  # a flat image keeps its value through any resize
        with torch.no_grad():
            enc(torch.full((1, 3, 40, 40), value))
        assert seen[-1].shape == (1, 3, 75, 75)
        torch.testing.assert_close(seen[-1], torch.full_like(seen[-1], value))
    images = _images(size=75)
    with torch.no_grad():
        enc(images)
    assert torch.equal(seen[-1], images)  # at the input size: the image as it is


def test_landmark_encoder_feeds_fan_rgb_in_zero_to_one(landmark_encoder):
    """face-alignment's FAN reads RGB in [0, 1]: the generator's [-1, 1] becomes (x + 1) / 2, and the part of FAN's
    crop beyond the image is black (0)."""
    seen = []
    handle = landmark_encoder.net.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        for value in (-1.0, 0.0, 0.6, 1.0):
            with torch.no_grad():
                landmark_encoder(torch.full((1, 3, 32, 32), value))
            x = seen[-1]
            assert x.shape == (1, 3, 64, 64)
            centre = x[..., 16:48, 16:48]  # inside the image whatever the crop's border
            torch.testing.assert_close(centre, torch.full_like(centre, (value + 1) / 2))
            assert float(x.min()) >= 0.0 and float(x.max()) <= (value + 1) / 2 + 1e-6
            assert torch.all(x[..., 0, :] < (value + 1) / 2 + 1e-6)
        assert float(seen[-1][..., 0, 0].max()) == 0.0  # the crop reaches beyond the image: padded black
    finally:
        handle.remove()


def test_models_recorded_before_the_pooling_field_keep_torchvisions_pooling():
    """A checkpoint trained with the padding counted must be rebuilt that way; new configs pool as Keras does."""
    import dataclasses

    from deid.nets.model import ModelConfig

    recorded = ModelConfig().to_dict()
    assert ModelConfig.from_dict(recorded).attributes.pooling == "keras"
    del recorded["attributes"]["pooling"]
    assert ModelConfig.from_dict(recorded).attributes.pooling == "torchvision"
    with pytest.raises(ValueError, match="pooling"):
        AttributeEncoder(dataclasses.replace(ATTR_SMALL, pooling="tf"))
