"""Embeddings are deleted by the flow itself, under the store's claims, once every layer of their
(checkpoint, task) is scored: no `cleanup` task run per unit (issue 15: exp2 made 1,600 of them, ~0.1 s
of orchestration each). A unit with a failed layer keeps its embeddings, and the re-run scores it
from them with no GPU work. Through a real flow run on Dask, task runs read from the Prefect API."""

from pathlib import Path

import polars as pl
import pytest
from prefect_runs import states  # tests/prefect_runs.py

from flows.layer_by_layer import UnitsFailed, layer_by_layer
from layertime.bridge import UnexpectedScores
from layertime.phases import score

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "deployments/demo.yaml")
pytestmark = pytest.mark.slow

_score_unit = score.score_unit


def _broken_score_unit(ctx, ckpt, task, blocks, *args):
    """One layer of one unit cannot score. Module level, so the scoring processes can import it."""
    if ckpt.revision == "step1000" and task == "DemoSTS" and blocks == [3]:
        raise UnexpectedScores("injected failure")  # permanent: not retried (no 5 + 30 s of retry delays)
    return _score_unit(ctx, ckpt, task, blocks, *args)


def _embedded(store: Path) -> set[tuple[str, str]]:
    """(commit directory, task) of every unit whose embeddings are on disk."""
    return {(p.parent.parent.name, p.parent.name) for p in store.glob("embeddings/**/layer_*.npy")}


def test_embeddings_are_deleted_without_task_runs_and_a_failed_unit_keeps_its_own(
    prefect_api, hub, tmp_path, monkeypatch
):
    overrides = {"run_root": str(tmp_path / "demo"), "hf_cache": str(hub), "checkpoints": ["step1000", "step2000"],
                 "layers": [1, 3], "tasks": ["DemoSTS", "DemoClassification"]}  # fmt: skip
    store = tmp_path / "store"
    monkeypatch.setattr(score, "score_unit", _broken_score_unit)
    state = layer_by_layer(SPEC, overrides=overrides, return_state=True)
    with pytest.raises(UnitsFailed, match=r"score\[step1000 · DemoSTS · L3\]"):
        state.result()
    first = states(state.state_details.flow_run_id)
    assert not [name for name in first if name.startswith("cleanup")], sorted(first)
    assert (
        sorted(name.split("[")[0] for name in first)
        == ["gpu"] * 2 + ["merge"] + ["record"] * 2 + ["score"] * 4  # one per (checkpoint, task)
    )
    assert first["score[step1000 · DemoSTS · L1,3]"] == "Failed"
    # The failed layer fails alone: its task run's other layer is scored and recorded.
    records = sorted(p.name for p in store.glob("scores/**/DemoSTS/layer_*.json"))
    assert records == ["layer_1.json", "layer_1.json", "layer_3.json"], records
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    sts = scores.filter(pl.col("task") == "DemoSTS").select("revision", "layer").sort("revision", "layer")
    assert sts.rows() == [("step1000", 1), ("step2000", 1), ("step2000", 3)]
    # Scored units' embeddings are gone; the unit with a failed layer keeps its own for the re-run.
    kept = _embedded(store)
    assert [task for _, task in kept] == ["DemoSTS"], kept

    monkeypatch.setattr(score, "score_unit", _score_unit)
    state = layer_by_layer(SPEC, overrides=overrides, return_state=True)
    assert state.is_completed()
    again = states(state.state_details.flow_run_id)
    # Only the failed layer is scored again, from the kept embeddings: no model load.
    assert sorted(again) == ["merge[demo]", "record[DemoClassification]", "record[DemoSTS]",
                             "score[step1000 · DemoSTS · L3]"]  # fmt: skip
    assert set(again.values()) == {"Completed"}
    assert _embedded(store) == set()  # deleted once its last layer is scored
