"""The Guarantees table (docs/guarantees.md) is executable: each row names tests that exist, a guarantee
test that skips fails the run in CI, and the promises the table makes without a test of their own are
tested here (exit 2 for a malformed spec from every command, the mteb-version branch of the run-root
stamp)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from guarantees import GUARANTEES, defined_tests, guarantee_tests, read_table  # tests/guarantees.py
from typer.testing import CliRunner

from flows.commands import app

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def test_every_test_the_guarantees_table_names_exists():
    rows = read_table(ROOT / GUARANTEES)
    assert len(rows) >= 20  # the table was found and read, not an empty section
    missing = [
        f"{situation}: {file}::{name}"
        for situation, tests in ((g.situation, g.tests) for g in rows)
        for file, name in tests
        if not (ROOT / file).is_file() or name not in defined_tests(ROOT / file)
    ]
    assert missing == [], "the Guarantees table names tests that do not exist:\n" + "\n".join(missing)


def test_the_table_reader_takes_tests_by_name_and_refuses_a_file_alone(tmp_path):
    page = tmp_path / "guarantees.md"
    good = "| a | b | `tests/test_x.py::test_one`, `::test_two[p1]`, `tests/test_y.py::test_three` |"
    page.write_text(
        f"# x\n\n## Guarantees (each proved)\n\n| what | does | test |\n|---|---|---|\n{good}\n\nafter\n"
    )
    assert guarantee_tests(page) == {
        ("tests/test_x.py", "test_one"),
        ("tests/test_x.py", "test_two"),
        ("tests/test_y.py", "test_three"),
    }
    page.write_text(page.read_text().replace("`tests/test_y.py::test_three`", "`tests/test_y.py`"))
    with pytest.raises(
        ValueError, match=r"guarantee 'a': 'tests/test_y.py' is not `tests/<file>.py::<test>`"
    ):
        read_table(page)
    page.write_text(
        f"# Guarantees (each proved by a test)\n\n| what | does | test |\n|---|---|---|\n{good}\n"
    )
    assert len(read_table(page)) == 1  # the page's own title heads the table too


def _project(tmp_path: Path) -> Path:
    """A small project with this repository's conftest: one guarantee test that skips, one plain
    test that skips, one guarantee test that passes."""
    (tmp_path / "tests").mkdir()
    for helper in ("conftest.py", "guarantees.py"):
        shutil.copy(TESTS / helper, tmp_path / "tests" / helper)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skipif(True, reason='no SLURM here')\ndef test_needs_slurm():\n    pass\n\n"
        "def test_needs_root():\n    pytest.skip('not root')\n\n"
        "def test_plain():\n    pytest.skip('a skip the table does not care about')\n\n"
        "def test_runs():\n    pass\n"
    )
    rows = "\n".join(
        f"| {what} | held | `tests/test_x.py::{name}` |"
        for what, name in (("slurm", "test_needs_slurm"), ("root", "test_needs_root"), ("ok", "test_runs"))
    )
    (tmp_path / GUARANTEES).parent.mkdir(parents=True)
    (tmp_path / GUARANTEES).write_text(f"# Guarantees\n\n| what | does | test |\n|---|---|---|\n{rows}\n")
    return tmp_path


def _pytest(project: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "tests"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_guarantee_test_that_skips_fails_the_run_under_ci(tmp_path):
    project = _project(tmp_path)
    local = _pytest(project, ci=None)
    assert local.returncode == 0, local.stdout[-3000:]
    assert "1 passed, 3 skipped" in local.stdout

    ci = _pytest(project, ci="true")
    assert ci.returncode == 1, ci.stdout[-3000:]
    for name, reason in (("test_needs_slurm", "no SLURM here"), ("test_needs_root", "not root")):
        assert (
            f"tests/test_x.py::{name} proves a guarantee of {GUARANTEES} and must run in CI; it skipped: {reason}"
            in ci.stdout
        )
    assert "SKIPPED [1] tests/test_x.py" in ci.stdout and "a skip the table does not care about" in ci.stdout


# --- exit 2 for a spec that does not load, from every command that reads one ------------------------


@pytest.mark.parametrize("command", ["plan", "verify", "prefetch", "run"])
def test_a_malformed_spec_is_one_message_and_exit_2_from_every_command(command, tmp_path):
    spec = yaml.safe_load((ROOT / "deployments/demo.yaml").read_text())
    spec |= {"run_root": str(tmp_path / "run"), "pooling": "maximum"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(app, [command, str(path)])
    assert out.exit_code == 2, out.output
    assert "pooling" in out.stderr and "maximum" in out.stderr, out.stderr
    assert "Traceback" not in out.output and out.stderr.count("error:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # nothing written


# --- the run-root stamp: another mteb version ---------------------------------------------------------


def test_a_run_root_another_mteb_version_wrote_is_refused_unless_forced(hub, tmp_path):
    from layertime import CODE_VERSION, runroot
    from layertime.rundir import RunDir
    from layertime.spec import load_spec

    spec = load_spec(ROOT / "deployments/demo.yaml", run_root=str(tmp_path / "demo"), hf_cache=str(hub))
    run = RunDir.of(spec.run_root)
    stamp_path = run.root / runroot.RUN_STAMP
    mine = runroot.claim_run_root(run, spec)
    installed = metadata.version("mteb")
    assert mine["mteb"] == installed and mine["code_version"] == CODE_VERSION
    assert runroot.claim_run_root(run, spec)["since"] == mine["since"]  # the same versions: kept

    theirs = {**mine, "mteb": "1.14.19"}  # the same code, scored with the paper's mteb
    stamp_path.write_text(json.dumps(theirs))
    with pytest.raises(
        runroot.IncompatibleRun,
        match=rf"holds results of mteb 1\.14\.19; this is mteb {re.escape(installed)},.*--force",
    ):
        runroot.claim_run_root(run, spec)
    assert json.loads(stamp_path.read_text()) == theirs  # refused: the stamp is untouched

    forced = runroot.claim_run_root(run, spec, force=True)
    assert json.loads(stamp_path.read_text()) == forced and forced["mteb"] == installed
