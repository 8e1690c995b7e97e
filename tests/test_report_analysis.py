"""One rule-a average (issue 16): `layers.parquet` and the report's arms give the same `average` and
`avg_<Type>` for the same scores — each null unless every task it averages is in — and, where complete,
the value an independent float64 computation gives."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from layertime import report, tables

# Two STS tasks and one Reranking task; STS12 has two subsets (rule a: a task's score is their mean).
TASKS = ["STS12", "STS13", "SciDocsRR"]
TYPES = {"STS12": "STS", "STS13": "STS", "SciDocsRR": "Reranking"}
SUBSETS = {"STS12": ["a", "b"], "STS13": ["default"], "SciDocsRR": ["default"]}
MISSING = {(1, "STS13"), (2, "SciDocsRR")}  # (layer, task) not scored yet


def _scores(rng: np.random.Generator) -> tuple[pl.DataFrame, dict[tuple[int, str], list[float]]]:
    raw: dict[tuple[int, str], list[float]] = {}
    rows = []
    for layer in (0, 1, 2):
        for task in TASKS:
            if (layer, task) in MISSING:
                continue
            for subset in SUBSETS[task]:
                score = float(rng.random())
                raw.setdefault((layer, task), []).append(score)
                rows.append({"model": "m/x", "revision": "main", "commit": "c" * 40, "step": None,
                             "layer": layer, "hidden_state": layer + 1, "depth": (layer + 1) / 3,
                             "task": task, "task_type": TYPES[task], "subset": subset,
                             "split": "test", "main_score": score, "mteb_version": "2", "dataset_revision": "r",
                             "seconds": 1.0})  # fmt: skip
    return tables.scores_frame(rows), raw


def _expected(raw: dict[tuple[int, str], list[float]], layer: int, tasks: list[str]) -> float | None:
    """The mean over `tasks` of each task's mean over its subsets, in float64; None if one is missing."""
    if any((layer, t) not in raw for t in tasks):
        return None
    return float(np.mean([np.mean(np.asarray(raw[(layer, t)], dtype=np.float64)) for t in tasks]))


def _by_layer(frame: pl.DataFrame) -> dict[int, dict]:
    return {r["layer"]: r for r in frame.iter_rows(named=True)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layers_table_and_report_share_one_rule_a_average(seed):
    scores, raw = _scores(np.random.default_rng(seed))
    layers = _by_layer(tables.layers_frame(scores, TASKS))
    index = report.checkpoint_index(scores.select("revision", "commit", "step"))
    arms = _by_layer(report.arm_table(report.task_table(scores), tables.metrics_frame([]), TASKS, index))
    columns = {"average": TASKS, "avg_STS": ["STS12", "STS13"], "avg_Reranking": ["SciDocsRR"]}
    for layer in (0, 1, 2):
        assert layers[layer]["n_tasks"] == arms[layer]["n_tasks"] == sum((layer, t) in raw for t in TASKS)
        for column, tasks in columns.items():
            want = _expected(raw, layer, tasks)
            got_table, got_report = layers[layer][column], arms[layer][column]
            assert (got_table is None) == (got_report is None) == (want is None), (layer, column)
            if want is not None:
                assert got_table == pytest.approx(want, rel=1e-12, abs=0), (layer, column)
                assert got_report == pytest.approx(want, rel=1e-12, abs=0), (layer, column)


def test_a_type_incomplete_at_a_layer_has_no_average_there():
    scores, raw = _scores(np.random.default_rng(7))
    layers = _by_layer(tables.layers_frame(scores, TASKS))
    # layer 1 lacks STS13: its STS average would be STS12 alone, a different task set than layer 0's
    assert layers[1]["avg_STS"] is None and layers[0]["avg_STS"] is not None
    # layer 2 lacks the only Reranking task: the column is there, null
    assert layers[2]["avg_Reranking"] is None and layers[2]["avg_STS"] is not None
    assert layers[1]["average"] is None and layers[2]["average"] is None


def test_tasks_outside_the_spec_do_not_enter_the_average():
    scores, _ = _scores(np.random.default_rng(3))
    layers = _by_layer(tables.layers_frame(scores, ["STS12"]))
    assert layers[0]["n_tasks"] == 1
    assert layers[0]["average"] == pytest.approx(layers[0]["avg_STS"]) and "avg_Reranking" not in layers[0]


def _imported(module: str) -> set[str]:
    """Modules a file of layertime/report imports (functions included)."""
    path = Path(report.__file__).parent / f"{module}.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_analysis_is_apart_from_rendering():
    rendering = {"layertime.report.markdown", "layertime.report.html", "layertime.report.write"}
    assert not _imported("figures") & rendering, "figures draw an Analysis: they import the analysis only"
    analysis = _imported("analysis")
    assert not {m for m in analysis if m.startswith(("layertime.report", "matplotlib"))}, analysis
    assert not {m for m in analysis if m.split(".")[0] in ("os", "json", "shutil")}, (
        "no files in the analysis"
    )
