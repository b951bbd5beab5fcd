"""Validation during training: the official trainer's `test()` on held-out samples.

The last `holdout` samples of the dataset never train (the official code holds out the images past
`--train_data_size`). Every `every` steps, before the first one and after the last, the model runs on a
fixed set of `batches` cross-identity batches of them (identity image != attribute image) and these
numbers are logged (console, losses.jsonl as {"step": s, "validation": {...}}, TensorBoard `validation/*`):

    id_to_pred      cos(E_id(I_id), E_id(I_out))          identity kept        (higher is better)
    id_to_attr      cos(E_id(I_id), E_id(I_attr))         baseline: how alike the two people are
    attr_to_pred    cos(E_id(I_attr), E_id(I_out))        attribute identity leaking into the output
    score           id_to_pred - attr_to_pred             the official disentanglement score
    landmarks       mean squared landmark distance, points 17-67, 160-pixel units (lower is better)
    reconstruction_mse / _psnr / _identity                I_id -> itself: MSE and PSNR on [0, 1], cos of E_id

Outputs are clamped to [-1, 1] first, as the official test clips to [0, 1]. Whenever `id_to_pred` or
`landmarks` reaches a new best, the model is written to RUN/checkpoints/best-identity.safetensors or
best-landmarks.safetensors (load with `--model RUN:best-identity`). With `early_stop` N > 0, training stops
after N tests in a row in which neither improved.

Differences from the official code, on purpose: the batches are drawn once (seeded) instead of at random
each test, so successive numbers compare the same images and a "best" is not luck of the draw; the
cosines are reported positive (Keras' cosine_similarity is the negated cosine; the score is the same
value); there is no second (ArcFace) recogniser and no real-image reconstruction (the dataset holds only
generated images).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from deid.console import info
from deid.nets.losses import LANDMARK_POINTS
from deid.nets.model import Disentangler
from deid.runs import best_checkpoint_path
from deid.devices import autocast
from deid.distributed import Dist
from deid.train.config import TrainConfig, Validation


def holdout_count(config: Validation, count: int) -> int:
    """How many of `count` samples to hold out: none when validation is off, else config.holdout as a count
    (>= 1) or a fraction of the dataset (< 1), at least 2 (a cross pair needs two people)."""
    if config.every <= 0:
        return 0
    held = int(config.holdout) if config.holdout >= 1 else round(config.holdout * count)
    return max(2, held)


def recorded_holdout(run_dir: Path) -> int:
    """The held-out count RUN/config.json recorded when the run started (0: none, as in runs recorded before
    validation existed)."""
    path = Path(run_dir) / "config.json"
    recorded = json.loads(path.read_text()).get("validation") if path.is_file() else None
    return int(recorded["holdout"]) if recorded else 0


def with_holdout(config: TrainConfig, count: int, resumed: bool) -> tuple[TrainConfig, int]:
    """(config with validation.holdout set to the count it resolves to, that count). A resumed run keeps
    the count recorded when it started, whatever `config` says (the data order depends on it); a run
    started without held-out samples stays without validation."""
    held = recorded_holdout(config.out) if resumed else holdout_count(config.validation, count)
    validation = dataclasses.replace(config.validation, holdout=held, every=config.validation.every if held else 0)
    return dataclasses.replace(config, validation=validation), held


def validation_batches(first: int, holdout: int, batches: int, batch_size: int,
                       seed: int) -> list[tuple[list[int], list[int]]]:
    """`batches` fixed (identity indices, attribute indices) batch pairs over the held-out samples
    [first, first + holdout): seeded, and no attribute sample is its own pair's identity sample."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2**41)  # a stream of its own (see DataOrder)
    pairs = []
    for _ in range(batches):
        ids = torch.randint(holdout, (batch_size,), generator=g)
        attrs = (ids + torch.randint(1, holdout, (batch_size,), generator=g)) % holdout
        pairs.append(((ids + first).tolist(), (attrs + first).tolist()))
    return pairs


@dataclass
class ValidationState:
    """What validation remembers between tests; saved with the training state, so resume continues it."""

    best_identity: float = -math.inf
    best_identity_step: int = -1
    best_landmarks: float = math.inf
    best_landmarks_step: int = -1
    not_improved: int = 0  # tests in a row without a new best

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict | None) -> "ValidationState":
        state = cls()
        for key, value in (data or {}).items():
            if value is not None and hasattr(state, key):
                setattr(state, key, type(getattr(state, key))(value))
        return state


