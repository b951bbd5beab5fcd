"""The latent mapper M (codes -> W) and the latent discriminator D_W that keeps M's output inside W."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


def _mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear layers through `widths` with LeakyReLU(0.2) between them and nothing after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class MapperConfig:
    id_dim: int = 512
    attr_dim: int = 2048
    w_dim: int = 512  # the generator's; fixed by it
    hidden: tuple[int, ...] = (2048, 1024, 512)  # the paper's widths


class LatentMapper(nn.Module):
    """M: z = [id code (512) ++ attribute code (2048)] -> w [N, w_dim].

    Linear 2560 -> 2048 -> 1024 -> 512 -> w_dim with LeakyReLU(0.2) between layers. The single w is used
    for every synthesis layer (W, not W+)."""

    def __init__(self, config: MapperConfig = MapperConfig()):
        super().__init__()
        self.config = config
        self.net = _mlp((config.id_dim + config.attr_dim, *config.hidden, config.w_dim))

    def forward(self, z: Tensor) -> Tensor:
        """z: [N, id_dim + attr_dim] -> w: [N, w_dim]."""
        return self.net(z)


@dataclass(frozen=True)
class DiscriminatorConfig:
    w_dim: int = 512
    hidden: tuple[int, ...] = (256, 128, 64)  # the paper's widths


class LatentDiscriminator(nn.Module):
    """D_W: w [N, w_dim] -> logit [N] that w is a real sample of the generator's mapping network.

    Linear 512 -> 256 -> 128 -> 64 -> 1 with LeakyReLU(0.2) between layers."""

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.config = config
        self.net = _mlp((config.w_dim, *config.hidden, 1))

    def forward(self, w: Tensor) -> Tensor:
        return self.net(w).squeeze(-1)
