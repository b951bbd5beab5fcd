"""The latent mapper M (codes -> W) and the latent discriminator D_W that keeps M's output inside W."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

LEAKY_SLOPE = 0.2
INITIALISERS = ("official", "pytorch")
# Keras' VarianceScaling draws from a normal truncated at 2 standard deviations, whose standard deviation is
# this fraction of the untruncated one; it divides the target std by it so the weights keep sqrt(scale/fan_in).
TRUNCATED_NORMAL_STD = 0.87962566103423978


def _mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear layers through `widths` with LeakyReLU(0.2) between them and nothing after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def glorot_uniform_(layer: nn.Linear) -> None:
    """Keras' default Dense initialiser: weights U(±sqrt(6 / (fan_in + fan_out))), bias 0."""
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


def leaky_variance_scaling_(layer: nn.Linear, slope: float = LEAKY_SLOPE) -> None:
    """The official `get_weights(slope)` (utils/general_utils.py): Keras VarianceScaling(scale=2/(1+slope²)),
    mode fan_in, truncated normal (TF 2.0's default): weights drawn from N(0, σ²) truncated to ±2σ with
    σ = sqrt(scale / fan_in) / 0.8796..., so their standard deviation is sqrt(scale / fan_in) (He's gain for
    LeakyReLU); bias 0."""
    std = math.sqrt(2.0 / (1.0 + slope**2) / layer.in_features) / TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)


def _linears(net: nn.Sequential) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]


def _check_initialiser(name: str) -> None:
    if name not in INITIALISERS:
        raise ValueError(f"initialiser {name!r}: expected one of {INITIALISERS}")


@dataclass(frozen=True)
class MapperConfig:
    id_dim: int = 512
    attr_dim: int = 2048
    w_dim: int = 512  # the generator's; fixed by it
    hidden: tuple[int, ...] = (2048, 1024, 512)  # the paper's widths
    # "official": model/latent_mapping.py's, Glorot uniform for the first two layers and the LeakyReLU
    # variance scaling for the last two, zero biases; "pytorch": nn.Linear's defaults
    initialiser: str = "official"


class LatentMapper(nn.Module):
    """M: z = [id code (512) ++ attribute code (2048)] -> w [N, w_dim].

    Linear 2560 -> 2048 -> 1024 -> 512 -> w_dim with LeakyReLU(0.2) between layers. The single w is used
    for every synthesis layer (W, not W+)."""

    def __init__(self, config: MapperConfig = MapperConfig()):
        super().__init__()
        _check_initialiser(config.initialiser)
        self.config = config
        self.net = _mlp((config.id_dim + config.attr_dim, *config.hidden, config.w_dim))
        if config.initialiser == "official":
            linears = _linears(self.net)
            for layer in linears[:2]:
                glorot_uniform_(layer)
            for layer in linears[2:]:
                leaky_variance_scaling_(layer)

    def forward(self, z: Tensor) -> Tensor:
        """z: [N, id_dim + attr_dim] -> w: [N, w_dim]."""
        return self.net(z)


@dataclass(frozen=True)
class DiscriminatorConfig:
    w_dim: int = 512
    hidden: tuple[int, ...] = (256, 128, 64)  # the paper's widths
    # "official": model/discriminator.py's LeakyReLU variance scaling on every layer, zero biases;
    # "pytorch": nn.Linear's defaults
    initialiser: str = "official"


class LatentDiscriminator(nn.Module):
    """D_W: w [N, w_dim] -> logit [N] that w is a real sample of the generator's mapping network.

    Linear 512 -> 256 -> 128 -> 64 -> 1 with LeakyReLU(0.2) between layers."""

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        _check_initialiser(config.initialiser)
        self.config = config
        self.net = _mlp((config.w_dim, *config.hidden, 1))
        if config.initialiser == "official":
            for layer in _linears(self.net):
                leaky_variance_scaling_(layer)

    def forward(self, w: Tensor) -> Tensor:
        return self.net(w).squeeze(-1)
