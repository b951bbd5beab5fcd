"""Report plots: drawn without touching process-wide matplotlib state (backend, pyplot's figure registry)."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest

from deid.pipelines.report import plot_histograms, plot_series


def test_plots_are_written_without_switching_the_process_backend_or_pyplot(tmp_path, monkeypatch):
    import matplotlib

    def refuse(*args, **kwargs):
        pytest.fail("matplotlib.use switches the backend of the whole process (a notebook's included)")

    monkeypatch.setattr(matplotlib, "use", refuse)
    pyplot_was_loaded = "matplotlib.pyplot" in sys.modules
    x = np.arange(20.0)
    plot_series(tmp_path / "series.png", x, [("a", np.sin(x), 0.5), ("b", np.where(x > 5, x, np.nan), None)], "frame")
    plot_histograms(tmp_path / "hist.png", [("a", np.cos(x)), ("one value", np.ones(4))])
    series, hist = cv2.imread(str(tmp_path / "series.png")), cv2.imread(str(tmp_path / "hist.png"))
    assert series.shape == (int(1.9 * 2 * 100), 900, 3) and hist.shape == (260, 640, 3)
    assert series.std() > 10 and hist.std() > 10  # something was drawn
    assert pyplot_was_loaded or "matplotlib.pyplot" not in sys.modules
