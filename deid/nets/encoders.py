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
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

from deid.checkpoints import read_state_dict
from deid.errors import DeidError, WeightsError
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


def crop_pixels(crop: tuple[float, ...], width: int, height: int) -> tuple[int, int, int, int]:
    """A crop given as fractions -> (x0, y0, x1, y1) in pixels. `crop` is (left, top, right, bottom) of the
    width and height, or (start, end) for the same fraction of both axes; values outside [0, 1] reach beyond
    the image."""
    left, top, right, bottom = crop if len(crop) == 4 else (crop[0], crop[0], crop[1], crop[1])
    return round(left * width), round(top * height), round(right * width), round(bottom * height)


def _crop_resize(img: Tensor, crop: tuple[float, ...], size: int, fill: float = 0.0) -> Tensor:
    """Cut `crop` (see `crop_pixels`) out of [N, C, H, W] and resize it to size x size; where the crop reaches
    beyond the image it is padded with `fill` (as face-alignment pads its crops with black)."""
    h, w = img.shape[-2:]
    x0, y0, x1, y1 = crop_pixels(crop, w, h)
    pad = (max(0, -x0), max(0, x1 - w), max(0, -y0), max(0, y1 - h))
    if any(pad):
        img = F.pad(img, pad, value=fill)
        x0, x1, y0, y1 = x0 + pad[0], x1 + pad[0], y0 + pad[2], y1 + pad[2]
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
    # Fixed face region of the aligned head, (left, top, right, bottom) as fractions of its side (a pair
    # (a, b) means the same fraction of both axes). FaceNet was trained on MTCNN face boxes with a small
    # margin; this is the mean MTCNN box on aligned real faces plus facenet-pytorch's margin of 32 at 160
    # (the box is 128/160 of the crop), measured in tests/test_recipe.py. Like MTCNN's boxes it is taller
    # than wide and is resized to a square, as facenet-pytorch's extract_face (and FaceNet's training data)
    # did. The official code, with another recogniser, keeps 10%-90% of each axis: (0.1, 0.9) here.
    crop: tuple[float, ...] = (0.16, 0.13, 0.80, 0.98)


