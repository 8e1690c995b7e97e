"""Faults injected on the tiny demo world (issue 8): a killed flow, a killed Dask worker, a full disk,
bad input. Each test says what must hold afterwards: finished work kept, unfinished work recomputed
exactly once, no duplicate row, no temp file left, and one clear message naming the culprit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import prefect_runs  # tests/prefect_runs.py
import pytest
import test_slurm  # the module beside this one: the real single-node SLURM's fixtures and helpers
from specs import demo_spec_file  # tests/specs.py
from typer.testing import CliRunner

from flows.commands import app
from layertime import io

# Fixtures are found by name in the module that uses them.
slurm, ci_profile = test_slurm.slurm, test_slurm.ci_profile
_no_profile_from_the_environment = test_slurm._no_profile_from_the_environment
GRID, UNITS, needs_slurm = test_slurm.GRID, test_slurm.UNITS, test_slurm.needs_slurm


ROOT = Path(__file__).resolve().parents[1]


_spec_file = demo_spec_file  # the demo spec, small (no metrics), its run root tmp_path/run/demo


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under `root` -> (inode, mtime_ns): what a later run rewrote shows as a change."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _temps(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp"))


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (root only), unmounted however the test ends."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


# --- temp files of dead writers -------------------------------------------------------------------


def test_a_write_removes_the_temps_that_dead_writers_left_beside_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (reaped)
    target = tmp_path / "layer_3.json"
    host = io._HOST
    names = {
        "dead": f".layer_3.json.{host}.{dead.pid}.abc123.tmp",  # killed on this host: removed
        "alive": f".layer_3.json.{host}.{os.getpid()}.def456.tmp",  # a writer still at work: kept
        "elsewhere": ".layer_3.json.other-node.12.ghi789.tmp",  # another host, recent: kept
        "old": ".layer_3.json.other-node.13.jkl012.tmp",  # another host, two days old: removed
        "other": f".layer_1.json.{host}.{dead.pid}.mno345.tmp",  # another target's: left to its writer
    }
    for name in names.values():
        (tmp_path / name).write_text("half")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / names["old"], (two_days_ago, two_days_ago))
    (tmp_path / f".layer_3.json.{host}.{dead.pid}.dir999.tmp").mkdir()  # a killed embed_unit's directory

    io.atomic_write_text(target, "{}")

    assert target.read_text() == "{}"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert left == sorted([names["alive"], names["elsewhere"], names["other"]])


# --- disk full -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_fails_the_unit_naming_the_path_keeps_finished_work_and_heals(hub, tmp_path):
    disk = tmp_path / "disk"
    with _tmpfs(disk, "size=4m"):
        first = _spec_file(tmp_path, hub, run_root=str(disk / "demo"))
        assert _cli("run", "--plain", str(first)).exit_code == 0
        store = disk / "store"
        before = _files(store)
        scores = pl.read_parquet(disk / "demo/tables/scores.parquet")
        assert scores.height == 2

        both = _spec_file(tmp_path, hub, "both.yaml", run_root=str(disk / "demo"),
                          tasks=["DemoSTS", "DemoClassification"])  # fmt: skip
        # The unit's texts are recorded (24 kB); its embeddings (2 layers x 333 texts x 32 floats, plus
        # the texts, ~110 kB) cannot be written into the 48 kB left, though spec and records fit.
        from layertime.phases.record import task_texts
        from layertime.rundir import RunDir

        task_texts("DemoClassification", RunDir.of(disk / "demo"), "rule-a", hub)
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 48 * 1024))
        free = shutil.disk_usage(disk).free

        out = _cli("run", "--plain", str(both))
        assert out.exit_code == 2, out.output
        sts = next((store / "scores").rglob("DemoSTS")).relative_to(store / "scores")  # settings/model/commit
        unit = store / "embeddings" / sts.parent / "DemoClassification"
        assert "No space left on device while writing" in out.stderr
        assert str(unit) in out.stderr and "free on that file system" in out.stderr
        assert "Traceback" not in out.output
        assert _temps(disk) == []  # the half-written temp directory was removed...
        assert shutil.disk_usage(disk).free >= free - 8 * 4096  # ...and gave its space back
        assert {p: s for p, s in _files(store).items() if p in before} == before  # finished work intact
        assert pl.read_parquet(disk / "demo/tables/scores.parquet").equals(scores)

        subprocess.run(["mount", "-o", "remount,size=8m", "tmpfs", str(disk)], check=True)
        healed = _cli("run", "--plain", str(both))
        assert healed.exit_code == 0, healed.output
        assert "scored 2 (checkpoint, task, layer) units, 2 already done" in healed.stdout
        merged = pl.read_parquet(disk / "demo/tables/scores.parquet")
        assert merged.height == 4 and merged.select("revision", "task", "layer", "subset").is_unique().all()
        records = [p for p in before if p.name.startswith("layer_") and "scores" in p.parts]
        assert records and all(_files(store)[p] == before[p] for p in records)  # DemoSTS not recomputed
        assert _temps(disk) == []


# --- bad input, through the CLI: one message, exit 2, nothing written ---------------------------


def _broken_hub(hub: Path, tmp_path: Path) -> Path:
    """The demo model under another repo id (the demo world would rebuild its own files), with the
    weights of step2000 gone from the cache."""
    broken = tmp_path / "hub"
    repo = broken / "models--testorg--tiny-neox"
    shutil.copytree(hub / "models--layertime--tiny-neox", repo, symlinks=True)
    commit = (repo / "refs" / "step2000").read_text().strip()
    (repo / "snapshots" / commit / "model.safetensors").unlink()
    return broken


BAD_INPUT = {
    "malformed YAML": ({"text": "name: demo\nlayers: [1, 3\n"}, ["not valid YAML", "spec.yaml"]),
    "unknown key": ({"layer": [1]}, ["unknown key 'layer'"]),
    "unknown task": ({"tasks": ["DemoSTS", "NoSuchTask"]}, ["tasks: unknown task 'NoSuchTask'"]),
    "block out of range": ({"layers": [1, 7]}, ["block 7 is outside", "4 blocks"]),
    "block = n, one past the last": ({"layers": [1, 4]}, ["block 4 is outside", "4 blocks (0..3)"]),
    "unknown revision": (
        {"checkpoints": ["step1000", "step9000"]},
        ["layertime/tiny-neox@step9000 is not in the HF cache", "layertime prefetch"],
    ),  # fmt: skip
    "checkpoint not in the offline cache": (
        {"broken_hub": True, "model": "testorg/tiny-neox", "checkpoints": ["step1000", "step2000"]},
        ["testorg/tiny-neox@step2000", "missing", "fix: hf download testorg/tiny-neox --revision step2000"],
    ),
    "no GPU for --device cuda": (
        {"args": ["--device", "cuda"]},
        ["--device: device 'cuda'", "no GPU is visible"],
    ),
    "run root under a file": (
        {"file_parent": True},
        ["run_root: cannot write", "is a file, not a directory"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_message_exit_2_and_nothing_written(case, hub, tmp_path):
    change, expected = BAD_INPUT[case]
    change = dict(change)
    args = change.pop("args", [])
    if change.pop("broken_hub", False):
        change["hf_cache"] = str(_broken_hub(hub, tmp_path))
    run_root = tmp_path / "run/demo"
    if change.pop("file_parent", False):
        (tmp_path / "run").write_text("a file where the run root's parent should be")
    spec = _spec_file(tmp_path, hub, **{k: v for k, v in change.items() if k != "text"})
    if "text" in change:
        spec.write_text(change["text"])
    if case == "run root under a file":
        expected = [*expected, str(run_root), str(tmp_path / "run")]
    before = sorted(p for p in tmp_path.rglob("*") if "hub" not in p.parts)

    out = _cli("run", "--plain", str(spec), *args)

    assert out.exit_code == 2, out.output
    assert all(words in out.stderr for words in expected), out.stderr
    assert "Traceback" not in out.output and out.stderr.count("error:") == 1
    assert sorted(p for p in tmp_path.rglob("*") if "hub" not in p.parts) == before  # nothing written


def test_the_last_block_n_minus_1_is_in_range(hub, tmp_path):
    """The other side of the range check: block n - 1 (3 of the demo model's 4) runs."""
    out = _cli("run", "--plain", str(_spec_file(tmp_path, hub, layers=[3])))
    assert out.exit_code == 0, out.output
    scores = pl.read_parquet(tmp_path / "run/demo/tables/scores.parquet")
    assert scores["layer"].to_list() == [3] and scores["hidden_state"].to_list() == [4]


def test_a_read_only_run_root_is_refused_naming_it(hub, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        spec = _spec_file(tmp_path, hub, run_root=str(ro / "runs/demo"), store=str(tmp_path / "store"))
        out = _cli("run", "--plain", str(spec))
        assert out.exit_code == 2, out.output
        assert f"run_root: cannot write {ro / 'runs/demo'}: {ro} is on a read-only file system" in out.stderr
        assert not (tmp_path / "store").exists()


def test_a_run_root_that_cannot_be_created_is_named_by_the_library_too(tmp_path):
    from layertime.rundir import RunDir

    (tmp_path / "run").write_text("a file")
    with pytest.raises(NotADirectoryError, match=rf"run_root {tmp_path}/run/demo cannot be written"):
        with RunDir.of(tmp_path / "run/demo").lock():
            pass


# --- inputs the encoder must survive ----------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_an_empty_text_is_embedded_as_eos_alone_never_nan(hub, demo_repo, pooling):
    from layertime.encoder import MultiLayerEncoder

    enc = MultiLayerEncoder(demo_repo, revision="step2000", cache_dir=str(hub), device="cpu", dtype="float32",
                            pooling=pooling, normalize=pooling == "last")  # fmt: skip
    eos = enc.tokenizer.eos_token_id
    assert enc._ids([""], truncate=True) == [[]]  # the decoder has no BOS: zero tokens of its own
    assert enc.tokenize(["", "Rain."])[0] == [eos]
    alone = enc.encode([""])  # a batch of nothing but the empty text
    mixed = enc.encode(["Rain.", "", "A longer sentence about the team and the match."])
    reference = enc._forward([[eos]])
    for b in enc.layers:
        assert np.isfinite(alone[b]).all() and np.isfinite(mixed[b]).all()
        np.testing.assert_allclose(alone[b][0], reference[b][0], atol=1e-6)
        np.testing.assert_allclose(mixed[b][1], reference[b][0], atol=1e-5)


def test_cuda_without_a_gpu_is_named_by_the_encoder(hub, demo_repo, monkeypatch):
    import torch

    from layertime.encoder import DeviceUnavailable, MultiLayerEncoder, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # so the test means the same on a GPU box
    with pytest.raises(
        DeviceUnavailable, match=r"device 'cuda:1': .* on .*; run on a GPU node, or pass --device cpu"
    ):
        MultiLayerEncoder(demo_repo, revision="step2000", cache_dir=str(hub), device="cuda:1")
    with pytest.raises(DeviceUnavailable, match=r"device 'gpu0' is not a torch device"):
        check_device("gpu0")
    assert check_device(None).type == "cpu"


# --- the flow's process killed mid-run ---------------------------------------------------------------

# Runs `layertime run SPEC` (the flow, on the session's Prefect server) with one injected fault: the
# second unit's embeddings stop half-written until the process is killed, so the kill lands mid-write
# (the checkpoint's GPU work embeds its units one after another; their scoring waits for all of them).
_HANG_ON_THE_SECOND_EMBEDDING = """
import os, sys, time
from pathlib import Path
from layertime.phases import embed

real, units = embed.save_array, []

def save_array(path, array):
    if Path(path).parent not in units:
        units.append(Path(path).parent)
    if len(units) == 2:
        Path(path).write_bytes(b"\\x93NUMPY half a file")
        Path(os.environ["SENTINEL"]).write_text(str(os.getpid()))
        time.sleep(600)
    real(path, array)

embed.save_array = save_array
from flows.commands import app
sys.argv = ["layertime", "run", os.environ["SPEC"]]
app()
"""


def _layertime_run(
    spec: Path, server, home: Path, log: Path, script: str | None = None, **env: str
) -> subprocess.Popen:
    """`layertime run SPEC` in a process group of its own, on the session's Prefect `server`
    (PREFECT_HOME `home`); its output goes to `log` (a pipe nobody reads would fill up and stall it)."""
    environ = prefect_runs.client_env(
        server, HF_HUB_OFFLINE="1", PREFECT_HOME=str(home), SPEC=str(spec), **env
    )
    args = ["-c", script] if script else ["-m", "flows.commands", "run", str(spec)]
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=environ, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _score_records(store: Path) -> dict[Path, tuple[int, int]]:
    return (
        {p: s for p, s in _files(store / "scores").items() if p.suffix == ".json"} if store.exists() else {}
    )


@pytest.mark.slow
def test_a_flow_killed_mid_run_is_resumed_recomputing_exactly_the_unfinished_units(
    prefect_server, hub, tmp_path
):
    spec = _spec_file(tmp_path, hub, layers=[1, 3],
                      tasks=["DemoSTS", "DemoPairClassification", "DemoClassification"])  # fmt: skip
    store, sentinel = tmp_path / "run/store", tmp_path / "hung"
    log = tmp_path / "killed.log"
    flow = _layertime_run(
        spec, prefect_server, tmp_path / "prefect", log, _HANG_ON_THE_SECOND_EMBEDDING, SENTINEL=str(sentinel)
    )
    try:
        deadline = time.monotonic() + 240
        # One unit embedded, the second half-written: kill the whole process group (the flow, its
        # threads, Dask and the scoring processes), as a lost login node would.
        while not sentinel.exists():
            assert flow.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the second unit's embeddings were never written"
            time.sleep(0.2)
    finally:
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
    assert _score_records(store) == {}
    costs = _files(store / "costs")
    assert len(costs) == 1  # the finished unit's embeddings
    leftover = _temps(store / "embeddings")  # killed mid-write: half a unit in its temp directory
    assert len(leftover) == 1 and leftover[0].is_dir() and list(leftover[0].glob("layer_*.npy"))

    again = _layertime_run(spec, prefect_server, tmp_path / "prefect", tmp_path / "rerun.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()[-3000:]

    assert len(_score_records(store)) == 6  # every (task, layer) unit scored, once
    rewritten = {p for p, s in _files(store / "costs").items() if costs.get(p) != s}
    assert len(rewritten) == 2 and not set(costs) & rewritten  # the 2 unfinished units embedded, once
    scores = pl.read_parquet(tmp_path / "run/demo/tables/scores.parquet")
    assert scores.height == 6 and scores.select("revision", "task", "layer", "subset").is_unique().all()
    assert _temps(tmp_path / "run") == []  # the killed writer's half-written directory is gone


# --- a Dask worker killed with SIGKILL while it embeds (real SLURM) ---------------------------------

# Worker processes start through this python: the first one to write embeddings says its pid and
# waits there, mid-unit, until the test kills it; processes started later embed normally.
_WORKER_HOOK = """
import os, time
from pathlib import Path
from layertime.phases import embed

real = embed.save_array

def save_array(path, array):
    sentinel = Path({sentinel!r})
    if not sentinel.exists():
        sentinel.write_text(str(os.getpid()))
        time.sleep(600)
    real(path, array)

embed.save_array = save_array
"""


def _hooked_python(directory: Path, sentinel: Path) -> Path:
    (directory / "hook").mkdir(parents=True)
    (directory / "hook/sitecustomize.py").write_text(_WORKER_HOOK.format(sentinel=str(sentinel)))
    python = directory / "python"
    python.write_text(f'#!/bin/sh\nexport PYTHONPATH={directory / "hook"}${{PYTHONPATH:+:$PYTHONPATH}}\n'
                      f'exec {sys.executable} "$@"\n')  # fmt: skip
    python.chmod(0o755)
    return python


@pytest.mark.slow
@needs_slurm
def test_a_dask_worker_killed_while_embedding_is_replaced_and_every_row_is_present_once(
    prefect_api, ci_profile, hub, tmp_path, monkeypatch
):
    sentinel = tmp_path / "embedding-pid"
    monkeypatch.setenv("LAYERTIME_SLURM_PYTHON", str(_hooked_python(tmp_path / "worker", sentinel)))
    killed: dict[str, str] = {}
    stop = threading.Event()

    def kill_the_worker_that_embeds() -> None:
        while not stop.wait(0.2):
            if sentinel.exists() and sentinel.read_text():
                pid = int(sentinel.read_text())
                status = dict(
                    line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                )
                nanny = Path(f"/proc/{status['PPid'].strip()}/cmdline")  # the worker is the nanny's child
                killed["nanny"] = nanny.read_bytes().replace(b"\0", b" ").decode()
                environ = dict(
                    line.split("=", 1)
                    for line in Path(f"/proc/{pid}/environ").read_text().split("\0")
                    if "=" in line
                )
                killed["job"] = environ.get("SLURM_JOB_ID", "")
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = str(pid)
                return

    killer = threading.Thread(target=kill_the_worker_that_embeds, daemon=True)
    killer.start()
    try:
        state = test_slurm._run({**GRID, "hf_cache": str(hub), "run_root": str(tmp_path / "demo")}, "slurm")
    finally:
        stop.set()
        killer.join(timeout=10)
    assert "pid" in killed, "no worker embedded before the run ended"
    assert killed["job"] and "distributed.cli.dask_worker" in killed["nanny"]  # a Dask worker in a SLURM job
    assert state.is_completed(), state.message

    scores = test_slurm._scores(tmp_path / "demo")
    assert scores.height == UNITS and scores["main_score"].is_finite().all()
    assert scores.select("revision", "task", "layer", "subset").is_unique().all()
    names = [r.name for r in test_slurm._task_runs(state.state_details.flow_run_id)]
    scored = [n for n in names if n.startswith("score[")]
    assert sorted(scored) == test_slurm.SCORE_TASK_RUNS  # each (checkpoint, task) once, none twice
    assert _temps(tmp_path / "store") == []  # the killed worker's half-written unit was removed
