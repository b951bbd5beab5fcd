"""The `deid` command line. Thin: each command parses options, builds one config and calls one function."""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape
from rich.table import Table

from deid import __version__
from deid.atomic import check_output_path
from deid.console import console, info, set_debug, set_quiet
from deid.errors import DeidError, WeightsError
from deid.evaluation.audit import FAIL_SAFES, AuditConfig
from deid.interrupts import Terminated, sigterm_as_interrupt
from deid.media.video import EncodeOptions
from deid.nets.encoders import AttributeEncoderConfig, IdentityEncoderConfig, LandmarkEncoderConfig
from deid.nets.model import DEFAULT_MODEL, ModelConfig, default_model_installed
from deid.pipelines.anonymize import AnonymizeJob, run_anonymize
from deid.pipelines.engines import ENGINES
from deid.pipelines.cluster import ModelOptions, RayOptions, import_ray, run_anonymize_on_ray
from deid.pipelines.evaluate import PairsJob, VideoAuditJob, run_pairs, run_video_audit
from deid.pipelines.figures import InterpolateJob, MixJob, run_interpolate, run_mix
from deid.pipelines.reenact import ReenactJob, run_reenact
from deid.devices import MODEL_PRECISIONS, resolve_device
from deid.distributed import rank_device
from deid.stylegan.loading import convert_generator
from deid.train.config import Schedule, TrainConfig, Validation
from deid.train.launch import launch, run_worker
from deid.train.make_dataset import MakeDatasetConfig, make_dataset, verify_with_progress
from deid.weights import REGISTRY, entry_for, fetch_with_progress, import_file, resolve, statuses, weights_home

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=110, show_default=True)


@click.group(context_settings=CONTEXT)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors: no progress bars or summaries.")
@click.option("--debug", is_flag=True, help="Show a full traceback for every error, user errors included.")
@click.option("--offline", is_flag=True, help="Never touch the network (same as DEID_OFFLINE=1): missing weights are an error.")
@click.version_option(__version__, prog_name="deid")
def cli(quiet: bool, debug: bool, offline: bool) -> None:
    """deid: replace the identity of faces in images and video, keeping pose, expression and lighting.

    \b
    Examples:
      deid weights fetch --all                         # download the pretrained networks once
      deid anonymize talk.mp4 --identity target.png -o talk_anon.mp4
      deid reenact portrait.png driving.mp4 -o reenacted.mp4
    """
    set_quiet(quiet)
    set_debug(debug)
    if offline:
        os.environ["DEID_OFFLINE"] = "1"


def device_option(func):
    """`--device`, declared once for every command that runs networks."""
    return click.option(
        "--device",
        default="auto",
        help="Where networks run: auto, cpu, cuda, cuda:N or mps (auto picks a GPU when there is one).",
    )(func)


def model_options(func):
    """`--model`, `--device` and `--precision`: declared once, used by every command that runs a trained model."""
    func = click.option(
        "--precision",
        type=click.Choice(list(MODEL_PRECISIONS)),
        default="auto",
        help="Numeric precision of the networks: auto is fp32, with the generator in bf16 on a CPU with native bf16 (AVX512-BF16 or AMX); fp16 needs a GPU.",
    )(func)
    func = device_option(func)
    func = click.option(
        "--model",
        default=DEFAULT_MODEL,
        help="A trained deid model: a run directory (its latest checkpoint; RUN:best-identity, RUN:best-landmarks or RUN:step-N for another), a checkpoint file, or a registry name.",
    )(func)
    return func


def load_model_from_options(model: str, device: str, precision: str):
    """The `model_options` trio -> (trained model on its device, the device, the Precision to run it in); see
    ModelOptions.load (under torchrun, `--device auto` is the rank's own GPU)."""
    return ModelOptions(model, device, precision).load()


class OptionConflict(click.ClickException):
    """A usage error (exit 2) shown as its one line, without click's usage block: options that each parse but do not
    go together, where the block adds nothing."""

    exit_code = 2


def model_named(ctx: click.Context) -> bool:
    """Whether the user gave `--model` (a model they name must resolve; the default one may be absent)."""
    return ctx.get_parameter_source("model") is not ParameterSource.DEFAULT