@torch.no_grad()
def measure(model: Disentangler, landmarks, pairs, load, dist: Dist, dtype: torch.dtype,
            unit_side: int | None) -> dict[str, float]:
    """The validation numbers of `model` over `pairs` ((identity, attribute) index lists); `load(indices)`
    gives images [B, 3, R, R] in [-1, 1] on the model's device. Each rank takes every world-th pair and
    the sums are all-reduced, so every rank returns the same numbers."""
    device = next(model.mapper.parameters()).device
    sums = torch.zeros(8, dtype=torch.float64, device=device)
    for ids, attrs in pairs[dist.rank::dist.world]:
        I_id, I_attr = load(ids), load(attrs)  # noqa: N806 - the paper's names
        with autocast(device, dtype):
            id_ref = model.encode_identity(I_id).float()
            pred = model.generate(model.map(id_ref, model.encode_attributes(I_attr))).float().clamp(-1, 1)
            recon = model.generate(model.map(id_ref, model.encode_attributes(I_id))).float().clamp(-1, 1)
            id_pred, id_attr, id_recon = (model.encode_identity(x).float() for x in (pred, I_attr, recon))
            lnd_ref, lnd_pred = landmarks(I_attr).float(), landmarks(pred).float()
        scale = unit_side / pred.shape[-1] if unit_side else 1.0
        lnd = ((lnd_ref - lnd_pred)[:, LANDMARK_POINTS] * scale).pow(2).mean(dim=(1, 2))
        mse = ((recon - I_id.float()) * 0.5).pow(2).flatten(1).mean(dim=1)  # on [0, 1]
        psnr = 10 * torch.log10(1 / mse.clamp_min(1e-10))
        # E_id's codes are unit length: dot products are cosines
        columns = torch.stack([(id_ref * id_pred).sum(1), (id_ref * id_attr).sum(1), (id_attr * id_pred).sum(1),
                               lnd, mse, psnr, (id_ref * id_recon).sum(1), torch.ones_like(mse)])
        sums += columns.double().sum(dim=1)
    if dist.world > 1:
        tdist.all_reduce(sums)
    id_to_pred, id_to_attr, attr_to_pred, lnd, mse, psnr, rec_id = (sums[:-1] / sums[-1].clamp_min(1)).tolist()
    return {"id_to_pred": id_to_pred, "id_to_attr": id_to_attr, "attr_to_pred": attr_to_pred,
            "score": id_to_pred - attr_to_pred, "landmarks": lnd, "reconstruction_mse": mse,
            "reconstruction_psnr": psnr, "reconstruction_identity": rec_id}


class Validator:
    """Runs `measure` on schedule, keeps the bests, writes the best checkpoints (rank 0) and logs."""

    def __init__(self, config: Validation, out: Path, model: Disentangler, landmarks, pairs, load, dist: Dist,
                 dtype: torch.dtype, unit_side: int | None, log=None):
        self.config, self.out, self.model, self.landmarks = config, out, model, landmarks
        self.pairs, self.load, self.dist, self.dtype, self.unit_side, self.log = pairs, load, dist, dtype, unit_side, log
        self.state = ValidationState()

    def due(self, step: int) -> bool:
        return self.config.every > 0 and step % self.config.every == 0

    def run(self, step: int) -> bool:
        """Validate the model as it is after `step` steps; True when early stopping says to stop."""
        was_training = self.model.training
        self.model.eval()
        try:
            metrics = measure(self.model, self.landmarks, self.pairs, self.load, self.dist, self.dtype, self.unit_side)
        finally:
            self.model.train(was_training)
        s, improved = self.state, []
        if metrics["id_to_pred"] > s.best_identity:
            s.best_identity, s.best_identity_step = metrics["id_to_pred"], step
            improved.append("best-identity")
        if metrics["landmarks"] < s.best_landmarks:
            s.best_landmarks, s.best_landmarks_step = metrics["landmarks"], step
            improved.append("best-landmarks")
        s.not_improved = 0 if improved else s.not_improved + 1
        with self.dist.failures_shared():  # rank 0 writes; a full disk there stops every rank with its message
            if self.dist.main:
                self._write(step, metrics, improved)
        return self.config.early_stop > 0 and s.not_improved >= self.config.early_stop

    def _write(self, step: int, metrics: dict[str, float], improved: list[str]) -> None:
        """Rank 0: the new best checkpoints, the log line and the console line."""
        s = self.state
        for kind in improved:
            path = best_checkpoint_path(self.out, kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.model.save(path, step=step)
        if self.log is not None:
            self.log.write_validation(step, metrics)
        info(f"validation at step {step}: id→pred {metrics['id_to_pred']:.4f}  id→attr {metrics['id_to_attr']:.4f}  "
             f"attr→pred {metrics['attr_to_pred']:.4f}  score {metrics['score']:.4f}  landmarks {metrics['landmarks']:.4g}  "
             f"reconstruction PSNR {metrics['reconstruction_psnr']:.2f} dB, identity {metrics['reconstruction_identity']:.4f}"
             + (f"  (new {', '.join(improved)})" if improved else f"  (no new best for {s.not_improved} test(s))"))


__all__ = ["Validator", "ValidationState", "holdout_count", "measure", "recorded_holdout", "validation_batches",
           "with_holdout"]
