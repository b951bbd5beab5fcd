"""Configuration of a training run: every number of the paper's schedule is a field with its default."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from deid.nets.model import ModelConfig


@dataclass(frozen=True)
class LossWeights:
    """λ's of the official code and the R1 weight."""

    identity: float = 1.0  # λ_id
    landmarks: float = 0.001  # λ_lnd
    reconstruction: float = 0.02  # λ_rec (same-image steps only)
    adversarial: float = 1.0  # λ_adv
    r1_gamma: float = 10.0  # R1 on real w: 0.5 * gamma * E|grad D(w)|^2


@dataclass(frozen=True)
class Schedule:
    """Which losses run on which step, and the three Adam optimisers."""

    cross_every: int = 3  # step % 3 == 0: I_id and I_attr are different images; else the same image
    adversarial_every: int = 2  # D_W and M's adversarial loss on even steps
    # Adam learning rates; None = the paper's by resolution: 5e-5 non-adversarial (1e-5 at 1024),
    # adversarial (E_attr, M) 0.1x and D_W 0.4x of it, i.e. 5e-6 and 2e-5 at 256.
    lr_non_adversarial: float | None = None
    lr_adversarial: float | None = None
    lr_discriminator: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)

    def learning_rates(self, resolution: int) -> tuple[float, float, float]:
        base = 1e-5 if resolution >= 1024 else 5e-5
        return (
            self.lr_non_adversarial if self.lr_non_adversarial is not None else base,
            self.lr_adversarial if self.lr_adversarial is not None else 0.1 * base,
            self.lr_discriminator if self.lr_discriminator is not None else 0.4 * base,
        )


@dataclass(frozen=True)
class TrainConfig:
    data: Path  # a dataset made by `deid make-dataset`
    out: Path  # the run directory: checkpoints/, samples/, tensorboard/, losses.jsonl, config.json
    model: ModelConfig = ModelConfig()  # component sources (generator, encoders) and widths
    steps: int = 200_000  # total optimisation steps (a resumed run continues up to this)
    batch_size: int = 6  # per process; the paper's batch
    resume: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast for the networks; losses and D_W in fp32)
    device: str = "auto"
    seed: int = 0  # data order
    losses: LossWeights = LossWeights()
    schedule: Schedule = Schedule()
    checkpoint_every: int = 2000  # steps; also at the end and on Ctrl-C
    keep_checkpoints: int = 5  # newest kept (0 = keep all); older ones are deleted after a new one is written
    sample_every: int = 500  # steps between sample grids (0 = never)
    sample_count: int = 4  # identities x attributes of the sample grid
    gpus: int = 1  # > 1: `deid train` relaunches itself under torchrun with this many processes
    tensorboard: bool = True

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["data"], data["out"] = str(self.data), str(self.out)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        data = json.loads(text)
        return cls(
            data=Path(data.pop("data")),
            out=Path(data.pop("out")),
            model=ModelConfig.from_dict(data.pop("model")),
            losses=LossWeights(**data.pop("losses")),
            schedule=Schedule(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("schedule").items()}),
            **data,
        )


__all__ = ["LossWeights", "Schedule", "TrainConfig"]