def anonymize_engine(requested: str | None, wants_model: bool) -> str:
    """`--engine`, or without it `generate` when a model is wanted (named with --model, or options only it uses) or
    available (the default one registered), and otherwise `mask`, said in one line before the run starts."""
    if requested is not None:
        return requested
    if wants_model or default_model_installed():
        return "generate"
    info("no trained deid model: faces are masked, not replaced (--engine mask); to replace them, train one "
         "(README: Training your own model).")
    return "mask"


class GreedyOptionsCommand(click.Command):
    """Lets options marked `multiple=True` take several values after one flag (`--identity a.png b.png`),
    as well as the repeated form (`--identity a.png --identity b.png`)."""

    def parse_args(self, ctx, args):
        greedy = {name for p in self.params if isinstance(p, click.Option) and p.multiple for name in p.opts}
        rewritten, current = [], None
        for arg in args:
            if arg in greedy:
                current = arg
                continue
            if arg.startswith("-"):
                current = None
            if current is not None:
                rewritten += [current, arg]
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


# ----------------------------------------------------------------------------------------- weights


@cli.group("weights")
def weights_group() -> None:
    """List, download, import and verify the pretrained networks.

    \b
    Examples:
      deid weights list
      deid weights fetch stylegan2-ffhq-256 facenet-vggface2
      deid weights fetch --all
      deid weights import stylegan2-ffhq-256 ~/Downloads/ffhq-res256-mirror-paper256-noaug.pkl
      deid weights verify
    """


@weights_group.command("list")
def weights_list() -> None:
    """Show every pretrained network: what it is, its size, where it lives and whether it is here.

    \b
    Examples:
      deid weights list
      DEID_HOME=/data/deid deid weights list
    """

    print_weights_table(list(statuses()), title=f"pretrained networks (cache: {weights_home_text()})")


@weights_group.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "fetch_all", is_flag=True, help="Fetch every downloadable network.")
@click.option("--force", is_flag=True, help="Download again even if the file is already cached.")
def weights_fetch(names: tuple[str, ...], fetch_all: bool, force: bool) -> None:
    """Download networks into the cache (resumable; checked against their sha256 before use).

    \b
    Examples:
      deid weights fetch stylegan2-ffhq-256 facenet-vggface2 inception-v3-imagenet fan-2d
      deid weights fetch --all
    """

    if fetch_all:
        names = tuple(n for n, e in REGISTRY.items() if e.kind == "file")
    if not names:
        raise click.UsageError("name at least one network (see `deid weights list`), or use --all.")
    for name in names:
        entry_for(name)  # fail on a typo before downloading anything
    for name in names:
        path = fetch_with_progress(name, force=force)
        console.print(f"{name}: {path}")


@weights_group.command("import")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def weights_import(name: str, path: Path) -> None:
    """Register a file downloaded by hand (or, for deid-ffhq256, a training run directory).

    \b
    Examples:
      deid weights import stylegan2-ffhq-256 ~/Downloads/ffhq-res256-mirror-paper256-noaug.pkl
      deid weights import deid-ffhq256 runs/ffhq256          # its latest checkpoint
    """

    dest = import_file(name, path)
    console.print(f"{name}: imported {path} -> {dest}")


@weights_group.command("verify")
def weights_verify() -> None:
    """Re-hash every cached file and compare with its published or recorded sha256 (exit 1 on a mismatch).

    \b
    Examples:
      deid weights verify
    """

    results = list(statuses(rehash=True))
    print_weights_table(results, title="verification")
    bad = [s.name for s in results if s.state == "corrupt"]
    if bad:
        raise WeightsError(f"corrupt: {', '.join(bad)}. Fetch them again with `deid weights fetch --force {' '.join(bad)}`.")


@weights_group.command("convert")
@click.argument("source")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def weights_convert(source: str, output: Path, overwrite: bool) -> None:
    """Convert a generator (NVIDIA .pkl, rosinality .pt, or a registry name) into deid's .safetensors.

    The result loads without any unpickling and has the same fingerprint as the source network.

    \b
    Examples:
      deid weights convert stylegan2-ffhq-256 ffhq256.safetensors
      deid weights convert ~/Downloads/550000.pt ffhq256-rosinality.safetensors
    """

    check_output_path(output, overwrite)
    path = resolve(source)
    if path is None:
        raise click.UsageError("give a generator file or registry name to convert, not 'random'.")
    console.print(f"wrote {convert_generator(path, output)}")


