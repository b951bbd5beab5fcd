"""The disentanglement model: E_id + E_attr -> M -> frozen StyleGAN2 synthesis, its config, save and load.

A checkpoint is ONE `.safetensors` file: the trainable parts (E_attr, M, and D_W in training checkpoints)
as tensors, and a JSON header in the metadata (key `deid`) with the config (component sources, dims),
the step, and the fingerprints of the frozen parts (G, E_id), which are rebuilt from their sources and
checked on load. Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from deid.checkpoints import read_safetensors, write_safetensors
from deid.devices import Precision
from deid.errors import WeightsError
from deid.nets.encoders import (
    AttributeEncoder,
    AttributeEncoderConfig,
    IdentityEncoder,
    IdentityEncoderConfig,
    LandmarkEncoderConfig,
    seeded,
    weights_fingerprint,
)
from deid.nets.mapper import DiscriminatorConfig, LatentDiscriminator, LatentMapper, MapperConfig
from deid.runs import latest_checkpoint, named_checkpoint
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.loading import load_generator
from deid.weights import REGISTRY, cache_path, resolve, source_sha256

FORMAT = "deid-model"


FORMAT_VERSION = 1


DEFAULT_MODEL = "deid-ffhq256"


@dataclass(frozen=True)
class ModelConfig:
    """Where each component comes from, and the widths of the trained parts."""

    generator: str = "stylegan2-ffhq-256"  # registry name, file, or "random"
    generator_seed: int = 0  # only for a "random" generator
    generator_config: dict | None = None  # GeneratorConfig fields, only for a "random" generator
    identity: IdentityEncoderConfig = IdentityEncoderConfig()
    attributes: AttributeEncoderConfig = AttributeEncoderConfig()
    landmarks: LandmarkEncoderConfig = LandmarkEncoderConfig()  # training only; recorded for provenance
    mapper_hidden: tuple[int, ...] = MapperConfig.hidden  # the paper's widths, defined once in deid.nets.mapper
    discriminator_hidden: tuple[int, ...] = DiscriminatorConfig.hidden
    init_seed: int = 0  # initial weights of M and D_W (seeded)
    initialiser: str = MapperConfig.initialiser  # of M and D_W: "official" (Keras', as the official code) or "pytorch"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        def sub(kind, values):
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        data = dict(data)
        return cls(
            generator=data["generator"],
            generator_seed=int(data.get("generator_seed", 0)),
            generator_config=data.get("generator_config"),
            identity=sub(IdentityEncoderConfig, data["identity"]),
            # runs recorded before these fields existed trained BatchNorm, counted the pooling's padding and used
            # the whole-map soft-argmax
            attributes=sub(AttributeEncoderConfig, {"batchnorm": "train", "pooling": "torchvision", **data["attributes"]}),
            landmarks=sub(LandmarkEncoderConfig, {"window": None, **data["landmarks"]}),
            mapper_hidden=tuple(data["mapper_hidden"]),
            discriminator_hidden=tuple(data["discriminator_hidden"]),
            init_seed=int(data.get("init_seed", 0)),
            # runs recorded before the field existed were initialised with PyTorch's defaults
            initialiser=data.get("initialiser", "pytorch"),
        )

    def with_absolute_paths(self) -> "ModelConfig":
        """Sources that are files become absolute paths, so a checkpoint loads from any directory."""
        def fix(source: str) -> str:
            path = Path(source).expanduser()
            return str(path.resolve()) if source != "random" and path.exists() else source

        return dataclasses.replace(
            self, generator=fix(self.generator),
            identity=dataclasses.replace(self.identity, source=fix(self.identity.source)),
            attributes=dataclasses.replace(self.attributes, source=fix(self.attributes.source)),
            landmarks=dataclasses.replace(self.landmarks, source=fix(self.landmarks.source)),
        )

    def for_generator(self, generator) -> "ModelConfig":
        """This config with the generator fields taken from a loaded generator (its source; for a random
        one its config and seed, so it can be rebuilt identically)."""
        source = str(getattr(generator, "source", self.generator))
        if source != "random":
            return dataclasses.replace(self, generator=source, generator_config=None)
        gen_config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(generator.config).items()}
        return dataclasses.replace(
            self, generator="random", generator_config=gen_config, generator_seed=int(getattr(generator, "seed", self.generator_seed))
        )


def build_generator(config: ModelConfig, device: str | torch.device = "cpu"):
    """The frozen generator a config names."""

    if config.generator == "random":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in (config.generator_config or {}).items()}
        return load_generator("random", device=device, config=GeneratorConfig(**fields), seed=config.generator_seed)
    return load_generator(config.generator, device=device)


class Disentangler(nn.Module):
    """I_out = G(M([E_id(I_id), E_attr(I_attr)])).

    Images are [N, 3, R, R] in [-1, 1] with R = `.resolution` (the generator's). E_id and G are frozen;
    E_attr and M train. Build with `Disentangler(config, generator)`; `load_model` for saved models.
    """

    def __init__(self, config: ModelConfig, generator: nn.Module, *, initialise_attributes: bool = True):
        super().__init__()
        self.config = config.for_generator(generator)
        self.generator = generator
        for p in self.generator.parameters():
            p.requires_grad_(False)
        self.generator.eval()
        self.identity_encoder = IdentityEncoder(config.identity)
        self.attribute_encoder = AttributeEncoder(config.attributes, initialise=initialise_attributes)
        mapper_config = MapperConfig(
            id_dim=IdentityEncoder.dim, attr_dim=AttributeEncoder.dim, w_dim=generator.w_dim, hidden=config.mapper_hidden,
            initialiser=config.initialiser)
        self.mapper = seeded(lambda: LatentMapper(mapper_config), config.init_seed)
        self.step = 0  # training step the weights come from

    @property
    def resolution(self) -> int:
        return int(self.generator.resolution)

    @property
    def w_dim(self) -> int:
        return int(self.generator.w_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.generator.eval()  # frozen: never in training mode
        return self

    def encode_identity(self, img: Tensor) -> Tensor:
        """[N, 3, R, R] in [-1, 1] -> identity codes [N, 512], L2-normalised."""
        return self.identity_encoder(img)

    def encode_attributes(self, img: Tensor) -> Tensor:
        """[N, 3, R, R] in [-1, 1] -> attribute codes [N, 2048]."""
        return self.attribute_encoder(img)

    def map(self, id_code: Tensor, attr_code: Tensor) -> Tensor:
        """[N, 512], [N, 2048] -> w [N, w_dim] (one w for every synthesis layer)."""
        return self.mapper(torch.cat([id_code, attr_code], dim=1))

    def generate(self, w: Tensor) -> Tensor:
        """w [N, w_dim] -> images [N, 3, R, R] in about [-1, 1] (constant noise: deterministic)."""
        return self.generator.synthesis(w, noise_mode="const")

    def forward(self, I_id: Tensor, I_attr: Tensor) -> Tensor:  # noqa: N803 - the paper's names
        """The identity of I_id with everything else of I_attr. [N, 3, R, R] x2 -> [N, 3, R, R]."""
        return self.generate(self.map(self.encode_identity(I_id), self.encode_attributes(I_attr)))

    # -------------------------------------------------------------------------------- save / load

    def header(self, step: int | None = None) -> dict:
        """The JSON header of a checkpoint of this model."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "step": int(self.step if step is None else step),
            "resolution": self.resolution,
            "id_dim": IdentityEncoder.dim,
            "attr_dim": AttributeEncoder.dim,
            "w_dim": self.w_dim,
            "generator_fingerprint": str(self.generator.fingerprint),
            **self._frozen_hashes(),
        }

    def _frozen_hashes(self) -> dict:
        """The generator file's sha256 and E_id's content hash: frozen parts, so hashed once, not per checkpoint."""
        if not hasattr(self, "_frozen_hashes_cache"):

            self._frozen_hashes_cache = {"generator_sha256": source_sha256(self.config.generator),
                                         "identity_fingerprint": weights_fingerprint(self.identity_encoder)}
        return self._frozen_hashes_cache

    def save(self, path: str | Path, step: int | None = None, discriminator: LatentDiscriminator | None = None) -> Path:
        """Write a checkpoint atomically (temp file beside it, then rename). D_W is included when given."""
        tensors = _prefixed("attribute_encoder.", self.attribute_encoder.state_dict())
        tensors.update(_prefixed("mapper.", self.mapper.state_dict()))
        header = self.header(step)
        if discriminator is not None:
            tensors.update(_prefixed("discriminator.", discriminator.state_dict()))
        write_safetensors(path, tensors, {"deid": json.dumps(header)})
        return Path(path)


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors under `prefix` (e.g. "mapper."), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(header, tensors) of a deid checkpoint file; WeightsError if it is not one."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    try:
        header = json.loads(metadata["deid"])
        if header.get("format") != FORMAT:
            raise KeyError("format")
    except (KeyError, json.JSONDecodeError):
        raise WeightsError(f"{path}: a safetensors file but not a deid model checkpoint. "
                           "Give a checkpoint written by `deid train`.") from None
    if header.get("version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{path}: checkpoint format version {header['version']} is newer than this deid "
                           f"understands ({FORMAT_VERSION}). Upgrade deid.")
    return header, tensors


