"""Small networks of the real architectures with seeded random weights: every code path of the full model at
a size a laptop CPU runs in milliseconds. The test suite and the benchmarks' `--quick` runs are built on them."""

from __future__ import annotations

from deid.nets.encoders import AttributeEncoderConfig, IdentityEncoderConfig, LandmarkEncoderConfig
from deid.nets.model import ModelConfig
from deid.stylegan.config import GeneratorConfig

# 32x32, channels 32-32-16-8, 64-d latents, 2 mapping layers.
TINY_GENERATOR_CONFIG = GeneratorConfig(resolution=32, z_dim=64, w_dim=64, mapping_layers=2, channel_base=256,
                                        channel_max=32, conv_clamp=256)

# FaceNet at 80 px, InceptionV3 at 75 px, FAN with one hourglass at 64 px; random seeded weights throughout.
TINY_MODEL_CONFIG = ModelConfig(
    generator="random",
    identity=IdentityEncoderConfig(source="random", seed=1, input_size=80),
    attributes=AttributeEncoderConfig(source="random", seed=2, input_size=75),
    landmarks=LandmarkEncoderConfig(source="random", seed=3, modules=1, input_size=64),
)
