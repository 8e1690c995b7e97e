"""What an adversarial tester planted in a finished run's store (issue 24) is rejected, with one line
per rejected file naming it and why, and healed in the same run: the tables then equal the untouched
run's value by value (tolerance zero), through `--plain` and through the flow.

One finished run (the demo world's smallest grid, embeddings kept) is copied for each attack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from flows.commands import app
from layertime import records
from layertime.phases.plain import run_spec
from layertime.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
GRID = {"checkpoints": ["step1000"], "layers": [1, 3], "tasks": ["DemoSTS", "DemoClassification"],
        "keep_embeddings": True, "metrics": {"corpus": "tasks", "sample": 40, "views": 0, "lidar_views": 0}}  # fmt: skip


def _spec_file(work: Path, hub: Path) -> Path:
    data = yaml.safe_load((ROOT / "deployments/demo.yaml").read_text())
    data.update(run_root=str(work / "demo"), store=str(work / "store"), hf_cache=str(hub), **GRID)
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tables(work: Path) -> dict[str, pl.DataFrame]:
    """The scores and metrics tables without measured costs (a rescored unit takes other seconds)."""
    tables = work / "demo/tables"
    scores = pl.read_parquet(tables / "scores.parquet").drop("seconds", "peak_memory_gb")
    metrics = pl.read_parquet(tables / "metrics.parquet")
    return {
        "scores": scores.sort("task", "layer"),
        "metrics": metrics.sort("layer", "metric", "normalization"),
    }


@pytest.fixture(scope="module")
def finished(hub, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished")
    run_spec(load_spec(_spec_file(work, hub)))
    return work


def _copy(finished: Path, hub: Path, tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "work"
    shutil.copytree(finished, work, symlinks=True)
    return work, _spec_file(work, hub)


def _file(work: Path, kind: str, task: str, name: str) -> Path:
    (found,) = (work / "store" / kind).rglob(f"{task}/{name}")
    return found


def _resealed(path: Path, edit) -> None:
    """The record edited by an attacker who knows its format: its digest computed again."""
    data = json.loads(path.read_text())
    edit(data)
    data["digest"] = records.content_digest(data)
    path.write_text(json.dumps(data))


def _nan_into(npy: Path) -> None:
    """NaN over the last float of the array: its .npy header and size intact."""
    data = bytearray(npy.read_bytes())
    data[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    npy.write_bytes(bytes(data))


def _score(field: str, value):
    """The attack: DemoSTS L1's record gets `field` = `value` in its row, resealed."""

    def plant(work: Path) -> Path:
        path = _file(work, "scores", "DemoSTS", "layer_1.json")
        _resealed(path, lambda d: d["rows"][0].update({field: value}))
        return path

    return plant


def _extra_subset(work: Path) -> Path:
    path = _file(work, "scores", "DemoClassification", "layer_3.json")
    _resealed(path, lambda d: d["rows"].append({**d["rows"][0], "subset": "extra", "main_score": 0.99}))
    return path


def _one_digit(work: Path) -> Path:
    path = _file(work, "scores", "DemoSTS", "layer_3.json")
    score = json.loads(path.read_text())["rows"][0]["main_score"]
    text = repr(score)
    edited = text[:4] + str((int(text[4]) + 1) % 10) + text[5:]  # 0.6942... -> 0.6952...: in range, finite
    path.write_text(path.read_text().replace(text, edited))
    return path


def _nan_embedding(work: Path) -> Path:
    _file(work, "scores", "DemoSTS", "layer_1.json").unlink()  # the layer to score again from kept embeddings
    npy = _file(work, "embeddings", "DemoSTS", "layer_1.npy")
    _nan_into(npy)
    return npy


def _other_layer(work: Path) -> Path:
    _file(work, "scores", "DemoClassification", "layer_1.json").unlink()
    npy = _file(work, "embeddings", "DemoClassification", "layer_1.npy")
    npy.write_bytes(_file(work, "embeddings", "DemoClassification", "layer_3.npy").read_bytes())
    return npy


def _metric_digit(work: Path) -> Path:
    (path,) = [p for p in (work / "store/metrics").rglob("layer_3.json")]
    path.write_text(path.read_text().replace('"n_skipped": 0', '"n_skipped": 1', 1))
    return path


