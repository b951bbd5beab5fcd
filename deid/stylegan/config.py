"""The architecture of a StyleGAN2 generator, as one frozen dataclass (JSON round trip for file headers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from deid.errors import WeightsError

NOISE_MODES = ("const", "random", "none")


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a StyleGAN2 generator (config-f style, skip toRGB)."""

    resolution: int = 256               # output side in pixels, a power of two >= 4
    z_dim: int = 512                    # latent z size
    w_dim: int = 512                    # intermediate latent w size
    mapping_layers: int = 8             # fully connected layers in the mapping network
    channel_base: int = 16384           # feature maps at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 512
    conv_clamp: float | None = 256.0     # clamp of conv outputs (NVIDIA); None = no clamp (rosinality)
    img_channels: int = 3
    mapping_lr_multiplier: float = 0.01  # equalized-lr multiplier of the mapping layers
    num_fp16_res: int = 0               # informational: how many top resolutions NVIDIA ran in fp16

    def __post_init__(self):
        r = self.resolution
        if r < 4 or r & (r - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {r}")
        if self.conv_clamp is not None:  # 256 and 256.0 are the same network (and must hash the same)
            object.__setattr__(self, "conv_clamp", float(self.conv_clamp))

    @property
    def block_resolutions(self) -> list[int]:
        return [2 ** i for i in range(2, int(math.log2(self.resolution)) + 1)]

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    @property
    def num_ws(self) -> int:
        return 2 * len(self.block_resolutions)  # one per conv (2 per block, 1 in b4) plus the last toRGB

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GeneratorConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise WeightsError(f"generator config has unknown fields {sorted(unknown)}: the file was written by a "
                               "newer deid. Upgrade deid.")
        return cls(**data)
