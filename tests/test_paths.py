"""Paths and sizes that used to pass validation and fail late (issue 17.6): `~` and `$VARIABLES` in
spec paths, an empty run root, a huge layer range, a spec that is not UTF-8 or is a directory, a
block the model lacks under `verify`, an unknown first checkpoint under `plan`, garbage tables under
`report`, a file that cannot be written under `--plain`. Each is expanded as the shell would, or
refused with one message naming the field and the value, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The small demo spec file and the in-process CLI of the bad-input tests beside this one.
from test_faults import _cli, _spec_file  # noqa: E402


def _written(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.rglob("*") if "hub" not in p.parts)


def _one_message(out, *expected: str) -> None:
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and out.stderr.count("error:") == 1, out.output
    assert all(words in out.stderr for words in expected), out.stderr


# --- paths are read as the shell would read them ---------------------------------------------------


@pytest.mark.slow
def test_tilde_and_variables_in_spec_paths_are_expanded_before_any_work(hub, tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LT_STORE", str(elsewhere))
    monkeypatch.setenv("LT_HUB", str(hub))
    monkeypatch.setenv("LT_SPEC", "spec.yaml")
    monkeypatch.chdir(tmp_path)
    spec = _spec_file(tmp_path, hub, run_root="~/runs/demo", store="${LT_STORE}/store", hf_cache="$LT_HUB")

    out = _cli("run", "--plain", "~/../$LT_SPEC")  # quoted in a script: the shell left it alone

    assert out.exit_code == 0, out.output
    assert not (tmp_path / "~").exists() and not list(tmp_path.glob("$*"))  # no literal '~' or '$LT_STORE'
    scores = pl.read_parquet(home / "runs/demo/tables/scores.parquet")
    assert scores.height == 2 and (elsewhere / "store/scores").is_dir()
    assert f"run root: {home / 'runs/demo'}" in out.stdout
    assert spec.exists()


# --- bad input: one message naming the field and the value, exit 2, nothing written -------------------

NOT_UTF8 = b"name: d\xe9mo\nlayers: [1, 3]\n"  # latin-1, as an editor on another system may save it

BAD = {
    "empty run root": ({"run_root": ""}, ["run_root: '' is empty"]),
    "blank store": ({"store": "  "}, ["store: '  ' is empty"]),
    "unset variable in the run root": (
        {"run_root": "$LAYERTIME_NO_SUCH_VARIABLE/demo"},
        ["run_root: '$LAYERTIME_NO_SUCH_VARIABLE/demo'", "$LAYERTIME_NO_SUCH_VARIABLE is not set"],
    ),
    "unknown user in hf_cache": ({"hf_cache": "~layertime-no-such-user/hub"}, ["hf_cache:", "no user"]),
    "empty metrics corpus file": ({"metrics": {"corpus": ""}}, ["metrics.corpus: '' is empty"]),
    "a layer range of a trillion blocks": (
        {"layers": "0..999999999999"},
        ["layers: range '0..999999999999' names 1,000,000,000,000 blocks"],
    ),
    "a range past the model's blocks": ({"layers": "2..9"}, ["is outside the model's 4 blocks"]),
    "spec not UTF-8": ({"bytes": NOT_UTF8}, ["spec.yaml: not UTF-8 text", "b'\\xe9' at offset 7"]),
    "spec path is a directory": ({"directory": True}, ["is a directory, not a YAML file"]),
}


@pytest.mark.parametrize("command", ["run", "plan", "verify"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_paths_and_sizes_are_one_message_exit_2_and_nothing_written(
    case, command, hub, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where an empty run root used to write
    change, expected = BAD[case]
    change = dict(change)
    spec = _spec_file(tmp_path, hub, **{k: v for k, v in change.items() if k not in ("bytes", "directory")})
    if "bytes" in change:
        spec.write_bytes(change["bytes"])
    if change.get("directory"):
        spec.unlink()
        spec.mkdir()
    before = _written(tmp_path)

    out = _cli(command, *(["--plain"] if command == "run" else []), str(spec))

    _one_message(out, *expected)
    assert _written(tmp_path) == before


def test_plan_names_an_unknown_first_checkpoint_not_the_layers(hub, tmp_path):
    spec = _spec_file(tmp_path, hub, checkpoints=["step9999", "step1000"], layers="all")
    out = _cli("plan", str(spec))
    _one_message(out, "checkpoints: ", "layertime/tiny-neox@step9999 is not in the HF cache")


def test_verify_refuses_a_block_the_model_lacks_and_writes_nothing(hub, tmp_path):
    """In a process of its own: MTEB_CACHE unset, as a user runs it (importing mteb creates it)."""
    env = {k: v for k, v in os.environ.items() if k != "MTEB_CACHE"}
    env["HOME"] = str(tmp_path / "home")  # mteb's default cache would land here
    (tmp_path / "home").mkdir()
    good, bad = _spec_file(tmp_path, hub), _spec_file(tmp_path, hub, "bad.yaml", layers=[1, 7])
    before = _written(tmp_path)

    def verify(spec: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.commands", "verify", str(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    refused = verify(bad)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (
        "layers: block 7 is outside the model's 4 blocks" in refused.stderr and "ready" not in refused.stdout
    )
    ready = verify(good)
    assert ready.returncode == 0 and "ready for an offline run" in ready.stdout, ready.stdout + ready.stderr
    assert _written(tmp_path) == before  # no <store>/mteb, no ~/.cache/mteb: a check writes nothing


@pytest.mark.parametrize(
    "table, garbage, expected",
    [
        ("scores.parquet", b"not a parquet file", "not a table layertime wrote"),
        ("metrics.parquet", None, "not a metrics table: no column"),
        ("costs.parquet", b"PAR1" + b"\0" * 64 + b"PAR1", "not a table layertime wrote"),
    ],
)
def test_report_on_garbage_tables_names_the_file(table, garbage, expected, tmp_path):
    tables = tmp_path / "run/tables"
    tables.mkdir(parents=True)
    from layertime import tables as frames

    frames.scores_frame([]).write_parquet(tables / "scores.parquet")
    if garbage is None:
        pl.DataFrame({"x": [1]}).write_parquet(tables / table)  # a parquet file, not ours
    else:
        (tables / table).write_bytes(garbage)
    before = _written(tmp_path)

    out = _cli("report", str(tmp_path / "run"))

    _one_message(out, f"{tables / table}: {expected}", "`layertime run SPEC` writes it again")
    assert _written(tmp_path) == before


# --- files that cannot be written (EPERM: immutable, even for root) ---------------------------------


def _chattr(flag: str, path: Path) -> None:
    out = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"chattr {flag} is not available here: {out.stderr.strip()}")


def test_an_immutable_tables_directory_is_refused_before_any_work(hub, tmp_path):
    tables = tmp_path / "run/demo/tables"
    tables.mkdir(parents=True)
    spec = _spec_file(tmp_path, hub)
    _chattr("+i", tables)
    try:
        before = _written(tmp_path)
        out = _cli("run", "--plain", str(spec))
        _one_message(out, f"run_root: cannot write {tables}: Operation not permitted")
        assert _written(tmp_path) == before
    finally:
        _chattr("-i", tables)


@pytest.mark.slow
def test_an_immutable_table_file_under_plain_is_one_message_naming_it(hub, tmp_path):
    scores = tmp_path / "run/demo/tables/scores.parquet"
    scores.parent.mkdir(parents=True)
    scores.write_bytes(b"an older table, made immutable")
    spec = _spec_file(tmp_path, hub)
    _chattr("+i", scores)
    try:
        out = _cli("run", "--plain", str(spec))
        _one_message(out, "Operation not permitted while writing", str(scores))
    finally:
        _chattr("-i", scores)
    assert len(list((tmp_path / "run/store/scores").rglob("layer_*.json"))) == 2  # the work is kept
    healed = _cli("run", "--plain", str(spec))
    assert healed.exit_code == 0 and "0 (checkpoint, task, layer) units, 2 already done" in healed.stdout