def weights_home_text() -> str:

    return str(weights_home())


def shorten_path(location: str) -> str:

    home = str(weights_home())
    return location[len(home) + 1:] if location.startswith(home + os.sep) else location


def print_weights_table(rows, title: str) -> None:

    colours = {"missing": "red", "corrupt": "red", "present": "yellow", "verified": "green", "bundled": "green"}
    table = Table(title=title, show_lines=False)
    table.add_column("name", no_wrap=True)
    table.add_column("what it is", overflow="fold", ratio=3)
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("where (under the cache)", overflow="fold", ratio=2)
    table.add_column("state", overflow="fold", ratio=2)
    for s in rows:
        size = "?" if s.bytes is None else f"{s.bytes / (1 << 20):.1f} MiB"
        if s.state == "missing" and s.bytes is not None:
            size = "~" + size
        state = f"[{colours[s.state]}]{s.state}[/]" + (f"\n{s.detail}" if s.detail else "")
        table.add_row(s.name, s.description, size, shorten_path(s.location), state)
    console.print(table)


# ------------------------------------------------------------------------------------ make-dataset
# (generator issue: `deid make-dataset`)


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter("a positive integer or 'auto'")
    return int(value)


@cli.command("make-dataset")
@click.option("--n", "-n", "n", type=click.IntRange(min=1), help="Number of samples to generate (70000 in the paper); -n under torchrun, whose parser takes --n for its own.")
@click.option("--out", type=click.Path(path_type=Path), help="Dataset folder: new or empty (or an interrupted run, with --resume).")
@click.option("--generator", default=MakeDatasetConfig.generator, help="Generator: registry name or file (.pkl, .pt, .safetensors).")
@click.option("--seed", type=int, default=MakeDatasetConfig.seed, help="Sample i depends only on (seed, i).")
@click.option("--truncation", type=float, default=MakeDatasetConfig.truncation, help="Truncation psi: w = w_avg + psi (w - w_avg) (1.0 = none, as the official code's first version).")
@click.option("--truncation-cutoff", type=click.IntRange(min=1), default=MakeDatasetConfig.truncation_cutoff, help="Truncate the first K style rows (default: all). With psi != 1 K must cover every row: deid's mapper makes one w for all of them.")
@click.option("--batch-size", default="auto", help="Samples per batch, or auto (from device and resolution).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out; the result equals an uninterrupted run.")
@click.option("--verify", "verify_dir", type=click.Path(path_type=Path), help="Check that a dataset is complete and intact (hashes every image), then exit.")
@device_option
def make_dataset_command(n, out, generator, seed, truncation, truncation_cutoff, batch_size, resume, verify_dir, device):
    """Sample the pretrained generator: images (PNG) and their w, the training data of the mapper.

    \b
    Examples:
      deid make-dataset --n 70000 --out generated/
      deid make-dataset --n 70000 --out generated/ --resume          # after an interruption
      deid make-dataset --n 70000 --out generated/ --truncation 0.7  # psi 0.7 on every style row
      torchrun --nproc-per-node 8 --no-python deid make-dataset -n 70000 --out generated/   # one share per GPU
      deid make-dataset --verify generated/
    """

    if verify_dir is not None:
        verify_with_progress(verify_dir)
        return
    if n is None or out is None:
        raise click.UsageError("give --n and --out (or --verify DIR).")
    make_dataset(MakeDatasetConfig(out=out, n=n, generator=generator, seed=seed, truncation=truncation,
                                   truncation_cutoff=truncation_cutoff, batch_size=_batch_size(batch_size), device=device,
                                   resume=resume))

# ------------------------------------------------------------------------------------------- train
# (model issue: `deid train`)