def _resolve_model_file(source: str | os.PathLike) -> Path:
    text = os.fspath(source)
    path = Path(text).expanduser()
    named = None if path.exists() else named_checkpoint(text)
    if named is not None:  # RUN:best-identity, RUN:best-landmarks, RUN:latest, RUN:step-N
        return named
    if path.is_dir():
        return latest_checkpoint(path)
    if path.is_file():
        return path

    if text in REGISTRY:
        try:
            return resolve(text)
        except WeightsError:
            if text != DEFAULT_MODEL:
                raise
            raise WeightsError(
                f"no trained deid model {DEFAULT_MODEL!r} yet (none is published). Make one: "
                "`deid make-dataset --n 70000 --out generated/`, then `deid train --data generated/ --out runs/ffhq256`, "
                f"then `deid weights import {DEFAULT_MODEL} runs/ffhq256` (or pass --model runs/ffhq256). "
                "`deid anonymize` needs none to cover faces: --engine mask."
            ) from None
    raise WeightsError(f"{text}: no such model. Give a run directory (RUN, or RUN:best-identity, RUN:best-landmarks, "
                       f"RUN:step-N), a checkpoint file, or {DEFAULT_MODEL!r}.")


def default_model_installed() -> bool:
    """Whether a trained model is registered as DEFAULT_MODEL (`deid weights import deid-ffhq256 RUN`): none is
    published, so on a fresh install there is none."""
    return cache_path(DEFAULT_MODEL).is_file()


