"""The three image encoders of the method: identity (frozen FaceNet), attributes (trainable InceptionV3)
and landmarks (frozen FAN with a differentiable soft-argmax).

Each takes generator-sized images [N, 3, R, R] in [-1, 1] (any R) and does its own crop, resize and
normalisation, so callers never need to know a network's input convention. Weights come from a *source*
(registry name, file, or `random` for seeded random weights) through `deid.weights.resolve`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception_v3

from deid.checkpoints import read_state_dict
from deid.errors import WeightsError
from deid.weights import resolve

# ---------------------------------------------------------------------------------------- helpers


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 hex of a module's parameters and buffers (names, dtypes, shapes, values), independent of the
    file format they were read from. Two modules with equal fingerprints compute the same function."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def seeded(build, seed: int) -> nn.Module:
    """Build a module with the default initialisers driven by `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load_weights(module: nn.Module, source: str, drop_prefixes: tuple[str, ...], what: str) -> None:
    """Load `source` (registry name or file) into `module`, ignoring keys under `drop_prefixes`."""

    path = resolve(source)
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(drop_prefixes)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not a {what} state dict ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}). Give the published file (`deid weights list`) or 'random'."
        )


def _crop_resize(img: Tensor, crop: tuple[float, float], size: int) -> Tensor:
    """Keep the fraction [crop[0], crop[1]) of each axis of [N, C, H, W] and resize it to size x size."""
    h, w = img.shape[-2:]
    y0, y1 = round(crop[0] * h), round(crop[1] * h)
    x0, x1 = round(crop[0] * w), round(crop[1] * w)
    img = img[..., y0:y1, x0:x1]
    if img.shape[-2:] == (size, size):
        return img
    # antialias keeps downscaling (256 -> 160) from aliasing; it is differentiable like plain bilinear
    return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class FrozenModule(nn.Module):
    """A network that never trains: parameters need no grad and it stays in eval mode (BatchNorm uses its
    running statistics) whatever `.train()` is called with. Gradients still flow to its input."""

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: ARG002 - frozen networks ignore the mode on purpose
        return super().train(False)


# ---------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class IdentityEncoderConfig:
    source: str = "facenet-vggface2"  # registry name, file, or "random"
    seed: int = 0  # only for "random"
    input_size: int = 160  # FaceNet's input side
    # Fixed central face region of the aligned head, as fractions of each axis. The FFHQ-style head crop
    # leaves hair and background around the face; the official code keeps 10%-90% of each axis before its
    # own resize, and so do we, so the recogniser sees mostly face as it did in training.
    crop: tuple[float, float] = (0.1, 0.9)


class IdentityEncoder(FrozenModule):
    """E_id: facenet-pytorch InceptionResnetV1 (VGGFace2), frozen.

    forward(img [N, 3, R, R] in [-1, 1]) -> [N, 512], L2-normalised. The image is cropped to
    `config.crop` of each axis, resized to input_size and scaled as FaceNet expects, (x*255 - 127.5)/128,
    which from [-1, 1] is x * 127.5/128.
    """

    dim = 512

    def __init__(self, config: IdentityEncoderConfig = IdentityEncoderConfig()):
        super().__init__()
        # lazy: facenet-pytorch is imported only when E_id is built (slow import)
        from facenet_pytorch import InceptionResnetV1

        self.config = config
        self.net = seeded(lambda: InceptionResnetV1(classify=False), config.seed)
        if config.source != "random":
            # the published file also holds the VGGFace2 classifier (`logits.*`), which embeddings never use
            _load_weights(self.net, config.source, ("logits.",), "facenet InceptionResnetV1")
        self.freeze()

    def forward(self, img: Tensor) -> Tensor:
        x = _crop_resize(img, self.config.crop, self.config.input_size) * (127.5 / 128.0)
        return F.normalize(self.net(x), p=2, dim=1)


# -------------------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class AttributeEncoderConfig:
    source: str = "inception-v3-imagenet"  # initial weights: registry name, file, or "random"
    seed: int = 0  # only for "random"
    input_size: int = 299  # InceptionV3's input side (75 is the smallest it accepts)


class AttributeEncoder(nn.Module):
    """E_attr: torchvision InceptionV3 trunk, trainable, classifier removed.

    forward(img [N, 3, R, R] in [-1, 1]) -> [N, 2048], the global-average-pooled last feature map. The
    Google-trained weights expect inputs in [-1, 1] (torchvision's `transform_input` only converts
    ImageNet-normalised input to that), so the image is resized and fed as it is. No dropout: the code
    is a feature, not a classifier input.
    """

    dim = 2048

    def __init__(self, config: AttributeEncoderConfig = AttributeEncoderConfig(), initialise: bool = True):
        """initialise=False skips the (slow) initial weights when a checkpoint's weights will be loaded."""
        super().__init__()

        self.config = config
        random_init = initialise and config.source == "random"
        self.net = seeded(
            lambda: inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=random_init),
            config.seed,
        )
        self.net.fc = nn.Identity()
        self.net.dropout = nn.Identity()
        if initialise and config.source != "random":
            _load_weights(self.net, config.source, ("AuxLogits.", "fc."), "torchvision inception_v3")

    def forward(self, img: Tensor) -> Tensor:
        size = self.config.input_size
        x = img if img.shape[-2:] == (size, size) else F.interpolate(
            img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.net(x)


# --------------------------------------------------------------------------------------- landmarks


@dataclass(frozen=True)
class LandmarkEncoderConfig:
    source: str = "fan-2d"  # registry name, file, or "random"
    seed: int = 0  # only for "random"
    modules: int = 4  # stacked hourglasses: the published 2DFAN4 has 4 (tests use 1)
    input_size: int = 256  # FAN's crop side; its heatmaps are a quarter of it
    # FAN was trained on face boxes that fill most of its crop; the aligned head has margins, so it sees
    # the same central region as the identity encoder.
    crop: tuple[float, float] = (0.1, 0.9)
    # Soft-argmax sharpness: heatmap peaks are about 1, so exp(20) outweighs the ~4000 background cells.
    beta: float = 20.0


class LandmarkEncoder(FrozenModule):
    """E_lnd: face-alignment's 2D FAN, frozen, made differentiable with a soft-argmax over its heatmaps.

    forward(img [N, 3, R, R] in [-1, 1]) -> [N, 68, 2] (x, y) in pixel units of the input image (pixel
    centres at +0.5). The 68-point iBUG layout; the landmark loss uses points 17-67.
    """

    points = 68

    def __init__(self, config: LandmarkEncoderConfig = LandmarkEncoderConfig()):
        super().__init__()
        # lazy: face-alignment pulls scikit-image and numba; only training builds E_lnd
        from face_alignment.models.fan import FAN

        self.config = config
        self.net = seeded(lambda: FAN(config.modules), config.seed)
        if config.source != "random":
            _load_weights(self.net, config.source, (), f"face_alignment FAN({config.modules})")
        self.freeze()

    def heatmaps(self, img: Tensor) -> Tensor:
        """[N, 3, R, R] in [-1, 1] -> heatmaps [N, 68, S/4, S/4] of the last hourglass (S = input_size)."""
        x = _crop_resize((img + 1) * 0.5, self.config.crop, self.config.input_size)  # FAN reads RGB in [0, 1]
        return self.net(x)[-1]

    def forward(self, img: Tensor) -> Tensor:
        hm = self.heatmaps(img).float()
        n, k, h, w = hm.shape
        prob = torch.softmax(self.config.beta * hm.reshape(n, k, h * w), dim=-1).reshape(n, k, h, w)
        xs = torch.arange(w, device=hm.device, dtype=hm.dtype) + 0.5
        ys = torch.arange(h, device=hm.device, dtype=hm.dtype) + 0.5
        x = (prob.sum(dim=2) * xs).sum(dim=-1)  # expected column, heatmap cells
        y = (prob.sum(dim=3) * ys).sum(dim=-1)
        # heatmap cells -> pixels of the cropped region -> pixels of the input image
        side_h, side_w = img.shape[-2:]
        c0, c1 = self.config.crop
        x = round(c0 * side_w) + x * ((round(c1 * side_w) - round(c0 * side_w)) / w)
        y = round(c0 * side_h) + y * ((round(c1 * side_h) - round(c0 * side_h)) / h)
        return torch.stack([x, y], dim=-1)