ATTACKS = {
    "main_score NaN": (_score("main_score", float("nan")), "rows.0.main_score: Input should be a finite number"),
    "main_score inf": (_score("main_score", float("inf")), "rows.0.main_score: Input should be a finite number"),
    "main_score 7.5": (_score("main_score", 7.5), "main_score 7.5 of test/default is outside [-1, 1]"),
    "an extra subset row": (_extra_subset, "the unit asks for [('test', 'default')]"),
    "split train": (_score("split", "train"), "scores of (split, subset) [('train', 'default')]"),
    "a record edited by one digit": (_one_digit, "its digest does not match its content"),
    "NaN in a kept embedding": (_nan_embedding, "its content digest differs from the manifest's"),
    "another layer's array copied over": (_other_layer, "its content digest differs from the manifest's"),
    "a metrics record edited": (_metric_digit, "its digest does not match its content"),
}  # fmt: skip


@pytest.mark.parametrize("attack", ATTACKS)
def test_plain_rejects_each_planted_file_in_one_line_and_heals_in_the_same_run(
    attack, finished, hub, tmp_path
):
    work, spec = _copy(finished, hub, tmp_path)
    plant, why = ATTACKS[attack]
    planted = plant(work)
    result = CliRunner().invoke(app, ["run", "--plain", str(spec)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    rejected = [line for line in result.output.splitlines() if "rejected " in line]
    assert len(rejected) == 1 and f"rejected {planted}: " in rejected[0] and why in rejected[0], result.output
    healed, clean = _tables(work), _tables(finished)
    assert healed["scores"].equals(clean["scores"]), (healed["scores"], clean["scores"])
    assert healed["metrics"].equals(clean["metrics"])
    again = CliRunner().invoke(app, ["run", "--plain", str(spec)])  # healed for good: nothing left to do
    assert (
        "scored 0 (checkpoint, task, layer) units, 4 already done" in again.output
        and "rejected" not in again.output
    )


def _flow_logs(flow_run_id, *expected: str) -> list[str]:
    """Every log line of the flow run and its task runs, once they hold each of `expected`."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
            lines = [entry.message for entry in logs]
            if all(any(e in line for line in lines) for e in expected) or time.monotonic() > deadline:
                return lines
            time.sleep(1)


def test_the_flow_rejects_planted_files_in_one_line_each_and_heals_in_the_same_run(
    prefect_api, finished, hub, tmp_path, monkeypatch
):
    """A NaN main score (planning rejects the record), NaN in a kept array under a manifest made to
    agree (the GPU task rejects it before embedding again), and another layer's array copied over a
    file after the flow checked it (the score task rejects it; the flow embeds that unit again)."""
    from flows import layer_by_layer as lbl

    work, spec = _copy(finished, hub, tmp_path)
    record = _file(work, "scores", "DemoSTS", "layer_1.json")
    _resealed(record, lambda d: d["rows"][0].update(main_score=float("nan")))
    _file(work, "scores", "DemoClassification", "layer_1.json").unlink()
    nan = _file(work, "embeddings", "DemoClassification", "layer_1.npy")
    _nan_into(nan)
    manifest = nan.parent / "done.json"
    _resealed(manifest, lambda d: d["files"]["layer_1.npy"].update(sha256=records.sha256(nan.read_bytes())))
    _file(work, "scores", "DemoSTS", "layer_3.json").unlink()
    copied = _file(work, "embeddings", "DemoSTS", "layer_3.npy")
    copied.write_bytes(_file(work, "embeddings", "DemoSTS", "layer_1.npy").read_bytes())
    checked = lbl.Units._kept_whole  # DemoSTS changes after the flow checked it: as if it were whole
    monkeypatch.setattr(
        lbl.Units,
        "_kept_whole",
        lambda self, unit, layers: unit.task == "DemoSTS" or checked(self, unit, layers),
    )

    state = lbl.layer_by_layer(str(spec), return_state=True)
    assert state.is_completed(), state.message
    healed, clean = _tables(work), _tables(finished)
    assert healed["scores"].equals(clean["scores"]) and healed["metrics"].equals(clean["metrics"])
    lines = _flow_logs(
        state.state_details.flow_run_id, f"rejected {record}", f"rejected {nan}", f"rejected {copied}"
    )
    for planted, why in ((record, "rows.0.main_score: Input should be a finite number"), (nan, "1 non-finite values"),
                         (copied, "its content digest differs from the manifest's")):  # fmt: skip
        said = [line for line in lines if line.startswith(f"rejected {planted}: ")]
        assert len(said) == 1 and why in said[0], lines
    assert any(
        "embeddings of layers [3] rejected when scored; embedding them again" in line for line in lines
    ), lines