def load_model(source: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu",
               generator: nn.Module | None = None) -> Disentangler:
    """A trained Disentangler from a run directory (its latest checkpoint; RUN:best-identity,
    RUN:best-landmarks, RUN:step-N name another), a checkpoint file, or the registry name "deid-ffhq256".
    The frozen parts are rebuilt from their recorded sources (or `generator`
    is used when given) and must match the fingerprints recorded at training time."""
    path = _resolve_model_file(source)
    header, tensors = read_checkpoint(path)
    config = ModelConfig.from_dict(header["config"])
    if generator is None:
        generator = build_generator(config, device)
    if str(generator.fingerprint) != header["generator_fingerprint"]:
        raise WeightsError(
            f"{path}: this model was trained for generator {config.generator!r} (fingerprint "
            f"{header['generator_fingerprint'][:12]}...) but the generator given has {str(generator.fingerprint)[:12]}.... "
            "Use the generator the model was trained with.")
    model = Disentangler(config, generator, initialise_attributes=False)
    if weights_fingerprint(model.identity_encoder) != header["identity_fingerprint"]:
        raise WeightsError(f"{path}: the identity encoder {config.identity.source!r} differs from the one this model was "
                           "trained with. Use the same facenet weights file (`deid weights verify`).")
    try:
        model.attribute_encoder.load_state_dict(unprefixed("attribute_encoder.", tensors))
        model.mapper.load_state_dict(unprefixed("mapper.", tensors))
    except RuntimeError as exc:
        raise WeightsError(f"{path}: checkpoint tensors do not fit its config ({str(exc).splitlines()[0][:160]}). "
                           "The file is damaged; use another checkpoint.") from None
    model.step = int(header["step"])
    return model.to(device).eval()


def build_discriminator(config: ModelConfig, w_dim: int) -> LatentDiscriminator:
    """D_W with the config's widths and seeded initial weights."""
    return seeded(lambda: LatentDiscriminator(DiscriminatorConfig(w_dim=w_dim, hidden=config.discriminator_hidden,
                                                                  initialiser=config.initialiser)),
                  config.init_seed + 1)


__all__ = [
    "ModelConfig", "Disentangler", "load_model", "read_checkpoint", "mix_grid",
    "unprefixed", "build_generator", "build_discriminator", "DEFAULT_MODEL", "default_model_installed",
]


@torch.no_grad()
def mix_grid(model, identity_heads: torch.Tensor, attribute_heads: torch.Tensor,
             precision: Precision = Precision()) -> torch.Tensor:
    """Every (attribute source, identity) pair through the model, its networks in `precision`.

    identity_heads: [C, 3, R, R], attribute_heads: [Rows, 3, R, R], both in [-1, 1].
    Returns [Rows, C, 3, R, R]: cell (r, c) has identity c and the attributes of row r.
    """
    device = identity_heads.device
    with precision.encoding(device):
        id_codes = model.encode_identity(identity_heads)
        attr_codes = model.encode_attributes(attribute_heads)
        rows, cols = attr_codes.shape[0], id_codes.shape[0]
        w = model.map(id_codes.repeat(rows, 1), attr_codes.repeat_interleave(cols, dim=0))
    with precision.generating(device):
        images = model.generate(w)
    return images.reshape(rows, cols, *images.shape[1:])
