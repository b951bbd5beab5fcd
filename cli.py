"""The `deid` command line. Thin: each command parses options, builds one config and calls one function."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from deid import __version__
from deid.console import console, set_quiet
from deid.errors import DeidError

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
        type=click.Choice(["fp32", "bf16", "fp16"]),
        default="fp32",
        help="Numeric precision of the networks (fp16 needs a GPU).",
    )(func)
    func = device_option(func)
    func = click.option(
        "--model",
        default="deid-ffhq256",
        help="A trained deid model: a run directory (its latest checkpoint), a checkpoint file, or a registry name.",
    )(func)
    return func


def load_model_from_options(model: str, device: str, precision: str):
    """The trained model named by `--model`, on `--device` in `--precision` (the `model_options` trio)."""
    from deid.model import load_model
    from deid.runtime import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    return load_model(model, device=torch_device).to(dtype=dtype).eval()


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
    from deid.weights import statuses

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
    from deid.weights import REGISTRY, entry_for, fetch_with_progress

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
    from deid.weights import import_file

    dest = import_file(name, path)
    console.print(f"{name}: imported {path} -> {dest}")


@weights_group.command("verify")
def weights_verify() -> None:
    """Re-hash every cached file and compare with its published or recorded sha256 (exit 1 on a mismatch).

    \b
    Examples:
      deid weights verify
    """
    from deid.errors import WeightsError
    from deid.weights import statuses

    results = list(statuses(rehash=True))
    print_weights_table(results, title="verification")
    bad = [s.name for s in results if s.state == "corrupt"]
    if bad:
        raise WeightsError(f"corrupt: {', '.join(bad)}. Fetch them again with `deid weights fetch --force {' '.join(bad)}`.")


def weights_home_text() -> str:
    from deid.weights import weights_home

    return str(weights_home())


def shorten_path(location: str) -> str:
    from deid.weights import weights_home

    home = str(weights_home())
    return location[len(home) + 1:] if location.startswith(home + os.sep) else location


def print_weights_table(rows, title: str) -> None:
    from rich.table import Table

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

# ------------------------------------------------------------------------------------------- train
# (model issue: `deid train`)

# --------------------------------------------------------------------------- anonymize and reenact
# (video issue: `deid anonymize`, `deid reenact`)

# ---------------------------------------------------------------------------------------- evaluate
# (evaluate issue: `deid evaluate pairs|video`)

# -------------------------------------------------------------------------------- mix, interpolate


@cli.command("mix", cls=GreedyOptionsCommand)
@click.option("--identity", "identities", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Photos whose identities run along the top (one flag, several paths).")
@click.option("--attributes", "attributes", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Photos whose pose, expression and lighting run down the left.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The grid image (.png or .jpg).")
@click.option("--cell-size", type=click.IntRange(16, 4096), default=None, help="Side of each cell in pixels [default: the generator's resolution].")
@click.option("--labels/--no-labels", default=True, help="Write each input's file name under it.")
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
    from pipelines.figures import MixJob, run_mix

    job = MixJob(tuple(identities), tuple(attributes), output, cell_size, labels, overwrite)
    run_mix(job, load_model_from_options(**model_opts))
    console.print(f"wrote {output}")


@cli.command("interpolate")
@click.option("--vary", type=click.Choice(["identity", "attributes"]), required=True, help="Which code changes from --from to --to.")
@click.option("--space", type=click.Choice(["w", "z"]), default="w", help="Blend the mapped w's (Fig. 11/12) or the codes before mapping (Fig. 16/17).")
@click.option("--from", "start", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Photo at the start.")
@click.option("--to", "end", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Photo at the end.")
@click.option("--fixed", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Photo that supplies the code that does not change.")
@click.option("--steps", type=click.IntRange(2, 1000), default=9, help="Images in a .png/.jpg strip.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="A strip (.png/.jpg) or a video (.mp4/.gif).")
@click.option("--fps", type=click.FloatRange(1, 120), default=25.0, help="Frame rate of a video output.")
@click.option("--seconds", type=click.FloatRange(0.2, 600), default=3.0, help="Length of a video output (eased at both ends).")
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
    from pipelines.figures import InterpolateJob, run_interpolate

    job = InterpolateJob(vary, space, start, end, fixed, steps, output, fps, seconds, cell_size, overwrite)
    run_interpolate(job, load_model_from_options(**model_opts))
    console.print(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 1 (runtime) or 2 (usage)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="deid", standalone_mode=False)
    except click.exceptions.Abort:
        console.print("[red]error:[/red] interrupted; no output was left behind.")
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        exc.show()
        sys.exit(exc.exit_code)
    except DeidError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]error:[/red] interrupted; no output was left behind.")
        sys.exit(130)


if __name__ == "__main__":
    main()
