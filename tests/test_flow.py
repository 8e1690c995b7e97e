"""The layer-by-layer flow under a real Prefect server (the session's), on the tiny offline world."""

from pathlib import Path

import polars as pl
import pytest
from prefect_runs import states, task_runs  # tests/prefect_runs.py

from flows.layer_by_layer import NotReady, UnitsFailed, layer_by_layer
from layertime.bridge import UnexpectedScores
from layertime.encoder import NonFiniteEmbedding
from layertime.phases import embed, score

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "deployments/demo.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def _run(overrides: dict):
    state = layer_by_layer(SPEC, overrides=overrides, return_state=True)
    return state, states(state.state_details.flow_run_id)


_score_unit = score.score_unit


def _broken_score_unit(ctx, ckpt, task, blocks, *args):
    """A test-only hook: one unit cannot score. Module level, so the scoring processes can import it."""
    if ckpt.revision == "step1000" and task == "DemoSTS" and blocks == [3]:
        raise UnexpectedScores("injected failure")  # permanent: not retried
    return _score_unit(ctx, ckpt, task, blocks, *args)


def test_a_failed_unit_fails_the_flow_by_name_and_a_rerun_recomputes_only_it(hub, tmp_path, monkeypatch):
    overrides = {"run_root": str(tmp_path / "demo"), "hf_cache": str(hub), "checkpoints": ["step1000", "step3000", "main"],
                 "layers": [1, 3], "tasks": ["DemoSTS", "DemoClassification"]}  # fmt: skip
    real = score.score_unit
    monkeypatch.setattr(score, "score_unit", _broken_score_unit)
    state, states = _run(overrides)
    assert state.is_failed()
    with pytest.raises(
        UnitsFailed,
        match=r"1 unit\(s\) failed:\nscore\[step1000 · DemoSTS · L3\]: UnexpectedScores: injected",
    ):
        state.result()
    # One score task run per (checkpoint, task), its layers scored in turn (issue 15): the failed layer
    # fails its task run, but its batch's other layer is scored and recorded all the same.
    score_runs = {n: s for n, s in states.items() if n.startswith("score[")}
    assert len(score_runs) == 2 * 2 and all(n.endswith(" · L1,3]") for n in score_runs), score_runs
    assert states["score[step1000 · DemoSTS · L1,3]"] == "Failed"
    assert sum(s == "Completed" for s in score_runs.values()) == 2 * 2 - 1
    partial = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    assert partial.height == 3 * 2 * 2 - 1  # the tables of what exists are written all the same
    same_run = partial.filter((pl.col("revision") == "step1000") & (pl.col("task") == "DemoSTS"))
    assert same_run["layer"].to_list() == [1]  # the failed layer's batch mate has its row

    monkeypatch.setattr(score, "score_unit", real)
    state, states = _run(overrides)
    assert state.is_completed()
    # only the failed unit gets a task (and the recordings, which read the stored texts back), scored
    # from the embeddings its failure kept (no gpu task); the other scores and the metrics are read
    # from their completion records
    assert sorted(states) == ["merge[demo]", "record[DemoClassification]", "record[DemoSTS]",
                              "score[step1000 · DemoSTS · L3]"]  # fmt: skip
    assert set(states.values()) == {"Completed"}
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    assert scores.height == 3 * 2 * 2 and scores["main_score"].is_finite().all()
    layers = pl.read_parquet(tmp_path / "demo/tables/layers.parquet")
    assert layers["average"].is_not_null().all() and layers["lidar"].is_finite().all()
    metrics = pl.read_parquet(tmp_path / "demo/tables/metrics.parquet")
    assert set(metrics["revision"]) == {"step1000", "step3000", "main"} and metrics["value"].is_finite().all()


