"""Clear messages to the end (issue 24): what an adversarial tester still got as a traceback, late, or
not at all. A full disk under the flow ends with one line naming the path and the space left, as
`--plain` does; a metrics corpus that cannot serve is refused before any model load; `$VARIABLES` in
the spec's own path are expanded; a second run on a busy run root is refused before Prefect starts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_faults import _cli, _spec_file  # the small demo spec and the in-process CLI beside this one
from test_paths import _one_message, _written

from layertime import leftovers
from layertime.rundir import RunDir


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- a full disk under the flow ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_under_the_flow_ends_with_one_line_naming_the_path_and_the_space_left(
    prefect_api, hub, tmp_path
):
    spec = _spec_file(tmp_path, hub)
    assert _cli("run", "--plain", str(spec)).exit_code == 0  # every unit recorded: the flow only merges
    tables = tmp_path / "run/demo/tables"
    before = {p.name: p.read_bytes() for p in tables.iterdir()}
    disk = tables  # a full file system where the tables go (the run root's other files have room)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with open(disk / "filler", "wb", buffering=0) as filler:
            try:
                while filler.write(b"\0" * 4096):
                    pass
            except OSError:
                pass  # full
        out = _cli("run", str(spec))  # the flow, through the command, on the harness's server
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)

    assert out.exit_code == 2, out.output
    last = _lines(out.stderr)[-1]  # the line --plain gives (tests/test_faults.py)
    assert last.startswith("error: [Errno 28] No space left on device while writing "), last
    assert str(tables / "scores.parquet") in last and "free on that file system" in last, last
    assert {p.name: p.read_bytes() for p in tables.iterdir()} == before  # the old tables, whole


# --- a metrics corpus that cannot serve -------------------------------------------------------------

CORPORA = {
    "not UTF-8": (b"caf\xe9 au lait is a drink\nanother line of prose\n", "is not UTF-8 text (byte b'\\xe9' at offset 3)"),
    "no usable line": (b"= Heading =\nshort\n\n", "keeps 0 prompt(s) of its 3 line(s); the metrics need at least 2"),
}  # fmt: skip


@pytest.mark.parametrize("command", ["run --plain", "run", "verify"])
@pytest.mark.parametrize("case", list(CORPORA))
def test_a_metrics_corpus_that_cannot_serve_is_refused_before_any_model_load(case, command, hub, tmp_path):
    content, expected = CORPORA[case]
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    spec = _spec_file(tmp_path, hub, metrics={"corpus": str(corpus)})
    before = _written(tmp_path)

    out = _cli(*command.split(), str(spec))

    if command == "verify":  # its table: the corpus is a corrupt item, exit 1
        assert out.exit_code == 1, out.output
        (row,) = [line for line in out.stdout.splitlines() if line.startswith(f"metrics corpus {corpus}")]
        assert "corrupt" in row and expected in row, out.stdout
    else:
        _one_message(out, f"metrics.corpus: {corpus}", expected)
        assert "Loading weights" not in out.output
    assert _written(tmp_path) == before  # no run root, no store: refused before any work


# --- the spec's own path --------------------------------------------------------------------------


def test_an_unset_variable_in_the_spec_path_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERTIME_NO_SUCH_DIR", raising=False)
    for command in (["run", "--plain"], ["plan"], ["verify"]):
        out = _cli(*command, "$LAYERTIME_NO_SUCH_DIR/demo.yaml")
        _one_message(
            out, "spec file: '$LAYERTIME_NO_SUCH_DIR/demo.yaml'", "$LAYERTIME_NO_SUCH_DIR is not set"
        )


# --- a busy run root ------------------------------------------------------------------------------


def _our_prefect_dirs() -> list[Path]:
    """The temporary Prefect directories this process prepared (layertime/leftovers.py names owners)."""
    found = []
    for directory in leftovers.temp_root().glob("layertime-prefect-*"):
        try:
            owner = json.loads((directory / leftovers.OWNER).read_text())
        except OSError:
            continue  # another checkout's (an older layertime's), or being removed
        if owner["pid"] == os.getpid():
            found.append(directory)
    return found


@pytest.mark.parametrize("command", ["run", "run --plain"])
def test_a_second_run_on_a_busy_run_root_is_refused_before_prefect_starts(command, hub, tmp_path):
    spec = _spec_file(tmp_path, hub)
    prefect_dirs = _our_prefect_dirs()
    with RunDir.of(tmp_path / "run/demo").lock():  # a run holds it
        out = _cli(*command.split(), str(spec))
    _one_message(out, f"run root {tmp_path / 'run/demo'} is in use by pid ")
    assert _our_prefect_dirs() == prefect_dirs  # no temporary Prefect server was prepared
    assert not (tmp_path / "run/store").exists()  # refused before any work