@cli.command("train")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Dataset made by `deid make-dataset`.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory: checkpoints/, samples/, tensorboard/, losses.jsonl.")
@click.option("--generator", default=ModelConfig.generator, help="Frozen StyleGAN2 (the dataset's): registry name, file, or random.")
@click.option("--identity-encoder", default=IdentityEncoderConfig.source, help="E_id weights (frozen): registry name, file, or random.")
@click.option("--attribute-encoder", default=AttributeEncoderConfig.source, help="E_attr initial weights: registry name, file, or random.")
@click.option("--landmark-encoder", default=LandmarkEncoderConfig.source, help="E_lnd weights (frozen 2D FAN): registry name, file, or random.")
@click.option("--steps", type=click.IntRange(min=1), default=TrainConfig.steps, help="Total optimisation steps (a resumed run continues up to this).")
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, help="Images per step and process (default: the recipe's, 6; 2 at 1024 with --recipe-1024 paper).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint (same loss curve as an uninterrupted run).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=TrainConfig.precision, help="Network precision (bf16 autocast; losses stay fp32).")
@click.option("--gpus", type=click.IntRange(min=1), default=TrainConfig.gpus, help="Processes (GPUs) to train on: >1 relaunches under torchrun.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=TrainConfig.checkpoint_every, help="Steps between checkpoints (one is also written at the end and on Ctrl-C).")
@click.option("--sample-every", type=click.IntRange(min=0), default=TrainConfig.sample_every, help="Steps between identity x attribute sample grids (0 = none).")
@click.option("--seed", type=int, default=TrainConfig.seed, help="Seed of the data order.")
@click.option("--validate-every", type=click.IntRange(min=0), default=Validation.every, help="Steps between validations on held-out samples, one also before the first step (0 = none).")
@click.option("--validation-batches", type=click.IntRange(min=1), default=Validation.batches, help="Cross-identity batches per validation.")
@click.option("--holdout", type=click.FloatRange(min=0), default=Validation.holdout, help="Samples held out for validation: a count (>= 1) or a fraction (< 1). A resumed run keeps its own.")
@click.option("--early-stop", type=click.IntRange(min=0), default=Validation.early_stop, help="Stop after this many validations in a row without a new best (0 = never).")
@click.option("--recipe-1024", type=click.Choice(["paper", "official"]), default=Schedule.recipe_1024, help="At 1024: the paper's batch 2 and learning rates /10, or the official code's batch 6 and 1e-5.")
@click.option("--log-every", type=click.IntRange(min=1), default=TrainConfig.log_every, help="Steps per losses.jsonl entry (their mean, steps/s and data-wait share).")
@click.option("--data-workers", type=click.IntRange(min=0), default=TrainConfig.data_workers, help="PNG-decoding processes per GPU (default: from the CPU cores; 1 on a CPU).")
@device_option
def train_command(data, out, generator, identity_encoder, attribute_encoder, landmark_encoder, steps, batch_size, resume,
                  precision, gpus, checkpoint_every, sample_every, seed, validate_every, validation_batches, holdout,
                  early_stop, recipe_1024, log_every, data_workers, device):
    """Train the attribute encoder and latent mapper (the paper's schedule and losses) against a frozen generator.

    \b
    Examples:
      deid train --data generated/ --out runs/ffhq256
      deid train --data generated/ --out runs/ffhq256 --resume          # after Ctrl-C or a crash
      deid train --data generated/ --out runs/ffhq256 --gpus 4          # torchrun, 4 processes
      tensorboard --logdir runs/ffhq256/tensorboard
      deid mix --model runs/ffhq256:best-identity ...                    # the best validated checkpoint
    """

    model = ModelConfig(generator=generator, identity=IdentityEncoderConfig(source=identity_encoder),
                        attributes=AttributeEncoderConfig(source=attribute_encoder),
                        landmarks=LandmarkEncoderConfig(source=landmark_encoder))
    config = TrainConfig(data=data, out=out, model=model, steps=steps, batch_size=batch_size, resume=resume,
                         precision=precision, device=device, seed=seed, checkpoint_every=checkpoint_every,
                         sample_every=sample_every, gpus=gpus, schedule=Schedule(recipe_1024=recipe_1024),
                         validation=Validation(every=validate_every, batches=validation_batches, holdout=holdout,
                                               early_stop=early_stop), log_every=log_every, data_workers=data_workers)
    launch(config)


@cli.command("train-worker", hidden=True)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def train_worker(config_file):
    """One process of a `deid train --gpus N` run, started by torchrun with the launch file it wrote."""
    run_worker(config_file)


# --------------------------------------------------------------------------- anonymize and reenact
# (video issue: `deid anonymize`, `deid reenact`)


def encode_options(func):
    """`--crf`, `--codec` and `--keep-metadata`: how output video is encoded."""
    func = click.option("--codec", default=EncodeOptions.codec, show_default=False,
                        help="Video encoder (libx264, libx265, libvpx-vp9, ...) [default: the output type's usual one: "
                             "H.264 for .mp4/.mkv/.mov/.ts, VP9 for .webm, MPEG-4 for .avi].")(func)
    func = click.option("--crf", type=click.IntRange(0, 63), default=EncodeOptions.crf, help="Encoder quality (lower is better; x264: 0-51).")(func)
    func = click.option("--keep-metadata", is_flag=True,
                        help="Copy every container and stream tag of the source (title, comment, GPS, vendor keys...); "
                             "by default only creation_time and language are kept.")(func)
    return func


@cli.command("anonymize")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output file (one input) or directory (mirrors the inputs' tree).")
@click.option("--identity", type=click.Path(path_type=Path),
              help="Photo whose identity every face takes (its largest face); omit for a random identity per person.")
@click.option("--seed", type=int, default=AnonymizeJob.seed, help="Seed of the random identities (without --identity).")
@click.option("--shared-identities", is_flag=True,
              help="Give person k of every file the same random identity (default: every person of every file differs).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise: error for one file, skip in a batch).")
@click.option("--batch-size", type=click.IntRange(1), default=AnonymizeJob.batch_size, help="Frames per detection batch and faces per generation batch.")
@encode_options
@click.option("--preview", is_flag=True, help="Also write OUTPUT.preview.mp4 with input and output side by side.")
@click.option("--save-crops", is_flag=True, help="Also save the aligned input and generated heads to OUTPUT_crops/.")
@click.option("--shard", metavar="K/N", help="Process only share K (0-based) of N of the inputs (default: torchrun's RANK/WORLD_SIZE).")
@click.option("--fail-safe", type=click.Choice(FAIL_SAFES), default=AuditConfig.fail_safe, show_default=True,
              help="How the audit covers a face it still recognises (or finds unreplaced) before the frame is written.")
@click.option("--no-audit", is_flag=True, help="Skip the privacy audit of each output frame (and so the fail-safe and OUTPUT.audit.json).")
@click.option("--engine", type=click.Choice(ENGINES), default=None, show_default=False,
              help="What each face becomes: generate (a new head from a trained model: the paper's method), mask (a flat "
                   "fill over the head, irreversible, no model), blur or pixelate (no model; recognisers trained on "
                   "such faces can undo them) [default: generate when a model is available (--model, or one imported "
                   "as deid-ffhq256), else mask].")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[auto|ADDRESS]",
              help="Run the batch on a Ray cluster (pip install 'deid[ray]'): `auto` joins the one `ray start` made, "
                   "ADDRESS another; alone, Ray on this machine. Inputs and -o must be paths every node sees.")
@click.option("--workers", type=click.IntRange(1), help="With --ray: actors, each holding the models [default: one per GPU, or per CPU].")
@click.option("--gpus-per-worker", type=click.FloatRange(0), help="With --ray: GPUs per actor (fractions share one) [default: 1 if the cluster has GPUs, else 0].")
@model_options
@click.pass_context
def anonymize(ctx, inputs, output, identity, seed, shared_identities, overwrite, batch_size, crf, codec, keep_metadata, preview,
              save_crops, shard, fail_safe, no_audit, engine, ray_address, workers, gpus_per_worker, model, device, precision):
    """Replace the identity of every face in videos or images, or cover it.

    \b
    Examples:
      deid anonymize talk.mp4 -o talk_anon.mp4                  # no model yet: every head is masked
      deid anonymize talk.mp4 --identity target.png -o talk_anon.mp4
      deid anonymize recordings/ -o anonymized/                 # a random identity per person
      deid anonymize 'clips/*.mov' -o out/ --model runs/ffhq256 --preview
      deid anonymize videos/ -o out/ --shard 3/8                # array job 3 of 8; re-runs skip finished files
      deid anonymize /shared/in -o /shared/out --ray auto       # on the Ray cluster `ray start` made

    Every output frame is audited before it is written (dlib's detector on four orientations and its recogniser);
    faces it still recognises are covered (--fail-safe) and OUTPUT.audit.json records what it found.
    """

    named = model_named(ctx)
    job = AnonymizeJob(inputs=tuple(inputs), output=output, engine=engine or "generate", identity=identity, seed=seed,
                       shared_identities=shared_identities, overwrite=overwrite,
                       batch_size=batch_size, encode=EncodeOptions(codec=codec, crf=crf, keep_metadata=keep_metadata), preview=preview,
                       save_crops=save_crops, shard=shard, audit=None if no_audit else AuditConfig(fail_safe=fail_safe))
    generate_options = job.generate_options() + (["--model"] if named else [])
    if engine not in (None, "generate") and generate_options:
        raise OptionConflict(f"{', '.join(generate_options)}: only for --engine generate (a trained model makes "
                             f"new faces); --engine {engine} covers them.")
    ray = ray_options(ray_address, workers, gpus_per_worker, shard)
    job.check()  # bad paths fail before the model loads
    job = dataclasses.replace(job, engine=anonymize_engine(engine, bool(generate_options)))
    if ray is not None:
        run_anonymize_on_ray(job, ModelOptions(model, device, precision), ray)
    elif job.engine == "generate":
        run_anonymize(job, *load_model_from_options(model, device, precision))
    else:
        run_anonymize(job, device=resolve_device(rank_device(device)))


def ray_options(address: str | None, workers: int | None, gpus_per_worker: float | None, shard: str | None) -> RayOptions | None:
    """`--ray`, `--workers`, `--gpus-per-worker` -> RayOptions (None without --ray); usage errors for what does not go together."""
    if address is None:
        if workers is not None or gpus_per_worker is not None:
            raise click.UsageError("--workers and --gpus-per-worker go with --ray.")
        return None
    if shard:
        raise click.UsageError("--ray and --shard do not go together: Ray hands out the files itself. Drop --shard.")
    if address != "auto" and Path(address).exists():
        raise click.UsageError(f"--ray took {address!r} for a cluster address. Write `--ray auto`, or put --ray after the inputs.")
    import_ray()  # a missing extra fails at once, before anything else is said or done
    return RayOptions(address=None if address == "local" else address, workers=workers, gpus_per_worker=gpus_per_worker)


@cli.command("reenact")
@click.argument("portrait", type=click.Path(path_type=Path))
@click.argument("driving", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output video file.")
@click.option("--paste", is_flag=True, help="Paste the heads into the portrait's frame instead of writing the heads alone.")
@click.option("--preview", is_flag=True, help="Also write OUTPUT.preview.mp4: aligned driving head | generated head.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--batch-size", type=click.IntRange(1), default=ReenactJob.batch_size, help="Frames per detection and generation batch.")
@encode_options
@model_options
def reenact(portrait, driving, output, paste, preview, overwrite, batch_size, crf, codec, keep_metadata, model, device, precision):
    """Make the portrait's person perform a driving video (its pose, expression, timing and audio).

    \b
    Examples:
      deid reenact portrait.png driving.mp4 -o reenacted.mp4
      deid reenact portrait.png driving.mp4 -o reenacted.mp4 --paste --preview --model runs/ffhq256
    """

    job = ReenactJob(portrait=portrait, driving=driving, output=output, overwrite=overwrite, paste=paste,
                     preview=preview, batch_size=batch_size, encode=EncodeOptions(codec=codec, crf=crf, keep_metadata=keep_metadata))
    job.check()  # bad paths fail before the model loads
    run_reenact(job, *load_model_from_options(model, device, precision))

# ---------------------------------------------------------------------------------------- evaluate
# (evaluate issue: `deid evaluate pairs|video`)


@cli.group("evaluate")
def evaluate_group() -> None:
    """Measure a model with networks it never trained with (the paper's Tables 1 and 2), or audit an
    anonymized video for faces that are still recognisable. Each writes DIR/metrics.json and DIR/index.html.

    \b
    Examples:
      deid evaluate pairs --model runs/ffhq256 --images photos/ --n 10000 -o report/
      deid evaluate video talk.mp4 talk_anon.mp4 -o audit/
    """


@evaluate_group.command("pairs")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of face photos (each is detected and aligned).")
@click.option("--dataset", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Or a generated dataset (from `deid make-dataset`) as the real images.")
@click.option("--n", "n", type=click.IntRange(1), default=PairsJob.n,
              help="Random (I_id, I_attr) pairs for Table 1; Table 2 reconstructs up to this many images.")
@click.option("--max-items", type=click.IntRange(2), default=None, help="Use only the first K source images.")
@click.option("--seed", type=int, default=PairsJob.seed, help="Seed of the random pairs.")
@click.option("--batch-size", type=click.IntRange(1), default=PairsJob.batch_size, help="Pairs per model call.")
@click.option("--reconstruction/--no-reconstruction", default=PairsJob.reconstruction, help="Also compute Table 2 (I_id = I_attr).")
@click.option("--fid/--no-fid", default=PairsJob.fid, help="Compute FID (needs the `inception-v3-fid` weights).")
@click.option("--fid-weights", default=PairsJob.fid_weights, show_default=True,
              help="FID Inception weights: registry name or file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth).")
@click.option("--fid-dims", type=click.Choice(["2048", "768", "192", "64"]), default=str(PairsJob.fid_dims),
              help="Inception features for FID: 2048 is the standard (comparable) FID; fewer are cheaper previews.")
@click.option("--samples", type=click.IntRange(0), default=PairsJob.samples, help="Sample rows shown in index.html per table.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Report directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report (or discard an interrupted run).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command from its last checkpoint.")
@model_options
def evaluate_pairs(images, dataset, n, max_items, seed, batch_size, reconstruction, fid, fid_weights, fid_dims, samples,
                   output, overwrite, resume, model, device, precision):
    """The paper's Tables 1 and 2 for a model, measured on real faces.

    Table 1: identity, expression, pose and FID on random (I_id, I_attr) pairs; Table 2: reconstruction (I_id = I_attr).

    \b
    Examples:
      deid evaluate pairs --model runs/ffhq256 --images photos/ --n 10000 -o report/
      deid evaluate pairs --model runs/ffhq256 --dataset generated/ --n 10000 -o report/ --resume
      deid evaluate pairs --model runs/ffhq256 --images photos/ --n 200 --no-fid -o quick/
    """

    job = PairsJob(output=output, images=images, dataset=dataset, n=n, max_items=max_items, seed=seed, batch_size=batch_size,
                   reconstruction=reconstruction, fid=fid, fid_weights=fid_weights, fid_dims=int(fid_dims), samples=samples,
                   overwrite=overwrite, resume=resume)
    job.check()  # bad paths and options fail before the model loads
    loaded, _, precision = load_model_from_options(model, device, precision)
    run_pairs(job, loaded, model_source=model, precision=precision)


@evaluate_group.command("video")
@click.argument("original", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("anonymized", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Report directory to create.")
@click.option("--max-items", type=click.IntRange(1), default=None, help="Audit only the first K frames.")
@click.option("--unchanged-psnr", type=float, default=VideoAuditJob.unchanged_psnr,
              help="A face region at least this close (dB) to the original counts as missed (not anonymized).")
@click.option("--samples", type=click.IntRange(0), default=VideoAuditJob.samples, help="Sample frame pairs shown in index.html.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.")
@device_option
def evaluate_video(original, anonymized, output, max_items, unchanged_psnr, samples, overwrite, device):
    """Re-identification audit of an anonymized video against its original.

    Reports how many anonymized faces dlib's recognizer still matches to the original person
    (`reidentification_rate`), identity consistency per tracked face, expression and pose preservation,
    and the frames where a face was missed (left unchanged).

    \b
    Examples:
      deid evaluate video talk.mp4 talk_anon.mp4 -o audit/
      deid evaluate video talk.mp4 talk_anon.mp4 -o audit/ --max-items 300
    """

    job = VideoAuditJob(original=original, anonymized=anonymized, output=output, max_items=max_items,
                        unchanged_psnr=unchanged_psnr, samples=samples, overwrite=overwrite)
    run_video_audit(job, device=resolve_device(device))

# -------------------------------------------------------------------------------- mix, interpolate


@cli.command("mix", cls=GreedyOptionsCommand, short_help="An identity x attributes grid (the paper's figures 2 and 4).")
@click.option("--identity", "identities", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Photos whose identities run along the top (one flag, several paths).")
@click.option("--attributes", "attributes", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Photos whose pose, expression and lighting run down the left.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The grid image (.png or .jpg).")
@click.option("--cell-size", type=click.IntRange(16, 4096), default=None, help="Side of each cell in pixels [default: the generator's resolution].")
@click.option("--labels/--no-labels", default=MixJob.labels, help="Write each input's file name under it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@model_options
def mix(identities, attributes, output, cell_size, labels, overwrite, **model_opts) -> None:
    """An identity x attributes grid, as in the paper's Fig. 2 and 4.

    Every cell is the generated head with the identity of its column and the attributes of its row.
    Any photos work: the largest face of each is detected and aligned first.

    \b
    Examples:
      deid mix --identity alice.jpg bob.jpg --attributes talk1.png talk2.png talk3.png -o grid.png
      deid mix --identity a.png b.png c.png --attributes a.png b.png c.png -o grid.png --cell-size 128
    """

    job = MixJob(tuple(identities), tuple(attributes), output, cell_size, labels, overwrite)
    job.check()  # bad paths fail before the model loads
    run_mix(job, *load_model_from_options(**model_opts))
    console.print(f"wrote {output}")


@cli.command("interpolate", short_help="Interpolate identity or attributes between two photos, in W or in Z.")
@click.option("--vary", type=click.Choice(["identity", "attributes"]), required=True, help="Which code changes from --from to --to.")
@click.option("--space", type=click.Choice(["w", "z"]), default="w", help="Blend the mapped w's (Fig. 11/12) or the codes before mapping (Fig. 16/17).")
@click.option("--from", "start", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Photo at the start.")
@click.option("--to", "end", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Photo at the end.")
@click.option("--fixed", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Photo that supplies the code that does not change.")
@click.option("--steps", type=click.IntRange(2, 1000), default=InterpolateJob.steps, help="Images in a .png/.jpg strip.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="A strip (.png/.jpg) or a video (.mp4/.gif).")
@click.option("--fps", type=click.FloatRange(1, 120), default=InterpolateJob.fps, help="Frame rate of a video output.")
@click.option("--seconds", type=click.FloatRange(0.2, 600), default=InterpolateJob.seconds, help="Length of a video output (eased at both ends).")
@click.option("--cell-size", type=click.IntRange(16, 4096), default=None, help="Side of each image [default: the generator's resolution].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@model_options
def interpolate(vary, space, start, end, fixed, steps, output, fps, seconds, cell_size, overwrite, **model_opts) -> None:
    """Interpolate identity or attributes between two photos, as in the paper's Fig. 11/12 (W) and 16/17 (Z).

    \b
    Examples:
      deid interpolate --vary identity --space w --from alice.jpg --to bob.jpg --fixed talk.png --steps 9 -o strip.png
      deid interpolate --vary attributes --space z --from smile.jpg --to frown.jpg --fixed alice.jpg -o morph.mp4
    """

    job = InterpolateJob(vary, space, start, end, fixed, output, steps=steps, fps=fps, seconds=seconds, cell_size=cell_size,
                         overwrite=overwrite)
    job.check()  # bad paths fail before the model loads
    run_interpolate(job, *load_model_from_options(**model_opts))
    console.print(f"wrote {output}")


def _terminated() -> None:
    set_quiet(False)
    console.print("[red]error:[/red] terminated (SIGTERM); no partial output was left.")
    sys.exit(143)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 1 (runtime) or 2 (usage)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        with sigterm_as_interrupt():  # `timeout`, `docker stop`, Slurm: clean up as on Ctrl-C
            cli.main(args=args, prog_name="deid", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__ or exc.__context__, Terminated):  # click turns it into Abort
            _terminated()
        console.print("[red]error:[/red] interrupted.")
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        exc.show()
        sys.exit(exc.exit_code)
    except DeidError as exc:
        if debug:
            traceback.print_exc()
        set_quiet(False)  # --quiet silences everything but errors
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # a message's [brackets] are text
        sys.exit(1)
    except Terminated:
        _terminated()
    except KeyboardInterrupt:
        console.print("[red]error:[/red] interrupted.")
        sys.exit(130)


if __name__ == "__main__":
    main()
