"""Outputs are made to be shared: every file deid writes gets the usual mode, 0666 minus the umask (0644 under
the common umask 022), like a file that `cp` or ffmpeg writes; never mkstemp's owner-only 0600."""

from __future__ import annotations

import os
import stat

import pytest

from deid.atomic import atomic_output, write_bytes_atomic, write_text_atomic
from deid.pipelines.anonymize import AnonymizeJob, run_anonymize


@pytest.fixture
def set_umask():
    """Set the process umask for one test (it is process-wide state), and put the old one back after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_outputs_get_0666_minus_the_umask(tmp_path, set_umask, umask):
    set_umask(umask)
    write_text_atomic(tmp_path / "manifest.json", "{}")
    write_bytes_atomic(tmp_path / "ws.npy", b"\0")
    with atomic_output(tmp_path / "clip.mp4") as tmp:
        tmp.write_bytes(b"frames")
    for name in ("manifest.json", "ws.npy", "clip.mp4"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "manifest.json", "ws.npy"]  # no temporaries left


def test_anonymized_image_and_checkpoint_are_0644_under_umask_022(tmp_path, set_umask, astronaut_png, tiny_model):
    from deid.runs import checkpoint_path

    set_umask(0o022)
    out = tmp_path / "anon.png"
    run_anonymize(AnonymizeJob(inputs=(astronaut_png,), output=out), tiny_model)
    checkpoint = tiny_model.save(checkpoint_path(tmp_path / "run", 0), step=0)
    assert mode(out) == 0o644 and mode(checkpoint) == 0o644