class IdentityEncoder(FrozenModule):
    """E_id: facenet-pytorch InceptionResnetV1 (VGGFace2), frozen.

    forward(img [N, 3, R, R] in [-1, 1]) -> [N, 512], L2-normalised. The image is cropped to
    `config.crop`, resized to input_size and scaled as FaceNet expects, (x*255 - 127.5)/128,
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
    # "inference" (the official code): BatchNorm always normalises with the pretrained running statistics,
    # which never change, and its scale γ is frozen (Keras' InceptionV3 has none; the Google weights carry
    # γ = 1), only the offset β trains. "train": PyTorch's default, batch statistics in train mode.
    batchnorm: str = "inference"
    # The 3x3 average pooling (stride 1, padding 1) of the Inception blocks' pool branches: "keras" averages
    # only the pixels inside the map, as Keras' AveragePooling2D(padding='same') in the official E_attr and the
    # TF graph the Google weights were trained in do; "torchvision" also counts the zero padding, as
    # torchvision's inception_v3 does (its edge pixels' pool then weighs 6/9, its corners' 4/9).
    pooling: str = "keras"


BATCHNORM_MODES = ("inference", "train")
POOLING_MODES = ("keras", "torchvision")


class AttributeEncoder(nn.Module):
    """E_attr: torchvision InceptionV3 trunk, trainable, classifier removed.

    forward(img [N, 3, R, R] in [-1, 1]) -> [N, 2048], the global-average-pooled last feature map. The
    Google-trained weights expect inputs in [-1, 1] (torchvision's `transform_input` only converts
    ImageNet-normalised input to that), so the image is resized and fed as it is. No dropout: the code
    is a feature, not a classifier input.

    With batchnorm="inference" (default) a sample's code never depends on its batch-mates: the official
    Keras model is never called with training=True, so its BatchNorm layers run in inference mode
    throughout training, and `.train()` leaves them in eval mode here.
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
        if config.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm {config.batchnorm!r}: expected one of {BATCHNORM_MODES}")
        if config.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {config.pooling!r}: expected one of {POOLING_MODES}")
        if config.pooling == "keras":
            for block in self.net.modules():
                if isinstance(block, (InceptionA, InceptionC, InceptionE)):
                    block.branch_pool.register_forward_pre_hook(_exclude_padding_from_average)
        if random_init:
            self._estimate_batchnorm_statistics()
        if config.batchnorm == "inference":
            for bn in self.batchnorms():
                bn.weight.requires_grad_(False)
        self.train(self.training)  # BatchNorm's mode from the start, not only after the first .train()/.eval()

    @torch.no_grad()
    def _estimate_batchnorm_statistics(self) -> None:
        """Random weights with BatchNorm's initial statistics (mean 0, variance 1) grow activations ~10^6-fold
        over InceptionV3's 94 layers in inference mode; pretrained weights come with statistics that keep them
        normalised. Set them from one batch of seeded smooth noise images (4 each of 4, 8, 16 and 32 pixels
        upscaled: white noise alone leaves smooth face images 100x off), so a random E_attr behaves like a
        trained one in either BatchNorm mode."""
        size, g = self.config.input_size, torch.Generator().manual_seed(self.config.seed)
        noise = torch.cat([F.interpolate(torch.rand(4, 3, s, s, generator=g) * 2 - 1, size=(size, size), mode="bilinear",
                                         align_corners=False) for s in (4, 8, 16, 32)])
        for bn in self.batchnorms():
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: one batch sets the statistics to its own
        self.net.train()
        self.net(noise)
        for bn in self.batchnorms():
            bn.momentum = 0.1  # torchvision's

    def batchnorms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.batchnorm == "inference":
            for bn in self.batchnorms():
                bn.eval()
        return self

    def forward(self, img: Tensor) -> Tensor:
        size = self.config.input_size
        x = img if img.shape[-2:] == (size, size) else F.interpolate(
            img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.net(x)


def _exclude_padding_from_average(module: nn.Module, args: tuple[Tensor]) -> tuple[Tensor]:
    """Forward pre-hook of an Inception pool branch's 1x1 convolution, whose input torchvision computes as
    avg_pool2d(x, 3, stride 1, padding 1) counting the zero padding: rescale each pixel by 9 / (the number of
    its 3x3 neighbours inside the map), which turns that into the average over the pixels inside only (as
    count_include_pad=False, Keras' 'same' pooling). pooled: [N, C, H, W]."""
    (pooled,) = args
    inside = F.avg_pool2d(torch.ones_like(pooled[:1, :1]), kernel_size=3, stride=1, padding=1)  # share inside, 4/9..1
    return (pooled / inside,)


# --------------------------------------------------------------------------------------- landmarks


@dataclass(frozen=True)
class LandmarkEncoderConfig:
    source: str = "fan-2d"  # registry name, file, or "random"
    seed: int = 0  # only for "random"
    modules: int = 4  # stacked hourglasses: the published 2DFAN4 has 4 (tests use 1)
    input_size: int = 256  # FAN's crop side; its heatmaps are a quarter of it
    # FAN's own framing (face-alignment): a square of side 200 (w + h) / 195 around the detector's box,
    # centred 0.12 h above the box centre. With MTCNN boxes on aligned real faces that square is about 1.21
    # times the aligned head, so FAN sees the whole head plus a black border (face-alignment pads with
    # black); measured in tests/test_recipe.py. (left, top, right, bottom) as fractions of the side.
    crop: tuple[float, ...] = (-0.13, -0.13, 1.09, 1.08)
    # Soft-argmax sharpness: heatmap peaks are about 1, so exp(20) outweighs the cells around them.
    beta: float = 20.0
    # Soft-argmax window: (2 r + 1)^2 heatmap cells around each argmax (None: the whole heatmap, where a weak
    # peak is pulled far toward the centre, see `soft_argmax`).
    window: int | None = 3


class LandmarkEncoder(FrozenModule):
    """E_lnd: face-alignment's 2D FAN, frozen, made differentiable with a soft-argmax over its heatmaps.

    forward(img [N, 3, R, R] in [-1, 1]) -> [N, 68, 2] (x, y) in pixel units of the input image (pixel
    centres at +0.5). The 68-point iBUG layout; the landmark loss uses points 17-67.
    """

    points = 68

    def __init__(self, config: LandmarkEncoderConfig = LandmarkEncoderConfig()):
        super().__init__()
        try:
            # lazy: face-alignment pulls scikit-image and numba; only training builds E_lnd
            from face_alignment.models.fan import FAN
        except ModuleNotFoundError as exc:
            if exc.name not in ("face_alignment.models", "face_alignment.models.fan"):
                raise
            raise DeidError("the installed face-alignment has no face_alignment.models.fan (1.3 and 1.4 ship none), "
                            "which the landmark encoder needs. Run `pip install 'face-alignment>=1.5'`.") from None

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
        hm = self.heatmaps(img)
        h, w = hm.shape[-2:]
        cells = soft_argmax(hm, self.config.beta, self.config.window)  # [N, 68, 2] heatmap cells
        # heatmap cells -> pixels of the cropped region -> pixels of the input image
        x0, y0, x1, y1 = crop_pixels(self.config.crop, img.shape[-1], img.shape[-2])
        x = x0 + cells[..., 0] * ((x1 - x0) / w)
        y = y0 + cells[..., 1] * ((y1 - y0) / h)
        return torch.stack([x, y], dim=-1)


def soft_argmax(heatmaps: Tensor, beta: float, radius: int | None) -> Tensor:
    """Differentiable peak positions of heatmaps [N, K, H, W] -> [N, K, 2] (x, y) in heatmap cells, cell
    centres at +0.5 (float32).

    The cells are weighted by softmax(beta * heatmap). With `radius`, only the (2 radius + 1)^2 cells around
    each heatmap's argmax take part: the window is picked without gradient, the position inside it is
    differentiable. Over the whole map (radius None) the thousands of background cells of a weak peak
    (height 0.5 or less: blurry early outputs, occluded points) drag the estimate many cells toward the
    centre, and the gradient then rewards sharper heatmaps instead of moving the landmark."""
    hm = heatmaps.float()
    n, k, h, w = hm.shape
    if radius is None:
        prob = torch.softmax(beta * hm.reshape(n, k, h * w), dim=-1).reshape(n, k, h, w)
        xs = torch.arange(w, device=hm.device, dtype=hm.dtype) + 0.5
        ys = torch.arange(h, device=hm.device, dtype=hm.dtype) + 0.5
        return torch.stack([(prob.sum(dim=2) * xs).sum(-1), (prob.sum(dim=3) * ys).sum(-1)], dim=-1)
    size = 2 * radius + 1
    peak = hm.detach().reshape(n, k, h * w).argmax(dim=-1)
    py, px = peak // w, peak % w  # [N, K] cell of each argmax
    offsets = torch.arange(size, device=hm.device)
    # cells beyond the map's edge are -inf: no weight
    padded = F.pad(hm, (radius, radius, radius, radius), value=float("-inf")).reshape(n, k, -1)
    rows = (py[..., None] + offsets)[..., :, None]  # [N, K, size, 1], padded coordinates
    cols = (px[..., None] + offsets)[..., None, :]  # [N, K, 1, size]
    index = (rows * (w + 2 * radius) + cols).reshape(n, k, size * size)
    prob = torch.softmax(beta * padded.gather(-1, index), dim=-1).reshape(n, k, size, size)
    shift = offsets.to(hm.dtype) - radius
    x = px.to(hm.dtype) + 0.5 + (prob.sum(dim=2) * shift).sum(-1)
    y = py.to(hm.dtype) + 0.5 + (prob.sum(dim=3) * shift).sum(-1)
    return torch.stack([x, y], dim=-1)
