"""`deid train`: the paper's training of E_attr, M and D_W against a frozen generator (DESIGN.md §3).

One step (global step s, counted from 0):
  * s % 3 == 0 ("cross"): I_id and I_attr are different images; otherwise the same image, and only then
    the reconstruction loss is on.
  * every step: the non-adversarial loss λ_id L_id + λ_lnd L_lnd (+ λ_rec L_rec) updates E_attr and M;
  * s % 2 == 0 ("adversarial"): λ_adv times the non-saturating loss of D_W on M's w updates E_attr and M
    with its own Adam, and D_W is updated with the logistic loss plus R1 on the dataset's w's.
  All gradients of a step are taken at the same parameters (one forward pass), then the three Adam
  optimisers step in turn, as in the official code.

Multi-process (torchrun): every rank holds full replicas, draws its own shard of the same global batch
order, and gradients are averaged across ranks (all-reduce) before every optimiser step, which is what
DistributedDataParallel does; it is done by hand because three optimisers with separate backward passes
over overlapping parameter sets do not fit DDP's one-backward-per-forward hooks. R1 is computed per rank
on its own real w's and averaged with the rest, so it equals R1 over the global batch; the step number,
hence the cross/adversarial schedule, is the same on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from rich.progress import TextColumn
from torch import Tensor

from deid.atomic import write_text_atomic
from deid.checkpoints import read_safetensors, write_safetensors
from deid.console import info, progress
from deid.dataset import GeneratedDataset, truncation_text, verify_dataset
from deid.errors import DatasetError, DeidError
from deid.grid import grid_image
from deid.media.images import save_image
from deid.nets.encoders import LandmarkEncoder
from deid.nets.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    identity_loss,
    landmark_loss,
    r1_penalty,
    reconstruction_loss,
)
from deid.nets.mapper import LatentDiscriminator
from deid.nets.model import (
    Disentangler,
    ModelConfig,
    build_discriminator,
    build_generator,
    mix_grid,
    read_checkpoint,
    unprefixed,
)
from deid.runs import checkpoint_path, complete_lines, latest_checkpoint, list_checkpoints
from deid.devices import autocast, resolve_dtype
from deid.distributed import Dist, init_distributed
from deid.train.config import TrainConfig
from deid.train.data import TrainBatches, default_workers, to_device
from deid.train.validation import Validator, ValidationState, validation_batches, with_holdout
from deid.weights import resolve

STATE_FORMAT = "deid-train-state"


class TrainingInterrupted(DeidError):
    """Ctrl-C (or SIGTERM) stopped training after a checkpoint was written."""


# ------------------------------------------------------------------------------------ distribution


def average_across_ranks(tensors: list[Tensor], dist: Dist) -> None:
    """In-place mean of each tensor over all ranks (one flat all-reduce)."""
    if dist.world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    tdist.all_reduce(flat)
    flat /= dist.world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_from_rank0(tensors: list[Tensor], dist: Dist) -> None:
    """Overwrite each (floating-point) tensor with rank 0's values, in one flat broadcast."""
    if dist.world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    tdist.broadcast(flat, 0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def training_norm_buffers(module: torch.nn.Module) -> list[Tensor]:
    """Running statistics that a forward pass updates (BatchNorm in training mode); its step counters are left
    out: every rank counts the same steps."""
    return [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
            for b in (m.running_mean, m.running_var) if b is not None]


# ------------------------------------------------------------------------------------------- data


class DataOrder:
    """Seeded shuffled epochs over the dataset; each global batch is split into per-rank shards.

    Its whole state is (epoch, position), so a resumed run draws exactly the batches it would have."""

    def __init__(self, count: int, batch_size: int, seed: int, dist: Dist):
        self.count, self.batch_size, self.seed, self.dist = count, batch_size, seed, dist
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next_indices(self) -> list[int]:
        """This rank's indices of the next global batch (the remainder of an epoch is dropped)."""
        global_batch = self.batch_size * self.dist.world
        if self.position + global_batch > self.count:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = self.position + self.dist.rank * self.batch_size
        self.position += global_batch
        return self._perm[start:start + self.batch_size].tolist()

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def load_batch(dataset, indices: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """images [B, 3, R, R] in [-1, 1] and their w [B, w_dim] on `device`."""
    images, ws = zip(*(dataset[i] for i in indices))
    return torch.stack(images).to(device), torch.stack(ws).to(device)


def check_dataset(root: Path, generator, min_count: int):
    """Open a dataset that `verify_dataset` passed, and refuse one that was not made by `generator` at its
    resolution or is too small. Runs on the CPU before any network touches a GPU."""

    dataset = GeneratedDataset(root)
    manifest = dataset.manifest
    resolution, w_dim = int(manifest["resolution"]), int(manifest["w_dim"])
    if resolution != generator.resolution or w_dim != generator.w_dim:
        raise DatasetError(f"{root}: images are {resolution}x{resolution} with {w_dim}-d w, but the generator makes "
                           f"{generator.resolution}x{generator.resolution} with {generator.w_dim}-d w. "
                           "Use the generator the dataset was made with.")
    fingerprint = str(manifest["generator_fingerprint"])
    if fingerprint != str(generator.fingerprint):
        raise DatasetError(
            f"{root}: made by generator {manifest.get('generator', '?')!r} (fingerprint {fingerprint[:12]}...), not by the "
            f"one being trained against ({generator.source!r}, {str(generator.fingerprint)[:12]}...). Pass the dataset's "
            "generator with --generator, or make a dataset with this one (`deid make-dataset --generator ...`).")
    if len(dataset) < min_count:
        raise DatasetError(f"{root}: {len(dataset)} samples, fewer than the {min_count} that two batches need. "
                           "Make a larger dataset or lower --batch-size.")
    return dataset


# ------------------------------------------------------------------------------------------- steps


class Trainer:
    """The optimisation of one process: losses of a step and the three Adam updates."""

    def __init__(self, config: TrainConfig, model: Disentangler, landmarks: LandmarkEncoder,
                 discriminator: LatentDiscriminator, dist: Dist = Dist(), dtype: torch.dtype = torch.float32):
        self.config, self.model, self.landmarks, self.discriminator = config, model, landmarks, discriminator
        self.dist, self.dtype = dist, dtype
        # requires_grad: E_attr's BatchNorm scales are frozen in the official (inference) BatchNorm mode
        self.g_params = [p for m in (model.attribute_encoder, model.mapper) for p in m.parameters() if p.requires_grad]
        self.d_params = list(discriminator.parameters())
        lr_na, lr_adv, lr_d = config.schedule.learning_rates(model.resolution)
        # the fused kernel is ~10x faster than the per-tensor loop on the CPU, and the same algorithm
        adam = {"betas": tuple(config.schedule.betas), "fused": self.g_params[0].device.type in ("cpu", "cuda") or None}
        self.optimizers = {
            "non_adversarial": torch.optim.Adam(self.g_params, lr=lr_na, **adam),
            "adversarial": torch.optim.Adam(self.g_params, lr=lr_adv, **adam),
            "discriminator": torch.optim.Adam(self.d_params, lr=lr_d, **adam),
        }
        model.train()
        discriminator.train()

    def is_cross(self, step: int) -> bool:
        return step % self.config.schedule.cross_every == 0

    def is_adversarial(self, step: int) -> bool:
        return step % self.config.schedule.adversarial_every == 0

    def compute_losses(self, step: int, I_id: Tensor, I_attr: Tensor, w_real: Tensor) -> dict[str, Tensor]:  # noqa: N803
        """The losses of step `step` on one batch (images [B, 3, R, R] in [-1, 1], w_real [B, w_dim]).

        Keys: identity, landmarks, reconstruction (same-image steps only), non_adversarial (the weighted
        sum that updates E_attr and M), and on adversarial steps: adversarial (M's non-saturating loss,
        unweighted), discriminator (D_W's logistic loss) and r1."""
        weights, m = self.config.losses, self.model
        with autocast(I_id.device, self.dtype):
            with torch.no_grad():
                id_ref = m.encode_identity(I_id).float()
                lnd_ref = self.landmarks(I_attr).float()
            w = m.map(id_ref, m.encode_attributes(I_attr)).float()
            I_out = m.generate(w)
            id_out = m.encode_identity(I_out).float()
            lnd_out = self.landmarks(I_out).float()
        I_out = I_out.float()
        losses = {"identity": identity_loss(id_ref, id_out),
                  "landmarks": landmark_loss(lnd_ref, lnd_out, image_side=m.resolution, unit_side=weights.landmark_units)}
        total = weights.identity * losses["identity"] + weights.landmarks * losses["landmarks"]
        if not self.is_cross(step):
            losses["reconstruction"] = reconstruction_loss(I_attr.float(), I_out, mask=weights.pixel_mask,
                                                           reduction=weights.pixel_reduction)
            total = total + weights.reconstruction * losses["reconstruction"]
        losses["non_adversarial"] = total
        if self.is_adversarial(step):
            d = self.discriminator
            losses["adversarial"] = generator_adversarial_loss(d(w))
            losses["discriminator"] = discriminator_loss(d(w_real), d(w.detach()))
            losses["r1"] = r1_penalty(d, w_real, weights.r1_gamma)
        return losses

    def step(self, step: int, I_id: Tensor, I_attr: Tensor, w_real: Tensor,  # noqa: N803
             shared: Tensor | None = None) -> dict[str, Tensor]:
        """One optimisation step; returns the losses (averaged over ranks) as 0-d float32 tensors on the device.
        Nothing here waits for the GPU: reading a value does (the loop reads them every `log_every` steps).

        Across ranks one all-reduce carries every gradient of the step and the losses (and, only while E_attr's
        BatchNorm trains, one broadcast its statistics), not one collective per tensor. `shared`: a float tensor
        on the device that rides along in that all-reduce and is averaged over ranks in place (the loop's stop
        vote), so that nothing else needs a collective of its own."""
        # as DDP does: every rank uses rank 0's BatchNorm statistics
        broadcast_from_rank0(training_norm_buffers(self.model.attribute_encoder), self.dist)
        losses = self.compute_losses(step, I_id, I_attr, w_real)
        adversarial = "adversarial" in losses
        updates = [("non_adversarial", self.g_params,
                    torch.autograd.grad(losses["non_adversarial"], self.g_params, retain_graph=adversarial))]
        if adversarial:
            updates.append(("adversarial", self.g_params,
                            torch.autograd.grad(self.config.losses.adversarial * losses["adversarial"], self.g_params)))
            updates.append(("discriminator", self.d_params,
                            torch.autograd.grad(losses["discriminator"] + losses["r1"], self.d_params)))
        values = torch.stack([v.detach().float() for v in losses.values()])
        extra = [shared] if shared is not None else []
        average_across_ranks([g for _, _, grads in updates for g in grads] + [values] + extra, self.dist)
        for name, params, grads in updates:
            for p, g in zip(params, grads):
                p.grad = g
            self.optimizers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)
        return dict(zip(losses, values.unbind()))


# ------------------------------------------------------------------------------------- checkpoints


def state_path_for(checkpoint: Path) -> Path:
    """The training-state file that sits beside a model checkpoint."""
    return checkpoint.with_name(checkpoint.name.replace(".safetensors", ".state.safetensors"))


def save_checkpoint(out: Path, step: int, trainer: Trainer, order: DataOrder, validator: Validator | None = None) -> Path:
    """Training state first, then the model checkpoint: a checkpoint file that exists is always complete."""
    path = checkpoint_path(out, step)
    tensors: dict[str, Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    groups = {}
    for name, opt in trainer.optimizers.items():
        sd = opt.state_dict()
        groups[name] = sd["param_groups"]
        for idx, slots in sd["state"].items():
            for key, value in slots.items():
                tensors[f"optimizer.{name}.{idx}.{key}"] = value
    header = {"format": STATE_FORMAT, "step": step, "order": order.state(), "param_groups": groups}
    if validator is not None:
        header["validation"] = validator.state.to_dict()
    write_safetensors(state_path_for(path), tensors, {"deid": json.dumps(header)})
    trainer.model.save(path, step=step, discriminator=trainer.discriminator)
    return path


def restore_training_state(checkpoint: Path, trainer: Trainer, order: DataOrder, validator: Validator | None = None) -> int:
    """Load optimisers, RNG, data order and validation bests of `checkpoint` (its model weights are loaded
    already)."""
    state_path = state_path_for(checkpoint)
    if not state_path.is_file():
        raise DeidError(f"{checkpoint}: its training state {state_path.name} is missing, so the run cannot resume "
                        "exactly. Start a new run (another --out) from scratch.")
    tensors, metadata = read_safetensors(state_path)
    header = json.loads(metadata.get("deid", "{}"))
    if header.get("format") != STATE_FORMAT:
        raise DeidError(f"{state_path}: not a deid training state. Start a new run (another --out) from scratch.")
    for name, opt in trainer.optimizers.items():
        state: dict[int, dict[str, Tensor]] = {}
        prefix = f"optimizer.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, slot = key[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[slot] = value
        opt.load_state_dict({"state": state, "param_groups": header["param_groups"][name]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    order.restore(header["order"])
    if validator is not None:
        validator.state = ValidationState.from_dict(header.get("validation"))
    return int(header["step"])


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and their training states); keep=0 keeps all."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(out)[:-keep]:
        state_path_for(p).unlink(missing_ok=True)
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- logging


class LossMeter:
    """Sums each loss on the device across steps, so that reading them (a wait for the GPU) happens once per
    logged window, not once per step."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, Tensor]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        """Mean of each loss over the steps that had it, since the last pop (one device-to-host copy)."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys]).tolist()
        self.sums, self.counts = {}, {}
        return dict(zip(keys, means))


class RunLog:
    """Losses (means over windows of `log_every` steps, each entry at its window's last step) to `losses.jsonl`
    and TensorBoard (rank 0 only). A resumed run first drops the entries of steps it will redo, so the curve
    has no duplicates; windows also close at checkpoints, so an interrupted run's curve resumes cleanly."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool):
        self.path = out / "losses.jsonl"
        if self.path.exists():
            # (a line cut by a kill is dropped with the rest of the steps that will be redone)
            kept = [line for line in complete_lines(self.path) if json.loads(line)["step"] < start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            # lazy: tensorboard is a slow import needed only on rank 0 of a training run
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step)

    def write(self, step: int, losses: dict[str, float], steps_per_second: float, data_wait_fraction: float = 0.0,
              steps: int = 1) -> None:
        """`steps`: the window's length; `data_wait_fraction`: its share of time spent waiting for batches."""
        entry = {"step": step, **losses, "steps": steps, "steps_per_second": steps_per_second,
                 "data_wait_fraction": data_wait_fraction}
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(f"loss/{key}", value, step)
            self.writer.add_scalar("speed/steps_per_second", steps_per_second, step)
            self.writer.add_scalar("speed/data_wait_fraction", data_wait_fraction, step)

    def write_validation(self, step: int, metrics: dict[str, float]) -> None:
        """A validation result: its own line {"step": s, "validation": {...}} and TensorBoard `validation/*`."""
        self.file.write(json.dumps({"step": step, "validation": metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"validation/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def save_sample_grid(model: Disentangler, identities: Tensor, attributes: Tensor, path: Path) -> Path:
    """The paper's Fig. 4 table in `deid mix`'s layout: identity images along the top, attribute images down
    the left, each cell the model's output for that pair. identities/attributes: [K, 3, R, R] in [-1, 1]."""

    was_training = model.training
    model.eval()
    try:
        cells = mix_grid(model, identities, attributes).float()
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid_image(cells, identities, attributes), path, overwrite=True)
    return path


# --------------------------------------------------------------------------------------- the run


class StopFlag:
    """Ctrl-C / SIGTERM ask training to stop at the next step boundary (after which a checkpoint is written);
    a second Ctrl-C interrupts at once.

    Across ranks every rank must stop after the same step. Each step's vote (`vote`) travels in the step's
    one all-reduce (`Trainer.step(shared=...)`), and is read, which waits for the device, only at the steps
    where the loop waits anyway (log entries and checkpoints): a stop asked for on any rank then stops all
    of them within `log_every` steps, with no collective and no wait of its own."""

    def __init__(self):
        self.requested = False
        self._vote: Tensor | None = None  # on the device, reused: a fresh tensor per step would copy from the host

    @contextmanager
    def installed(self):
        if not _in_main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):  # noqa: ARG001
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def vote(self, dist: Dist, device: torch.device) -> Tensor | None:
        """This rank's vote for the step's all-reduce: [1] float32 on `device`, 1 when asked to stop (None for a
        single process). Filled in place: no host-to-device copy, so no wait for the GPU."""
        if dist.world == 1:
            return None
        if self._vote is None:
            self._vote = torch.zeros(1, device=device)
        return self._vote.fill_(float(self.requested))

    def agreed(self, vote: Tensor | None, boundary: bool) -> bool:
        """True on every rank when any rank was asked to stop; `vote` is after the all-reduce. A single process
        answers every step; ranks answer only at a `boundary` step (all of them at the same one)."""
        if vote is None:
            return self.requested
        return boundary and bool(vote.item() > 0)


def _in_main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()


def _prepare_out(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite an existing run."""
    existing = list_checkpoints(config.out)
    if config.resume:
        if not existing:
            raise DeidError(f"{config.out}: nothing to resume (no checkpoint). Drop --resume to start this run.")
        return latest_checkpoint(config.out)
    if existing:
        raise DeidError(f"{config.out}: already holds a training run. Continue it with --resume, or choose another --out.")
    return None


def _describe(config: TrainConfig, model_config: ModelConfig, lrs: tuple[float, float, float], dist: Dist) -> None:
    s, w = config.schedule, config.losses
    info(f"[bold]deid train[/bold] -> {config.out}  ({dist.world} process(es), batch {config.batch_size} each)")
    info(f"  generator {model_config.generator}; E_id {model_config.identity.source}; "
         f"E_attr init {model_config.attributes.source}; E_lnd {model_config.landmarks.source}")
    info(f"  losses: λ_id={w.identity} λ_lnd={w.landmarks} λ_rec={w.reconstruction} (same-image steps) "
         f"λ_adv={w.adversarial} R1 γ={w.r1_gamma}")
    info(f"  schedule: cross pairs when step % {s.cross_every} == 0; adversarial when step % {s.adversarial_every} == 0; "
         f"Adam betas {tuple(s.betas)}, lr non-adversarial {lrs[0]:g}, adversarial {lrs[1]:g}, D_W {lrs[2]:g}")
    info(f"  recipe: L1 pixel mask {w.pixel_mask}, reduction {w.pixel_reduction}; landmarks in "
         f"{f'{w.landmark_units}-pixel units' if w.landmark_units else 'generator pixels'}; E_attr BatchNorm "
         f"{model_config.attributes.batchnorm}; init {model_config.initialiser}; D_W real w {config.real_w}; "
         f"1024 preset {s.recipe_1024}")
    v = config.validation
    info(f"  validation: " + (f"every {v.every} steps on {v.batches} batches of {v.holdout:g} held-out samples"
                             f"{f', early stop after {v.early_stop} without a new best' if v.early_stop else ''}"
                             if v.every > 0 else "off"))
    info(f"  steps {config.steps}, checkpoint every {config.checkpoint_every}, samples every {config.sample_every}, "
         f"precision {config.precision}, seed {config.seed}")


def train(config: TrainConfig, on_step=None) -> Path:
    """Run (or resume) training; returns the last checkpoint written.

    on_step(step, losses) is called after every step with the step's losses as 0-d tensors on the device
    (scripts use it to collect the loss curve; reading a value waits for the GPU)."""
    dist, device = init_distributed(config.device)
    with cudnn_autotuning(device):
        # When one rank cannot start (rank 0 alone writes the run folder), every rank stops at once with its
        # message instead of waiting in the first collective until the timeout.
        with dist.failures_shared():
            run, start = _start(config, dist, device)
        try:
            return _loop(run, start, on_step)
        finally:
            run.batches.close()
            if run.log is not None:
                run.log.close()


@contextmanager
def cudnn_autotuning(device: torch.device):
    """cuDNN's autotuner on for this run on a GPU (every step has the same shapes: the search pays once, then
    each step gains), and the caller's process-wide setting back afterwards."""
    saved = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _start(config: TrainConfig, dist: Dist, device: torch.device) -> tuple[_Run, int]:
    """Check the run folder and the dataset, build the networks (with their resumed state), open the log."""
    dtype = resolve_dtype(config.precision, device)
    if dtype == torch.float16:
        raise DeidError("--precision fp16 is not supported for training (its range is too small for these losses). "
                        "Use bf16 or fp32.")
    resume_from = _prepare_out(config)
    model_config = config.model.with_absolute_paths()
    if resume_from is not None:
        header, tensors = read_checkpoint(resume_from)
        model_config = ModelConfig.from_dict(header["config"])

    # Everything that can refuse the run happens on the CPU, before any GPU work; an incomplete dataset is
    # refused even before the networks are loaded (or downloaded).

    verify_dataset(config.data)
    sources = [model_config.generator, model_config.identity.source, model_config.landmarks.source]
    sources += [model_config.attributes.source] if resume_from is None else []  # a resumed E_attr needs no init
    if dist.world > 1:  # downloaded once per node, not by every rank into one cache
        dist.first_on_each_node(lambda: [resolve(source) for source in sources])
    generator = build_generator(model_config, "cpu")
    config = dataclasses.replace(config, batch_size=config.batch_size or config.schedule.batch_size(generator.resolution))
    dataset = check_dataset(config.data, generator, min_count=2 * config.batch_size * dist.world)
    config, holdout = with_holdout(config, len(dataset), resumed=resume_from is not None)
    train_count = len(dataset) - holdout
    if train_count < 2 * config.batch_size * dist.world:
        raise DatasetError(f"{config.data}: {len(dataset)} samples with {holdout} held out for validation leave {train_count}, "
                           f"fewer than the {2 * config.batch_size * dist.world} that two batches need. Lower --holdout, "
                           "turn validation off (--validate-every 0), or make a larger dataset.")
    model = Disentangler(model_config, generator, initialise_attributes=resume_from is None)
    landmarks = LandmarkEncoder(model_config.landmarks)
    discriminator = build_discriminator(model_config, generator.w_dim)
    if resume_from is not None:
        _load_trained(model, discriminator, tensors, resume_from)
    model.to(device)
    landmarks.to(device)
    discriminator.to(device)

    trainer = Trainer(config, model, landmarks, discriminator, dist, dtype)
    order = DataOrder(train_count, config.batch_size, config.seed, dist)
    validator = None
    if config.validation.every > 0:
        pairs = validation_batches(train_count, holdout, config.validation.batches, config.batch_size, config.seed)
        validator = Validator(config.validation, config.out, model, landmarks, pairs,
                              lambda indices: load_batch(dataset, indices, device)[0], dist, dtype,
                              config.losses.landmark_units)
    start = restore_training_state(resume_from, trainer, order, validator) if resume_from is not None else 0
    if dist.main:
        config.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config.out / "config.json", dataclasses.replace(config, model=model.config).to_json())
        _describe(config, model.config, config.schedule.learning_rates(model.resolution), dist)
        info(f"  data: {len(dataset)} samples ({train_count} train), {truncation_text(dataset.manifest)}")
        if resume_from is not None:
            info(f"  resuming from {resume_from} (step {start})")
    workers = config.data_workers if config.data_workers is not None else default_workers(device, dist.world)
    run = _Run(config, trainer, dataset, order, dist, device,
               log=RunLog(config.out, start, config.tensorboard) if dist.main else None,
               samples=_sample_images(dataset, config.sample_count, device) if dist.main and config.sample_every else None,
               batches=TrainBatches(dataset, order, device, workers), validator=validator)
    if validator is not None:
        validator.log = run.log
    return run, start


def _load_trained(model: Disentangler, discriminator: LatentDiscriminator, tensors: dict, path: Path) -> None:
    model.attribute_encoder.load_state_dict(unprefixed("attribute_encoder.", tensors))
    model.mapper.load_state_dict(unprefixed("mapper.", tensors))
    d_state = unprefixed("discriminator.", tensors)
    if not d_state:
        raise DeidError(f"{path}: an inference-only checkpoint (no D_W); training cannot resume from it.")
    discriminator.load_state_dict(d_state)


def _sample_images(dataset, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Fixed identity and attribute images for the sample grids: the dataset's first 2K samples."""
    k = max(1, min(count, len(dataset) // 2))
    ids, _ = load_batch(dataset, list(range(k)), device)
    attrs, _ = load_batch(dataset, list(range(k, 2 * k)), device)
    return ids, attrs


@dataclass
class _Run:
    """What the training loop works with."""

    config: TrainConfig
    trainer: Trainer
    dataset: object  # train.dataset.GeneratedDataset
    order: DataOrder
    dist: Dist
    device: torch.device
    log: RunLog | None  # rank 0 only
    samples: tuple[Tensor, Tensor] | None  # fixed identity and attribute images of the sample grids
    batches: TrainBatches  # decodes ahead in worker processes; advances `order` as batches are consumed
    validator: Validator | None = None

    def batch(self) -> tuple[Tensor, Tensor]:
        return self.batches.next()

    def real_ws(self, step: int, batch_ws: Tensor) -> Tensor:
        """D_W's real w's of `step` [B, w_dim]: the batch's own (real_w "batch"), or (official) w's of training
        samples drawn at random, independently of the batch, seeded by (seed, step) so resume draws the same."""
        if self.config.real_w == "batch":
            return batch_ws
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 2**40 + step)  # a stream of its own
        drawn = torch.randint(self.order.count, (self.config.batch_size * self.dist.world,), generator=g)
        mine = drawn[self.dist.rank * self.config.batch_size:(self.dist.rank + 1) * self.config.batch_size]
        return to_device(torch.from_numpy(np.asarray(self.dataset.ws[mine.numpy()], dtype=np.float32)), self.device)


def _loop(run: _Run, start: int, on_step) -> Path:
    """Steps `start` .. config.steps - 1. Across ranks each step has one collective, the step's all-reduce; the
    steps that validate, log, draw samples or checkpoint add their own exchanges (failures included: a rank 0
    that cannot write stops every rank with its message, see `Dist.failures_shared`)."""
    config, trainer, dist = run.config, run.trainer, run.dist
    stop = StopFlag()
    last_path = None
    step = start
    meter, window = LossMeter(), _Window(start, run.batches.stats.wait_seconds)
    with stop.installed(), progress(TextColumn("{task.fields[status]}")) as bar:
        task = bar.add_task("train", total=config.steps, completed=start, status="", visible=dist.main)
        while step < config.steps:
            if run.validator is not None and run.validator.due(step):
                if run.validator.run(step):
                    last_path = _checkpoint(run, step)
                    info(f"early stop: no new best in {config.validation.early_stop} validations in a row; "
                         f"checkpoint {last_path} written.")
                    return last_path
                window = _Window(step, run.batches.stats.wait_seconds)  # validating is not a training step
            I_id, w_id = run.batch()
            I_attr, w_attr = run.batch() if trainer.is_cross(step) else (I_id, w_id)
            w_real = run.real_ws(step, w_attr) if trainer.is_adversarial(step) else w_attr  # w_real: adversarial steps only
            vote = stop.vote(dist, run.device)
            losses = trainer.step(step, I_id, I_attr, w_real, shared=vote)
            meter.add(losses)
            step += 1
            if on_step is not None:
                on_step(step - 1, losses)
            boundary = step % config.log_every == 0 or step % config.checkpoint_every == 0 or step == config.steps
            stopping = stop.agreed(vote, boundary)
            checkpointing = step % config.checkpoint_every == 0 or step == config.steps or stopping
            logging = boundary or stopping
            sampling = config.sample_every > 0 and step % config.sample_every == 0
            if logging:
                means = meter.pop()  # waits for the GPU: the window's timing below is honest
                rate, waiting = window.close(step, run.batches.stats.wait_seconds)
            if logging or sampling:
                with dist.failures_shared():  # rank 0 writes; a full disk there stops every rank with its message
                    if logging and run.log is not None:
                        run.log.write(step - 1, means, rate, waiting, steps=window.steps)
                        bar.update(task, status=_status(rate, means))
                    if sampling and run.samples is not None:
                        save_sample_grid(trainer.model, *run.samples, config.out / "samples" / f"step-{step:08d}.png")
            bar.update(task, completed=step)
            if checkpointing:
                last_path = _checkpoint(run, step)
            if logging:  # the next window starts after any checkpoint: its writing is not a training step
                window = _Window(step, run.batches.stats.wait_seconds)
            if stopping:
                raise TrainingInterrupted(
                    f"interrupted after step {step}; checkpoint {last_path} written. "
                    f"Continue with `deid train --data {config.data} --out {config.out} --resume`.")
    if last_path is None:  # nothing to do: the run had already reached --steps
        info(f"{config.out}: already trained for {start} steps (--steps {config.steps}); nothing to do.")
        return latest_checkpoint(config.out)
    if run.validator is not None:
        # The final model is always measured (the loop validated only before steps), after the last
        # checkpoint, so its bests are written.
        run.validator.run(step)
    return last_path


class _Window:
    """Steps/s and the share of time spent waiting for data, over the steps since the last log entry."""

    def __init__(self, step: int, wait_seconds: float):
        self.start_step, self.wait_seconds, self.start = step, wait_seconds, time.perf_counter()
        self.steps = 0

    def close(self, step: int, wait_seconds: float) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.steps = step - self.start_step
        return self.steps / elapsed, min(1.0, (wait_seconds - self.wait_seconds) / elapsed)


def _checkpoint(run: _Run, step: int) -> Path:
    path = checkpoint_path(run.config.out, step)
    with run.dist.failures_shared():  # also the barrier: a rank 0 that cannot write stops every rank with its message
        if run.dist.main:
            save_checkpoint(run.config.out, step, run.trainer, run.order, run.validator)
            prune_checkpoints(run.config.out, run.config.keep_checkpoints)
    return path


def _status(rate: float, losses: dict[str, float]) -> str:
    short = {"identity": "id", "landmarks": "lnd", "reconstruction": "rec", "adversarial": "adv",
             "discriminator": "D", "r1": "r1"}
    parts = [f"{short[k]} {v:.4g}" for k, v in losses.items() if k in short]
    return f"{rate:.2f} step/s  " + "  ".join(parts)


__all__ = ["Trainer", "TrainingInterrupted", "DataOrder", "train", "save_checkpoint", "restore_training_state",
           "save_sample_grid", "check_dataset"]
