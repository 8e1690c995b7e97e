"""Nothing read back from the store is trusted unchecked (issue 17, items 1 and 7): a file that is
damaged, whoever wrote it, is computed again, never a permanent failure and never a lost row."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from specs import demo_spec_file  # tests/specs.py
from typer.testing import CliRunner

from flows.commands import app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _spec_file(tmp_path: Path, hub: Path, **fields) -> Path:
    return demo_spec_file(
        tmp_path,
        hub,
        **{"run_root": str(tmp_path / "demo"), "tasks": ["DemoSTS", "DemoClassification"], **fields},
    )


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _scores(tmp_path: Path) -> pl.DataFrame:
    """The scores table without its measured costs (a rescored unit takes other seconds and memory)."""
    table = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    return table.drop("seconds", "peak_memory_gb").sort("task", "layer")


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs at `path` (we are root), unmounted however the test ends."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def _fill(disk: Path) -> Path:
    """A filler file that takes every free byte of `disk`."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:  # unbuffered: nothing left to flush on close
        for chunk in (1 << 20, 4096, 1):
            try:
                while out.write(b"\0" * chunk):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    assert shutil.disk_usage(disk).free < 4096
    return filler


def _flow(spec: Path):
    from flows.layer_by_layer import layer_by_layer

    return layer_by_layer(str(spec), return_state=True)


def test_a_store_whose_disk_filled_up_while_scoring_completes_once_there_is_room(prefect_api, hub, tmp_path):
    disk = tmp_path / "disk"
    with _tmpfs(disk, "20m"):
        spec = _spec_file(tmp_path, hub, store=str(disk), keep_embeddings=True)
        assert _cli("run", "--plain", str(spec)).exit_code == 0
        clean = _scores(tmp_path)
        assert clean.height == 4
        # Scoring left to do on embeddings already in the store, and a disk with no byte left.
        shutil.rmtree(disk / "scores")
        shutil.rmtree(disk / "mteb", ignore_errors=True)
        filler = _fill(disk)
        full = _cli("run", "--plain", str(spec))
        assert full.exit_code == 2 and "No space left on device" in full.output, full.output
        filler.unlink()

        state = _flow(spec)  # what any library wrote into the store meanwhile is no reason to fail
        assert state.is_completed(), state
        assert _scores(tmp_path).equals(clean)
        again = _cli("run", "--plain", str(spec))
        assert again.exit_code == 0, again.output
        assert "scored 0 (checkpoint, task, layer) units, 4 already done" in again.output
        # No empty file, but the runs' lock files (claims.py: empty by design, never read as data).
        locks = (".claim", ".write")
        assert not [
            p for p in disk.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.suffix not in locks
        ]


def _texts_cache(store: Path, task: str) -> Path:
    (found,) = (store / "texts").glob(f"{task}__*.json")
    return found


@pytest.mark.parametrize("damage", ["garbage", "empty object", "truncated", "a text edited"])
def test_a_damaged_texts_cache_is_recorded_again(damage, hub, tmp_path):
    spec = _spec_file(tmp_path, hub, layers=[3])
    assert _cli("run", "--plain", str(spec)).exit_code == 0
    clean = _scores(tmp_path)
    cache = _texts_cache(tmp_path / "store", "DemoSTS")
    texts = cache.read_text()
    for record in (tmp_path / "store/scores").rglob("DemoSTS/*.json"):
        record.unlink()  # the unit must be embedded again, from the texts cache
    damaged = {"garbage": "\x00\x01 not json", "empty object": "{}", "truncated": texts[: len(texts) // 2],
               "a text edited": texts.replace(json.loads(texts)["texts"][0], "EDITED", 1)}[damage]  # fmt: skip
    cache.write_text(damaged)
    again = _cli("run", "--plain", str(spec))
    assert again.exit_code == 0, again.output
    assert cache.read_text() == texts  # recorded again, whole
    assert _scores(tmp_path).equals(clean)


def test_a_damaged_texts_cache_never_drops_rows_from_the_flow(prefect_api, hub, tmp_path):
    spec = _spec_file(tmp_path, hub, layers=[3])
    assert _flow(spec).is_completed()
    clean = _scores(tmp_path)
    for record in (tmp_path / "store/scores").rglob("DemoSTS/*.json"):
        record.unlink()
    _texts_cache(tmp_path / "store", "DemoSTS").write_text("\x00 garbage")
    state = _flow(spec)
    assert state.is_completed(), state
    assert _scores(tmp_path).equals(clean)


def test_every_damaged_store_file_is_computed_again(hub, tmp_path):
    metrics = {"corpus": "tasks", "sample": 40, "views": 0, "lidar_views": 0}
    spec = _spec_file(tmp_path, hub, keep_embeddings=True, metrics=metrics)
    assert _cli("run", "--plain", str(spec)).exit_code == 0
    clean = _scores(tmp_path)
    measured = pl.read_parquet(tmp_path / "demo/tables/metrics.parquet")
    store = tmp_path / "store"
    unit = next((store / "embeddings").rglob("DemoClassification"))
    # Each file damaged as a crash, a full disk or a stray write leaves it.
    npy = unit / "layer_3.npy"
    npy.write_bytes(b"\x93NUMPY garbage".ljust(npy.stat().st_size, b"\0"))  # same size: the manifest agrees
    for record in (store / "scores").rglob("DemoClassification/layer_3.json"):
        record.unlink()
    wrong_rows = next((store / "scores").rglob("DemoSTS/layer_1.json"))
    wrong_rows.write_text(json.dumps({"rows": [{"unexpected": 1}]}))
    for record in (store / "metrics").rglob("*.json"):
        record.write_text('{"rows": "not rows"}')
    cost = next((store / "costs").rglob("embed__DemoSTS.json"))
    cost.write_text("")

    again = _cli("run", "--plain", str(spec))
    assert again.exit_code == 0, again.output
    assert "scored 2 (checkpoint, task, layer) units, 2 already done" in again.output
    assert _scores(tmp_path).equals(clean)
    remeasured = pl.read_parquet(tmp_path / "demo/tables/metrics.parquet")
    assert remeasured.sort("layer", "metric", "normalization")["value"].to_list() == (
        measured.sort("layer", "metric", "normalization")["value"].to_list()
    )
    assert json.loads(cost.read_text())["phase"] == "embed"  # rewritten from the unit's manifest
    costs = pl.read_parquet(tmp_path / "demo/tables/costs.parquet")
    assert sorted(costs.filter(pl.col("phase") == "embed")["task"]) == ["DemoClassification", "DemoSTS"]