def test_each_checkpoint_is_loaded_once_for_its_metrics_and_embeddings_and_a_bad_unit_fails_alone(
    hub, tmp_path, monkeypatch
):
    overrides = {"run_root": str(tmp_path / "demo"), "hf_cache": str(hub), "checkpoints": ["step1000", "step2000"],
                 "layers": [1, 3], "tasks": ["DemoSTS", "DemoClassification"]}  # fmt: skip
    loads, real_load, real_embed = [], embed.load_encoder, embed.embed_unit

    def counted_load(spec, ckpt, blocks, *args, **kwargs):
        loads.append((ckpt.revision, list(blocks)))
        return real_load(spec, ckpt, blocks, *args, **kwargs)

    def embed_but_one(encoder, ctx, ckpt, task, *args):
        if (ckpt.revision, task) == ("step2000", "DemoClassification"):
            raise NonFiniteEmbedding("injected NaN embeddings")
        return real_embed(encoder, ctx, ckpt, task, *args)

    monkeypatch.setattr(embed, "load_encoder", counted_load)
    monkeypatch.setattr(embed, "embed_unit", embed_but_one)
    state, states = _run(overrides)
    assert state.is_failed()
    with pytest.raises(
        UnitsFailed,
        match=r"1 unit\(s\) failed:\nembed\[step2000 · DemoClassification\]: NonFiniteEmbedding: injected",
    ):
        state.result()
    # one load per checkpoint serves its metrics and both tasks' embeddings
    assert sorted(loads) == [("step1000", [1, 3]), ("step2000", [1, 3])]
    assert states["gpu[step1000]"] == states["gpu[step2000]"] == "Completed"  # a bad unit is not retried
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    assert scores.select("revision", "task").unique().sort("revision", "task").rows() == [
        ("step1000", "DemoClassification"), ("step1000", "DemoSTS"), ("step2000", "DemoSTS")]  # fmt: skip
    metrics = pl.read_parquet(tmp_path / "demo/tables/metrics.parquet")
    assert set(metrics["revision"]) == {"step1000", "step2000"} and set(metrics["layer"]) == {1, 3}


def test_sibling_specs_compute_their_shared_units_once(hub, tmp_path):
    common = {"hf_cache": str(hub), "tasks": ["DemoSTS"], "layers": [2, 3]}
    first, _ = _run({**common, "run_root": str(tmp_path / "a"), "checkpoints": ["main"]})
    assert first.is_completed()
    second, states = _run(
        {**common, "run_root": str(tmp_path / "b"), "checkpoints": ["step2000", "step3000"]}
    )
    assert second.is_completed()
    assert not [n for n in states if n.startswith("score[step3000")]  # done: read from their records
    assert states["score[step2000 · DemoSTS · L2-3]"] == "Completed"  # both layers in one task run
    assert "gpu[step3000]" not in states  # nothing left to embed or measure for the shared commit


def test_the_flow_refuses_to_start_when_the_cache_misses_a_checkpoint(hub, tmp_path):
    import shutil

    # The demo model under another repo id: the demo world would rebuild its own missing files.
    broken = tmp_path / "hub"
    repo = broken / "models--testorg--tiny-neox"
    shutil.copytree(hub / "models--layertime--tiny-neox", repo, symlinks=True)
    commit = (repo / "refs" / "step2000").read_text().strip()
    (repo / "snapshots" / commit / "model.safetensors").unlink()  # the weights of one revision are gone
    state, states = _run({"run_root": str(tmp_path / "demo"), "hf_cache": str(broken), "model": "testorg/tiny-neox",
                          "checkpoints": ["step1000", "step2000"], "tasks": ["DemoSTS"], "layers": [3]})  # fmt: skip
    assert state.is_failed()
    with pytest.raises(
        NotReady,
        match=r"(?s)testorg/tiny-neox@step2000 weights .*missing.*fix: hf download testorg/tiny-neox --revision step2000",
    ):
        state.result()
    assert not states  # no task ran: no GPU work started


def _score_runs(flow_run_id) -> list:
    runs = task_runs(flow_run_id).values()
    return sorted((r for r in runs if r.name.startswith("score[")), key=lambda r: r.start_time)


def test_scoring_waits_for_memory_instead_of_overcommitting_it(hub, tmp_path):
    # Two scoring processes, but memory for one task at a time: units must score one after another.
    grid = {"run_root": str(tmp_path / "demo"), "hf_cache": str(hub), "checkpoints": ["step1000"],
            "layers": [1, 2, 3], "tasks": ["DemoSTS", "DemoClassification"], "metrics": None}  # fmt: skip
    memory = {
        "scoring_processes": 2,
        "memory_gb": 3,
        "task_memory_gb": {"DemoSTS": 2, "DemoClassification": 2},
    }
    state = layer_by_layer(SPEC, overrides=grid, cluster_overrides=memory, return_state=True)
    assert state.is_completed(), state.message
    runs = _score_runs(state.state_details.flow_run_id)
    # one task run per (checkpoint, task), each scoring its 3 layers in turn (issue 15)
    assert sorted(r.name for r in runs) == ["score[step1000 · DemoClassification · L1-3]",
                                            "score[step1000 · DemoSTS · L1-3]"]  # fmt: skip
    assert all(r.state.name == "Completed" for r in runs)
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier.end_time <= later.start_time, f"{earlier.name} and {later.name} scored at once"

    other = {**grid, "run_root": str(tmp_path / "other" / "demo")}
    too_big = {**memory, "task_memory_gb": {"DemoSTS": 4}}
    with pytest.raises(Exception, match=r"DemoSTS needs 4 GB.*local: 3 GB"):
        layer_by_layer(SPEC, overrides=other, cluster_overrides=too_big)
    assert not (tmp_path / "other").exists()  # refused before anything was written
