"""One console for messages and progress bars, so `--quiet` silences them all in one place."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False)


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every message and progress bar."""
    console.quiet = quiet


_debug = False


def set_debug(debug: bool) -> None:
    """`--debug`: failures that are reported and passed over (a batch's failed file) show their traceback too."""
    global _debug
    _debug = debug


def debugging() -> bool:
    return _debug


def info(message: str) -> None:
    console.print(message, soft_wrap=True)  # one line, whatever the terminal's width: scripts grep for it


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def progress(*extra_columns) -> Progress:
    """A progress bar with count, rate-friendly extra columns (e.g. a TextColumn for fps), ETA.

    Use as `with progress() as bar: task = bar.add_task("frames", total=n); bar.advance(task)`.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class FramesPerSecond(ProgressColumn):
    """Progress column: frames per second of the current file."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:5.1f} fps" if speed else "  ... fps", style="cyan")
