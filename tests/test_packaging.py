"""What `pip install` puts in site-packages (issue 16): the package `layertime` and the console script's
module `layertime_command` and nothing else, so no top-level `tasks` or `flows` (names anyone may have)
is installed; tasks/ and flows/ stay folders of the checkout, where Prefect's entrypoints name them.
The `layertime` script of an editable install (`make venv`) has every command, from any directory; the
script of a plain install says in one line that it needs the checkout, and exits 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _checkout(tmp_path: Path) -> Path:
    """A copy of what a build reads (and the folders it must leave out), so the build's files
    (build/, *.egg-info) never land in the repository."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "layertime_command.py"):
        shutil.copy(ROOT / name, copy / name)
    for folder in ("layertime", "tasks", "flows"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _wheel(tmp_path: Path) -> Path:
    out = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
          str(_checkout(tmp_path))])  # fmt: skip
    (wheel,) = out.glob("layertime-*.whl")
    return wheel


def _venv(path: Path) -> Path:
    """A throwaway venv that sees this environment's packages (torch, mteb, pip, setuptools) through a
    path file, but not its install of layertime (a path entry's own .pth files are not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "shared-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(args: list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the install provides
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


INSTALLED = {"layertime", "layertime_command.py"}  # the library and the console script's module


def test_the_wheel_installs_layertime_alone(tmp_path):
    with zipfile.ZipFile(_wheel(tmp_path)) as wheel:
        names = wheel.namelist()
        top_level = {n.split("/")[0] for n in names if ".dist-info/" not in n}
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        recorded = {line.split(",")[0].split("/")[0] for line in wheel.read(record).decode().splitlines()}
        declared = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = wheel.read(declared[0]).decode().split() if declared else ["layertime"]
    assert top_level == INSTALLED
    assert {n for n in recorded if not n.endswith(".dist-info")} == INSTALLED
    assert sorted(declared) == ["layertime", "layertime_command"]
    assert "layertime/task_costs.csv" in names  # the package data travels with it


def test_the_script_of_an_editable_install_runs_every_command_from_anywhere(tmp_path):
    checkout = _checkout(tmp_path)
    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(checkout)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run([tmp_path / "venv/bin/layertime", "--help"], cwd=elsewhere)
    for command in ("plan", "verify", "report", "run", "submit", "slurm-script"):
        assert f" {command} " in out.stdout, out.stdout
    found = _run([python, "-c", "import importlib.util as u; print(u.find_spec('tasks'), u.find_spec('flows'))"],
                 cwd=elsewhere)  # fmt: skip
    assert found.stdout.split() == [
        "None",
        "None",
    ]  # the install itself puts no `tasks` or `flows` on the path


def test_the_script_of_a_plain_install_says_it_needs_the_checkout(tmp_path):
    wheel = _wheel(tmp_path)
    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    out = subprocess.run([tmp_path / "venv/bin/layertime", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "editable install" in out.stderr, out.stderr


def test_slurm_workers_import_the_tasks_from_the_checkout(monkeypatch):
    from flows.clusters import job_script

    monkeypatch.setenv("PYTHONPATH", "/opt/site-extra")
    script = job_script(None, {"account": "lab-42"})
    exports = [line for line in script.splitlines() if line.startswith("export PYTHONPATH=")]
    # The checkout first (tasks/); flows/ last: a deployment run names the flow's module `layer_by_layer`
    # (its file loaded as a script), and nothing in flows/ may shadow another module.
    expected = f"export PYTHONPATH={ROOT}:/opt/site-extra:{ROOT / 'flows'}"
    assert exports and all(line == expected for line in exports), exports
