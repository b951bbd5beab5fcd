"""Shared pytest setup. Each area keeps its fixtures in its own module under tests/fixtures/."""

import os

import pytest
import torch

# Tests never touch the network and never read the user's weights cache.
os.environ["DEID_OFFLINE"] = "1"  # forced: a developer's own DEID_OFFLINE=0 must not send the suite online

# One intra-op thread for the whole run. The test networks are tiny, and the media pipelines run decode and
# encode threads beside them: with torch's spinning thread pool on top, a 2-core machine runs MTCNN 10-30x
# slower (measured), while a single thread loses next to nothing on these sizes.
torch.set_num_threads(1)

pytest_plugins = [
    "tests.fixtures.media",
    "tests.fixtures.generator",
    "tests.fixtures.model",
    "tests.fixtures.inputs",
]


@pytest.fixture(autouse=True)
def _isolated_deid_home(tmp_path_factory, monkeypatch):
    """Every test gets an empty weights cache unless it sets DEID_HOME itself."""
    home = tmp_path_factory.mktemp("deid_home")
    monkeypatch.setenv("DEID_HOME", str(home))
    yield home
