"""The replay oracle answers only what it is asked and counts exactly that; a run root's tables become
a full grid (layertime/search/replay.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from search_grids import smooth_grid  # tests/search_grids.py

from layertime import tables
from layertime.search.replay import Oracle, grid_from_arrays, grid_from_run, replay
from layertime.search.search import Embed, Score
from layertime.spec import SearchSpec


def test_oracle_counts_exactly_what_was_asked() -> None:
    grid = smooth_grid(steps=[0, 10, 100], blocks=3, tasks=2)
    oracle = Oracle(grid)
    ckpt = grid.space.checkpoints[1]
    assert oracle.embed(ckpt, "t1") == 2.0
    score, seconds = oracle.score(ckpt, "t1", 2)
    assert score == grid.scores[1, 1, 2] and seconds == 2.0  # task t costs 1 + t CPU-s
    oracle.score(ckpt, "t1", 0)
    oracle.embed(ckpt, "t1")  # asked twice: charged twice, the asker's waste
    assert (oracle.evaluations, oracle.embeddings, oracle.cpu_s, oracle.gpu_s) == (2, 2, 4.0, 4.0)
    assert oracle.asked == [Embed(ckpt, "t1"), Score(ckpt, "t1", 2), Score(ckpt, "t1", 0), Embed(ckpt, "t1")]


def test_oracle_refuses_a_scoring_before_its_embedding() -> None:
    grid = smooth_grid(steps=[0, 10], blocks=2, tasks=2)
    oracle = Oracle(grid)
    oracle.embed("step0", "t0")
    with pytest.raises(ValueError, match="step0 · t1 · layer 1 before it was embedded"):
        oracle.score("step0", "t1", 1)
    assert oracle.evaluations == 0 and oracle.cpu_s == 0.0


def test_a_replayed_search_asks_each_unit_once_and_pays_what_it_asked() -> None:
    grid = smooth_grid(steps=[0, 4, 64, 600, 1500, 3500], blocks=4, tasks=3, seed=3)
    asked: list = []
    trace = replay(grid, SearchSpec(seed=1, batch=3), cpu_cap=grid.cost()[0] * 0.4, on_batch=lambda s: None)
    # Re-run with an oracle we can inspect: the same search (seeded) asks the same things.
    from layertime.search.search import Search

    search, oracle = Search(grid.space, SearchSpec(seed=1, batch=3)), Oracle(grid)
    while oracle.cpu_s < grid.cost()[0] * 0.4 and not search.should_stop().stop:
        for action in search.propose():
            asked.append(action)
            if isinstance(action, Embed):
                search.observe_embedding(*action, oracle.embed(*action))
            else:
                search.observe(*action, *oracle.score(*action))
    assert len(set(asked)) == len(asked)  # nothing asked twice
    scores = [a for a in asked if isinstance(a, Score)]
    assert oracle.evaluations == len(scores) == search.evaluations
    expected_cpu = sum(grid.score_cpu_s[grid.space.checkpoints.index(c), int(t[1:]), b] for c, t, b in scores)
    assert oracle.cpu_s == pytest.approx(expected_cpu) == pytest.approx(search.spent_cpu_s)
    assert trace[-1].evaluations == oracle.evaluations and trace[-1].cpu_s == pytest.approx(oracle.cpu_s)


def test_grid_values_are_the_task_mean_in_points() -> None:
    scores = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2) / 100  # (checkpoints, tasks, blocks)
    grid = grid_from_arrays("g", [5, 0], scores)  # steps out of order: the grid sorts checkpoints by step
    assert grid.space.checkpoints == ("step0", "step5")
    # step0 was row 1: arm (step0, block 0) = mean over tasks of scores[1, :, 0] = (6 + 8 + 10) / 3
    assert grid.values[0] == pytest.approx(8.0) and grid.best == pytest.approx(grid.values.max())


def _write_tables(root: Path, missing: bool = False) -> None:
    """A finished run's tables: 2 commits (main shares step20's), 2 layers, 2 tasks, AmazonCounterfactual-
    like subsets for one task, metrics and embedding costs."""
    rows, metric_rows, cost_rows = [], [], []
    for revision, commit, step in (("step10", "c10", 10), ("step20", "c20", 20), ("main", "c20", 20)):
        for layer in (0, 1):
            for task, subsets in (("DemoSTS", ["default"]), ("DemoClassification", ["en", "en-ext"])):
                if missing and (revision, layer, task) == ("step10", 1, "DemoSTS"):
                    continue
                for k, subset in enumerate(subsets):
                    rows.append({
                        "model": "m", "revision": revision, "commit": commit, "step": step, "layer": layer,
                        "hidden_state": layer + 1, "depth": (layer + 1) / 2, "task": task, "subset": subset,
                        "split": "test", "main_score": 0.1 * step / 10 + 0.01 * layer + 0.001 * k, "seconds": 1.5,
                    })  # fmt: skip
            for metric, norm in (("dime", "raw"), ("dime", "max_entropy"), ("curvature", "raw")):
                metric_rows.append({
                    "model": "m", "revision": revision, "commit": commit, "step": step, "layer": layer,
                    "metric": metric, "normalization": norm, "value": step + layer + (norm == "raw"),
                })  # fmt: skip
        if revision != "main":
            for task in ("DemoSTS", "DemoClassification"):
                cost_rows.append({"model": "m", "revision": revision, "commit": commit, "phase": "embed",
                                  "task": task, "seconds": 3.0 if task == "DemoSTS" else 4.0})  # fmt: skip
    directory = root / "tables"
    tables.write_table(tables.scores_frame(rows), directory, "scores")
    tables.write_table(tables.metrics_frame(metric_rows), directory, "metrics")
    tables.write_table(tables.costs_frame(cost_rows), directory, "costs")


def test_grid_from_a_run_root(tmp_path: Path) -> None:
    _write_tables(tmp_path)
    grid = grid_from_run(tmp_path)
    space = grid.space
    assert space.checkpoints == ("step10", "step20")  # main = step20's commit: one checkpoint
    assert (
        space.tasks == ("DemoClassification", "DemoSTS") and space.blocks == (0, 1) and space.num_blocks == 2
    )
    # DemoClassification of step20, layer 1: the mean of its two subsets (rule a).
    assert grid.scores[1, 0, 1] == pytest.approx(0.2 + 0.01 + 0.0005)
    assert grid.score_cpu_s[1, 0, 1] == pytest.approx(3.0)  # two subset rows of 1.5 s
    assert grid.embed_gpu_s.tolist() == [[4.0, 3.0], [4.0, 3.0]]
    assert space.metric_names == ("curvature", "dime")
    assert space.metric_values[space.index("step20", 1)].tolist() == [22.0, 22.0]  # dime: the raw one
    values = pl.read_parquet(tmp_path / "tables" / "scores.parquet")
    assert grid.best == pytest.approx(100 * values.filter(pl.col("commit") == "c20", pl.col("layer") == 1)
                                      .group_by("task").agg(pl.col("main_score").mean())["main_score"].mean())  # fmt: skip


def test_a_grid_with_a_missing_cell_is_refused_naming_it(tmp_path: Path) -> None:
    _write_tables(tmp_path, missing=True)
    with pytest.raises(ValueError, match=r"1 cells missing, e\.g\. step10 · DemoSTS · layer 1"):
        grid_from_run(tmp_path)
