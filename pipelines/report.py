"""Evaluation reports a person can look at: metrics.json, plots (matplotlib PNGs), sample rows and an index.html
with the tables in the paper's layout. Everything is written into a report directory that the caller renames
into place when complete."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from deid.atomic import write_text_atomic

ROW_GAP = 4  # white pixels between images in a sample row


@dataclass(frozen=True)
class Table:
    """One table of the report: a caption, column headers and rows of already formatted cells."""

    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


@dataclass
class Report:
    """What index.html shows, in order: tables, then figures, then sample rows (paths relative to the report)."""

    title: str
    summary: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, file)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (caption, file)


# -------------------------------------------------------------------------------------- formatting


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"mean", "std", "n"} of the values that are not None/NaN (population std); None when there are none.
    Infinite values (PSNR of an exact copy) make the mean infinite."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(x):
        return {"mean": None, "std": None, "n": 0}
    if not np.isfinite(x).all():
        return {"mean": float(x.mean()), "std": None, "n": int(len(x))}
    return {"mean": float(x.mean()), "std": float(x.std()), "n": int(len(x))}


def fmt(stat: dict | float | None, digits: int = 3) -> str:
    """'0.812 ± 0.041' for a mean_std dict, '12.3' for a number, '–' for missing."""
    if stat is None:
        return "–"
    if isinstance(stat, dict):
        if stat.get("mean") is None:
            return "–"
        if stat.get("std") is None:
            return fmt(stat["mean"], digits)
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if isinstance(stat, float) and not math.isfinite(stat):
        return "∞" if stat > 0 else "–"
    return f"{stat:.{digits}f}"


# ----------------------------------------------------------------------------------------- images


def image_row(images: Sequence[np.ndarray], height: int | None = None) -> np.ndarray:
    """Images [H_i, W_i, 3] uint8 side by side on white, each scaled to `height` (default: the first one's)."""

    height = height or images[0].shape[0]
    scaled = [im if im.shape[0] == height else cv2.resize(
        im, (max(1, round(im.shape[1] * height / im.shape[0])), height),
        interpolation=cv2.INTER_AREA if im.shape[0] > height else cv2.INTER_LINEAR) for im in images]
    width = sum(im.shape[1] for im in scaled) + ROW_GAP * (len(scaled) - 1)
    row = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for im in scaled:
        row[:, x:x + im.shape[1]] = im
        x += im.shape[1] + ROW_GAP
    return row


def draw_boxes(image: np.ndarray, boxes: Sequence[np.ndarray], colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """A copy of image [H, W, 3] uint8 with each box (x0, y0, x1, y1) outlined in its RGB colour."""

    out = np.ascontiguousarray(image).copy()
    for box, colour in zip(boxes, colours):
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, max(1, round(max(image.shape[:2]) / 200)))
    return out


# ------------------------------------------------------------------------------------------- plots


def _figure(**kwargs):
    """A matplotlib Figure drawn by its own Agg canvas: no pyplot, no global backend switch (matplotlib.use would
    change the backend of the whole process, e.g. a notebook's), no window, and no figure registry to close."""
    # lazy: matplotlib is needed only for report plots (slow import)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def plot_series(path: Path, x: np.ndarray, series: Sequence[tuple[str, np.ndarray, float | None]], xlabel: str) -> Path:
    """Stacked line plots sharing x; each series is (label, values [N] with NaN gaps, optional threshold line)."""
    fig = _figure(figsize=(9, 1.9 * len(series)))
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)
    for ax, (label, values, threshold) in zip(axes[:, 0], series):
        ax.plot(x, values, ".-", markersize=3, linewidth=0.8)
        if threshold is not None:
            ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_histograms(path: Path, series: Sequence[tuple[str, np.ndarray]]) -> Path:
    """One histogram per (label, values) side by side."""
    fig = _figure(figsize=(3.2 * len(series), 2.6))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (label, values) in zip(axes[0], series):
        values = np.asarray(values, np.float64)
        values = values[np.isfinite(values)]
        if len(values):
            low, high = float(values.min()), float(values.max())
            if high - low < 1e-9:  # one value (e.g. an exact reconstruction): give it a visible bin
                low, high = low - 0.5 * max(abs(low), 1e-3), high + 0.5 * max(abs(high), 1e-3)
            ax.hist(values, bins=min(40, max(5, len(values) // 5)), range=(low, high), color="tab:blue", alpha=0.8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# -------------------------------------------------------------------------------------------- files


def json_default(value):
    """Serialise numpy scalars/arrays and paths in metrics.json."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value):
    """JSON has no NaN/Infinity: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_metrics(directory: Path, metrics: dict) -> Path:
    path = directory / "metrics.json"
    text = json.dumps(_finite(json.loads(json.dumps(metrics, default=json_default))), indent=2, allow_nan=False)
    write_text_atomic(path, text + "\n")
    return path


def write_html(directory: Path, report: Report) -> Path:
    """index.html: summary lines, tables, figures and sample rows; links metrics.json."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(report.title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border-top:1px solid #999;border-bottom:1px solid #999;"
        "padding:.35em .9em;text-align:center}caption{font-weight:bold;text-align:left;padding:.3em 0}"
        "figure{margin:1em 0}img{max-width:100%}figcaption{color:#444;font-size:.9em}.note{color:#555;font-size:.9em}</style>",
        "</head><body>",
        f"<h1>{e(report.title)}</h1>",
        "<ul>" + "".join(f"<li>{e(line)}</li>" for line in report.summary) + "</ul>",
        "<p><a href='metrics.json'>metrics.json</a> holds every number below, with versions and counts.</p>",
    ]
    for table in report.tables:
        parts.append(f"<table><caption>{e(table.caption)}</caption><tr>")
        parts.append("".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr>")
        for row in table.rows:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        if table.note:
            parts.append(f"<p class='note'>{e(table.note)}</p>")
    if report.figures:
        parts.append("<h2>Plots</h2>")
        for caption, file in report.figures:
            parts.append(f"<figure><img src='{e(file)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>")
    if report.samples:
        parts.append("<h2>Samples</h2>")
        for caption, file in report.samples:
            parts.append(f"<figure><img src='{e(file)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    path = directory / "index.html"
    write_text_atomic(path, "\n".join(parts))
    return path
