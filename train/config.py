"""Configuration of a training run: every number of the recipe is a field with its default (the official
code's where the paper is silent; docs/recipe.md tables them with the paper's and the official values)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from deid.nets.model import ModelConfig


@dataclass(frozen=True)
class LossWeights:
    """λ's of the official code, the R1 weight, and the units and reductions the λ's are meant for."""

    identity: float = 1.0  # λ_id
    landmarks: float = 0.001  # λ_lnd
    reconstruction: float = 0.02  # λ_rec (same-image steps only)
    adversarial: float = 1.0  # λ_adv
    r1_gamma: float = 10.0  # R1 on real w: 0.5 * gamma * E|grad D(w)|^2
    # The reconstruction L1's pixel weights: "gaussian", the official inverse-Gaussian mask (face centre ~12.7x
    # lighter than the corners at 256), or "uniform"; and its reduction over the batch: "sum", the official
    # Keras SUM (batch 6 weighs it six times a per-image mean), or "mean". The paper says only "L1".
    pixel_mask: str = "gaussian"
    pixel_reduction: str = "sum"
    # Landmark distances in pixels of a 160-pixel image at every resolution (the official landmark network's
    # input side); None: in generator pixels (λ_lnd then weighs 2.56x more at 256 and 41x more at 1024).
    landmark_units: int | None = 160


@dataclass(frozen=True)
class Schedule:
    """Which losses run on which step, and the three Adam optimisers."""

    cross_every: int = 3  # step % 3 == 0: I_id and I_attr are different images; else the same image
    adversarial_every: int = 2  # D_W and M's adversarial loss on even steps
    # Adam learning rates; None = by resolution: 5e-5 non-adversarial, adversarial (E_attr, M) 0.1x and D_W
    # 0.4x of it, i.e. 5e-6 and 2e-5 at 256; at 1024 see recipe_1024.
    lr_non_adversarial: float | None = None
    lr_adversarial: float | None = None
    lr_discriminator: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    # At 1024: "paper" (appendix C) trains with batch 2 and every learning rate divided by 10 (5e-6, 5e-7,
    # 2e-6); "official" (trainer.py) keeps batch 6 and sets the non-adversarial rate to 1e-5 (1e-6, 4e-6).
    recipe_1024: str = "paper"

    def learning_rates(self, resolution: int) -> tuple[float, float, float]:
        base = 5e-5
        if resolution >= 1024:
            base = 5e-6 if self.recipe_1024 == "paper" else 1e-5
        return (
            self.lr_non_adversarial if self.lr_non_adversarial is not None else base,
            self.lr_adversarial if self.lr_adversarial is not None else 0.1 * base,
            self.lr_discriminator if self.lr_discriminator is not None else 0.4 * base,
        )

    def batch_size(self, resolution: int) -> int:
        """The recipe's batch per step: 6, or 2 at 1024 with the paper's preset."""
        return 2 if resolution >= 1024 and self.recipe_1024 == "paper" else 6


@dataclass(frozen=True)
class Validation:
    """The official trainer's test() during training (deid.train.validation)."""

    every: int = 1000  # steps between tests, and one before the first step (official --test_frequency; 0 = never)
    batches: int = 50  # cross-identity batches per test (official --test_size)
    # Samples held out of training: a count (>= 1) or a fraction of the dataset (< 1), the last ones of the
    # dataset (the official code holds out those past --train_data_size 70000). Recorded in the run, so a
    # resumed run keeps its split.
    holdout: float = 0.01
    early_stop: int = 0  # stop after this many tests in a row without a new best (official --not_improved_exit; 0 = never)


@dataclass(frozen=True)
class TrainConfig:
    data: Path  # a dataset made by `deid make-dataset`
    out: Path  # the run directory: checkpoints/, samples/, tensorboard/, losses.jsonl, config.json
    model: ModelConfig = ModelConfig()  # component sources (generator, encoders) and widths
    steps: int = 200_000  # total optimisation steps (a resumed run continues up to this)
    batch_size: int | None = None  # per process; None = the recipe's (Schedule.batch_size: 6, 2 at 1024)
    resume: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast for the networks; losses and D_W in fp32)
    device: str = "auto"
    seed: int = 0  # data order
    losses: LossWeights = LossWeights()
    schedule: Schedule = Schedule()
    validation: Validation = Validation()
    # D_W's real w's: "random", dataset samples drawn independently of the batch (the official get_real_w),
    # or "batch", the batch's own w's (on same-image steps exactly the w's M is reconstructing)
    real_w: str = "random"
    checkpoint_every: int = 2000  # steps; also at the end and on Ctrl-C
    keep_checkpoints: int = 5  # newest kept (0 = keep all); older ones are deleted after a new one is written
    sample_every: int = 500  # steps between sample grids (0 = never)
    sample_count: int = 4  # identities x attributes of the sample grid
    log_every: int = 10  # steps per losses.jsonl entry (their mean): reading losses waits for the GPU
    data_workers: int | None = None  # PNG-decoding processes per rank; None: by device (GPU: the cores, CPU: 1)
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
            validation=Validation(**data.pop("validation", {})),
            **data,
        )


__all__ = ["LossWeights", "Schedule", "TrainConfig", "Validation"]
