"""The `deid` command line. Thin: each command parses options, builds one config and calls one function."""

from __future__ import annotations

import functools
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
@click.version_option(__version__, prog_name="deid")
def cli(quiet: bool, debug: bool) -> None:
    """deid: replace the identity of faces in images and video, keeping pose, expression and lighting.

    \b
    Examples:
      deid weights fetch --all                         # download the pretrained networks once
      deid anonymize talk.mp4 --identity target.png -o talk_anon.mp4
      deid reenact portrait.png driving.mp4 -o reenacted.mp4
    """
    set_quiet(quiet)


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


# ------------------------------------------------------------------------------------ make-dataset
# (generator issue: `deid make-dataset`)

# ------------------------------------------------------------------------------------------- train
# (model issue: `deid train`)

# --------------------------------------------------------------------------- anonymize and reenact
# (video issue: `deid anonymize`, `deid reenact`)

# ---------------------------------------------------------------------------------------- evaluate
# (evaluate issue: `deid evaluate pairs|video`)

# -------------------------------------------------------------------------------- mix, interpolate
# (figures issue: `deid mix`, `deid interpolate`)


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
