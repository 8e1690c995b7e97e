"""What a layer search shows (layertime.search.report) and how a record becomes an observation
(layertime.search.records.task_score), on a space built in code; the flow that publishes them:
tests/test_layer_search_flow.py."""

from __future__ import annotations

import pytest

from layertime.search import Search, SearchSpace, report
from layertime.search.records import task_score
from layertime.spec import SearchSpec

# 2 checkpoints x 2 blocks = 4 arms, 2 tasks: scoring one layer costs 30 and 90 CPU-s, embedding 60 GPU-s.
SPACE = SearchSpace.build([("step0", 0), ("step100", 100)], [0, 1], 2, ["A", "B"], {"A": 30.0, "B": 90.0},
                          {"A": 60.0, "B": 60.0})  # fmt: skip


def _search(settings: SearchSpec | None = None) -> Search:
    search = Search(SPACE, settings)
    search.observe_embedding("step100", "A", 60.0)
    search.observe_embedding("step100", "B", 60.0)
    for block, (a, b) in {0: (0.40, 0.60), 1: (0.70, 0.50)}.items():
        search.observe("step100", "A", block, a, 30.0)
        search.observe("step100", "B", block, b, 90.0)
    search.observe("step0", "A", 1, 0.10, 30.0)  # an arm with one task of two
    return search


def test_task_score_is_the_mean_of_the_subsets_main_scores_and_the_sum_of_their_seconds():
    rows = [{"main_score": 0.5, "seconds": 1.5}, {"main_score": 0.7, "seconds": 2.0}, {"main_score": 0.9}]
    assert task_score(rows) == (pytest.approx(0.7), pytest.approx(3.5))
    with pytest.raises(ValueError, match="without rows"):
        task_score([])


def test_cost_rows_count_the_evaluations_and_hours_against_the_full_grid():
    rows = {r["what"]: r for r in report.cost_rows(_search())}
    assert rows["evaluations"]["search"] == 5 and rows["evaluations"]["full_grid"] == 4 * 2
    # Spent: 3 x 30 + 2 x 90 = 270 CPU-s of the grid's 4 x (30 + 90) = 480; 120 of 2 x 120 GPU-s.
    assert rows["cpu_h"]["search"] == pytest.approx(270 / 3600, abs=1e-6)
    assert rows["cpu_h"]["share"] == pytest.approx(270 / 480, abs=1e-5)
    assert rows["gpu_h"]["share"] == pytest.approx(0.5, abs=1e-5)


def test_the_choice_is_the_best_evaluated_arm_with_its_interval_and_the_arm_table_marks_evaluated_arms():
    search = _search()
    markdown = report.choice_markdown(search)
    # Block 1 of step100 averages (70 + 50) / 2 = 60 points; block 0 (40 + 60) / 2 = 50.
    assert "Chosen: step100, layer 1" in markdown and "**60.00**" in markdown
    rows = {(r["checkpoint"], r["layer"]): r for r in report.arm_rows(search)}
    assert [k for k, r in rows.items() if r["evaluated"]] == [("step100", 0), ("step100", 1)]
    assert rows["step100", 1]["mean"] == pytest.approx(60.0) and rows["step100", 1]["sd"] == 0.0
    assert rows["step0", 1]["n_tasks"] == 1 and rows["step0", 0]["n_tasks"] == 0


def test_progress_is_the_share_of_the_tightest_budget_and_names_the_best_so_far():
    percent, line = report.progress(_search(SearchSpec(budget_cpu_h=0.5, budget_gpu_h=0.05)))
    assert percent == pytest.approx(100 * (120 / 3600) / 0.05)  # GPU: 120 s of 180 s, beyond CPU's 270/1800
    assert line.startswith("5/8 evaluations") and "best so far step100 layer 1: 60.00" in line
    percent, _ = report.progress(_search())  # no budget: the share of the grid's scoring CPU
    assert percent == pytest.approx(100 * 270 / 480)
    empty, line = report.progress(Search(SPACE))
    assert empty == 0 and "no arm evaluated yet" in line


def test_the_heatmap_marks_evaluated_arms_and_the_chosen_one_and_the_path_follows_the_predicted_best():
    search = _search()
    heatmap = report.heatmap_markdown(search)
    assert "| step100 | 50.0* | **60.0*** |" in heatmap
    means = {(r["checkpoint"], r["layer"]): r["mean"] for r in report.arm_rows(search)}
    path = report.path_rows(search)
    assert [r["checkpoint"] for r in path] == ["step0", "step100"]  # training order
    for row in path:  # the layer with the highest predicted mean of its checkpoint
        assert row["mean"] == max(m for (c, _), m in means.items() if c == row["checkpoint"])
    assert path[1]["layer"] == 1 and path[1]["evaluated"]
    assert report.path_rows(Search(SPACE)) == [] and "?" in report.heatmap_markdown(Search(SPACE))
