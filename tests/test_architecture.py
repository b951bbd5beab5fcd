"""The package's shape: one import root, the layer rule of docs/architecture.md, imports at the top."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from deid.train.launch import torchrun_command

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("deid", "tests", "cli", "train", "pipelines")


def python_files(*folders: str):
    for folder in folders:
        yield from (p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_import_linter_contracts_hold():
    """Layers (cli > pipelines, train > nets, evaluation > ... > errors), no cycles, nothing imports tests."""
    result = subprocess.run([Path(sys.executable).with_name("lint-imports"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def hidden_first_party_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every first-party import not in the module's top-level statements: `from deid.x import y`
    and `import deid.x` alike (relative imports do not occur in the package)."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    hidden = []
    for node in ast.walk(tree):
        if id(node) in top:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        hidden += [(node.lineno, m) for m in modules if m.split(".")[0] in FIRST_PARTY]
    return sorted(hidden)


def test_the_import_check_sees_both_import_forms_inside_functions():
    source = ("import numpy\nfrom deid.errors import DeidError\nimport deid.media\n\n"
              "def f():\n    import cv2\n    import deid.faces.detection as d\n    from deid.atomic import atomic_output\n\n"
              "class C:\n    def g(self):\n        import os, pipelines.stages\n")
    assert hidden_first_party_imports(source) == [(7, "deid.faces.detection"), (8, "deid.atomic"), (12, "pipelines.stages")]


def test_first_party_imports_are_at_module_top():
    """An import inside a function hides a dependency (and used to hide cycles); only third-party ones may be lazy."""
    hidden = [f"{path.relative_to(ROOT)}:{line} {module}" for path in python_files("deid", "pipelines", "train")
              for line, module in hidden_first_party_imports(path.read_text())]
    assert not hidden


def test_only_deid_is_imported_by_bench_and_scripts():
    """bench/ and scripts/ sit on top of the package and reach it as `deid` only, never through tests or the
    top-level folder names."""
    wrong = []
    for path in python_files("bench", "scripts"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in getattr(node, "names", [])] \
                if isinstance(node, ast.Import) else []
            wrong += [f"{path.name}:{node.lineno} {n}" for n in names if n and n.split(".")[0] in FIRST_PARTY[1:]]
    assert not wrong


@pytest.mark.slow
def test_torchrun_starts_the_installed_entry_point(tmp_path):
    """`deid train --gpus N` relaunches the installed `deid` script (--no-python), not `python -m ...`, so a
    user's own train.py or deid/ in the current folder cannot be imported in its place."""
    command = torchrun_command(tmp_path / "launch.json", 2)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--no-python" in command and "-m" not in command[3:]
    script = Path(command[command.index("--no-python") + 1])
    assert script == Path(sys.executable).with_name("deid") and script.is_file()
    assert command[-2:] == ["train-worker", str(tmp_path / "launch.json")]
    # From a folder that shadows both names, the worker still is deid's (it refuses the missing file itself).
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "deid").mkdir()
    (tmp_path / "deid" / "__init__.py").write_text("raise SystemExit('the user deid/ was imported')\n")
    result = subprocess.run([script, "train-worker", "missing.json"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "missing.json" in result.stderr and "user" not in result.stderr + result.stdout


@pytest.mark.slow
def test_wheel_installs_one_import_root(tmp_path):
    """The built wheel holds the package `deid` and nothing else at the top level: in a fresh venv, `import
    cli`, `import train` and `import pipelines` fail while `deid --help` and the subpackages work."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("deid-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Install the wheel by unpacking it (all a pure-Python wheel install does besides its scripts), and reach
    # this environment's dependencies through a plain path line (which runs none of its .pth files, so the
    # editable install of this checkout stays out).
    subprocess.run([sys.executable, "-m", "zipfile", "-e", wheel, site], check=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    top = {p.name for p in site.iterdir()} - {"deps.pth", "__pycache__"}
    assert {name for name in top if not name.endswith(".dist-info")} == {"deid"}
    entry_points = next(site.glob("deid-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "deid = deid.launcher:main" in entry_points
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("cli", "train", "pipelines"):
        result = subprocess.run([python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True, env=clean)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, name
    check = ("import deid, deid.cli, deid.pipelines.anonymize, deid.train.trainer; "
             "assert deid.__file__.startswith(%r); deid.cli.main(['--help'])" % str(site))
    result = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True, env=clean)
    assert result.returncode == 0 and "anonymize" in result.stdout, result.stderr[-2000:]
