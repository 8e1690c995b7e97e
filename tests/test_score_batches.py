"""A score task run scores up to LAYERS_PER_SCORE_TASK layers of one (checkpoint, task), each an
evaluation of its own with its own completion record (issue 15: one task run per layer made Prefect's
~0.1 core-second per task run the larger part of a scale run's non-compute time). A layer that fails
fails alone: the task run's other layers are scored and recorded, the task run fails naming it, is not
retried when the error cannot heal, and when it may heal its retry scores only that layer. Through a
real flow run on Dask, task runs and their states read back from the Prefect API."""

from pathlib import Path

import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect_runs import artifact, task_runs  # tests/prefect_runs.py
from specs import demo_overrides  # tests/specs.py

from flows.layer_by_layer import LAYERS_PER_SCORE_TASK, UnitsFailed, layer_by_layer
from layertime.bridge import UnexpectedScores
from layertime.phases import score

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "deployments/demo.yaml")
TASKS = ["DemoSTS", "DemoClassification"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def _grid(tmp_path: Path, hub: Path) -> dict:
    # The demo model's 4 blocks: one batch of LAYERS_PER_SCORE_TASK per (checkpoint, task).
    return demo_overrides(tmp_path, hub, layers=[0, 1, 2, 3], tasks=TASKS)


def _score_runs(flow_run_id) -> dict:
    """Score task run name -> task run (state, run count), from the API."""
    return {n: r for n, r in task_runs(flow_run_id).items() if n.startswith("score[")}


def _state_history(task_run) -> list:
    with get_client(sync_client=True) as client:
        return sorted(client.read_task_run_states(task_run.id), key=lambda s: s.timestamp)


def _progress(flow_run_id) -> str:
    return artifact(flow_run_id).description


def _records(store: Path, task: str) -> dict[int, Path]:
    """Layer -> completion record of step1000's `task` (the grid's one checkpoint)."""
    return {int(p.stem.split("_")[1]): p for p in store.glob(f"scores/**/{task}/layer_*.json")}


_score_unit = score.score_unit


def _permanently_broken(ctx, ckpt, task, blocks, *args):
    """Layer 2 of DemoSTS cannot score (an error that cannot heal). Module level, so the scoring
    processes can import it."""
    if task == "DemoSTS" and blocks == [2]:
        raise UnexpectedScores("injected failure")
    return _score_unit(ctx, ckpt, task, blocks, *args)


def _broken_once(ctx, ckpt, task, blocks, *args):
    """Layer 1 of DemoSTS meets an I/O error on its first try only (the marker file, in the run root,
    says it was tried: the scoring processes share no memory with the test)."""
    if task == "DemoSTS" and blocks == [1]:
        try:
            (ctx.run.root / "failed-once").open("x").close()
        except FileExistsError:
            pass  # tried before: this time it heals
        else:
            raise OSError("injected I/O error")
    return _score_unit(ctx, ckpt, task, blocks, *args)


def test_one_score_task_run_per_checkpoint_task_and_a_permanent_failure_fails_its_layer_alone_untried_again(
    hub, tmp_path, monkeypatch
):
    assert LAYERS_PER_SCORE_TASK == 4  # the grid's 4 layers are one batch
    monkeypatch.setattr(score, "score_unit", _permanently_broken)
    state = layer_by_layer(SPEC, overrides=_grid(tmp_path, hub), return_state=True)
    assert state.is_failed()
    with pytest.raises(
        UnitsFailed,
        match=r"1 unit\(s\) failed:\nscore\[step1000 · DemoSTS · L2\]: UnexpectedScores: injected",
    ):
        state.result()

    runs = _score_runs(state.state_details.flow_run_id)
    assert sorted(runs) == ["score[step1000 · DemoClassification · L0-3]", "score[step1000 · DemoSTS · L0-3]"]
    failed = runs["score[step1000 · DemoSTS · L0-3]"]
    assert (failed.state.name, failed.run_count) == ("Failed", 1)  # cannot heal: tried once
    assert not [s.name for s in _state_history(failed) if s.name in ("AwaitingRetry", "Retrying")]
    assert runs["score[step1000 · DemoClassification · L0-3]"].state.name == "Completed"

    # The failed layer fails alone: the layers after it in the same task run were scored too.
    assert sorted(_records(tmp_path / "store", "DemoSTS")) == [0, 1, 3]
    assert sorted(_records(tmp_path / "store", "DemoClassification")) == [0, 1, 2, 3]
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    sts = scores.filter(pl.col("task") == "DemoSTS")
    assert sorted(set(sts["layer"])) == [0, 1, 3] and sts["main_score"].is_finite().all()
    # progress counts layers, not task runs
    assert _progress(state.state_details.flow_run_id).startswith("7/8 units scored, 1 failed")


def test_a_score_task_run_retried_after_a_transient_failure_scores_only_the_failed_layer(
    hub, tmp_path, monkeypatch
):
    monkeypatch.setattr(score, "score_unit", _broken_once)
    state = layer_by_layer(SPEC, overrides=_grid(tmp_path, hub), return_state=True)
    assert state.is_completed(), state.message

    runs = _score_runs(state.state_details.flow_run_id)
    assert sorted(runs) == ["score[step1000 · DemoClassification · L0-3]", "score[step1000 · DemoSTS · L0-3]"]
    healed = runs["score[step1000 · DemoSTS · L0-3]"]
    assert (healed.state.name, healed.run_count) == ("Completed", 2)  # retried once, then done
    assert runs["score[step1000 · DemoClassification · L0-3]"].run_count == 1

    # The first try scored layers 0, 2 and 3 (the failure did not stop them); the retry read their
    # records back and wrote only layer 1's: the others' records are older than the retry.
    retry = next(s for s in _state_history(healed) if s.name == "Retrying").timestamp.timestamp()
    records = _records(tmp_path / "store", "DemoSTS")
    assert sorted(records) == [0, 1, 2, 3]
    written = {b: p.stat().st_mtime for b, p in records.items()}
    assert all(written[b] < retry for b in (0, 2, 3)), (written, retry)
    assert written[1] > retry, (written, retry)
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    assert scores.select("task", "layer").unique().height == 2 * 4 and scores["main_score"].is_finite().all()


def _fails_after_recording(ctx, ckpt, task, blocks, *args):
    """Layer 3 of DemoSTS is scored and recorded, then its task run fails all the same (as when a
    worker is lost, or the API refuses the final state, after the last record was written)."""
    rows = _score_unit(ctx, ckpt, task, blocks, *args)
    if task == "DemoSTS" and blocks == [3]:
        raise UnexpectedScores("injected failure after the record was written")
    return rows


def test_a_score_task_run_that_fails_with_every_layer_recorded_leaves_no_embeddings_behind(
    hub, tmp_path, monkeypatch
):
    monkeypatch.setattr(score, "score_unit", _fails_after_recording)
    state = layer_by_layer(SPEC, overrides=_grid(tmp_path, hub), return_state=True)
    runs = _score_runs(state.state_details.flow_run_id)
    assert runs["score[step1000 · DemoSTS · L0-3]"].state.name == "Failed"
    # The records are the one truth for "done": every layer has one, so no unit failed...
    assert sorted(_records(tmp_path / "store", "DemoSTS")) == [0, 1, 2, 3]
    assert state.is_completed(), state.message
    # ...and nothing is left for a re-run to score from the embeddings: they are deleted (a re-run
    # would find every record and never look at them again).
    assert not list((tmp_path / "store").glob("embeddings/**/layer_*.npy"))
