"""CLI conventions: one-line user errors with the right exit codes, --debug tracebacks, devices."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from deid import launcher
from deid.errors import DeidError
from deid.devices import resolve_device, resolve_dtype


def run_deid(*args, env_extra=None):
    env = dict(os.environ, COLUMNS="200", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_runtime_error_is_one_line_exit_1_without_traceback():
    result = run_deid("weights", "fetch", "no-such-network")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: 'no-such-network' is not a known network")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback():
    result = run_deid("--debug", "weights", "fetch", "no-such-network")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "WeightsError" in result.stderr


# Sends SIGINT the moment `deid.cli` (torch, PyAV, the networks: seconds of imports) starts to be imported.
_CTRL_C_WHILE_IMPORTING = """
import importlib.abc, os, signal, sys
class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "deid.cli":
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = ["deid", "--help"]
import deid.launcher
deid.launcher.main()
"""


def test_ctrl_c_while_starting_is_one_line_exit_130():
    """A Ctrl-C during the first seconds (imports) used to print a raw KeyboardInterrupt traceback."""
    result = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_IMPORTING], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr, result.stdout) == (130, "error: interrupted.\n", "")
    # Once started, Ctrl-C is Python's KeyboardInterrupt again: deid.cli.main cleans up and exits 130 itself.
    before = signal.getsignal(signal.SIGINT)
    importlib.reload(launcher)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_usage_error_exits_2():
    result = run_deid("weights", "fetch")
    assert result.returncode == 2
    assert "name at least one network" in result.stderr
    assert run_deid("no-such-command").returncode == 2


@pytest.mark.slow
def test_fetch_fails_fast_when_the_network_is_unreachable(tmp_path):
    # A name that cannot resolve stands in for "no internet": the error is one line, exit 1, quickly.
    url = "http://deid-test.invalid/ffhq.pkl"
    code = (
        "import sys, cli; from deid import weights; "
        f"weights.REGISTRY['stylegan2-ffhq-256'] = weights.WeightsEntry('stylegan2-ffhq-256', 'x', 'ffhq.pkl', ({url!r},)); "
        "sys.argv = ['deid', 'weights', 'fetch', 'stylegan2-ffhq-256']; cli.main()"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, DEID_OFFLINE="0", DEID_HOME=str(tmp_path), COLUMNS="400"))
    assert result.returncode == 1
    assert time.monotonic() - start < 30
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download stylegan2-ffhq-256") and url in last
    assert "network unreachable" in last
    assert not any(tmp_path.rglob("*.pkl"))


@pytest.mark.slow
def test_help_lists_examples():
    result = run_deid("weights", "fetch", "--help")
    assert result.returncode == 0 and "Examples:" in result.stdout


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeidError, match="not a device|not supported"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeidError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(DeidError, match="needs a GPU"):
        resolve_dtype("fp16", torch.device("cpu"))
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("given, expected", [(None, "10000"), ("500", "500")])
def test_openmp_spin_is_short_before_torch_loads_and_a_users_setting_stays(given, expected):
    # Measured: with libgomp's default spin torch's idle threads take the audit workers' cores (deid/__init__.py).
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    probe = "import sys, os, deid; assert 'torch' not in sys.modules; import deid.cli; print(os.environ['GOMP_SPINCOUNT'])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
