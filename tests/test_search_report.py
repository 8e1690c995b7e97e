"""What a layer search shows (layertime.search.report) and how a record becomes an observation
(layertime.search.records.task_score), on a space built in code; the flow that publishes them:
tests/test_layer_search_flow.py."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from layertime.search import Search, SearchSpace, Stop, report
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


# ------------------------------------------------------------------ the search's tables and the report


def _run_root(root: Path, search: Search | None) -> Path:
    """A run root with the grid's scores of what `_search` observed (2 tasks, step100's blocks) and,
    with `search`, the search's tables as the flow writes them."""
    from layertime import tables

    rows = [
        {"model": "m", "revision": "step100", "commit": "c", "step": 100, "layer": b, "hidden_state": b + 1,
         "depth": (b + 1) / 2, "task": t, "task_type": "STS", "subset": "default", "split": "test",
         "main_score": s, "seconds": 1.0}
        for b, scores in {0: (0.40, 0.60), 1: (0.70, 0.50)}.items()
        for t, s in zip(["A", "B"], scores, strict=True)
    ]  # fmt: skip
    tables.write_table(tables.scores_frame(rows), root / "tables", "scores")
    if search is not None:
        report.write_tables(
            search, Stop(True, "P(best within 0.5 points) = 0.970 > 0.95", 0.97), root / "tables"
        )
    return root


def test_the_search_tables_hold_every_arm_in_training_order_and_the_chosen_arm():
    import tempfile

    search = _search()
    with tempfile.TemporaryDirectory() as tmp:
        paths = report.write_tables(search, Stop(True, "budget spent", 0.5), Path(tmp))
        arms = pl.read_parquet(paths["search_arms"])
        assert pl.read_csv(paths["search_arms_csv"]).height == 4
        found = json.loads(paths["search"].read_text())
    assert arms.select("checkpoint", "layer").rows() == [
        ("step0", 0),
        ("step0", 1),
        ("step100", 0),
        ("step100", 1),
    ]
    assert arms["checkpoint_order"].to_list() == [0, 0, 1, 1]
    assert arms["evaluated"].to_list() == [False, False, True, True] and arms["n_tasks"].to_list() == [
        0,
        1,
        2,
        2,
    ]
    assert arms.filter(pl.col("evaluated"))["mean"].to_list() == pytest.approx([50.0, 60.0])
    choice = search.chosen()
    assert found["chosen"] == {
        "checkpoint": "step100", "step": 100, "layer": 1, "value": pytest.approx(60.0),
        "best_upper": pytest.approx(choice.best_upper), "probability": pytest.approx(choice.probability),
    }  # fmt: skip
    assert found["stop"] == "budget spent" and found["spent"]["evaluations"] == 5
    assert found["spent"]["grid_evaluations"] == 8 and found["tasks"] == ["A", "B"]


def test_the_report_of_a_run_with_a_search_has_its_section_heatmap_and_path(tmp_path):
    from PIL import Image

    from layertime.report import write_report

    search = _search()
    paths = write_report(_run_root(tmp_path / "run", search))
    upper = search.chosen().best_upper
    assert "## Layer search" in paths.markdown
    assert "**Chosen: step100, layer 1** (block index; step 100)" in paths.markdown
    assert (
        f"[60.00, {upper:.2f}]" in paths.markdown
        and "Stopped: P(best within 0.5 points) = 0.970 > 0.95." in paths.markdown
    )
    assert "| evaluations | 5 | 8 | 62.5% |" in paths.markdown
    page = paths.html.read_text()
    assert '<h2 id="search">Layer search</h2>' in page and "<b>Chosen: step100, layer 1</b>" in page
    for name in ("search_heatmap", "search_path"):
        assert f'src="{name}.png"' in page
        with Image.open(paths.figures[name]) as image:
            assert image.format == "PNG" and image.width > 100
    assert (tmp_path / "run" / "report" / "search_heatmap.png").is_file()


def test_a_run_without_a_search_has_no_search_section(tmp_path):
    from layertime.report import write_report

    paths = write_report(_run_root(tmp_path / "run", None))
    assert "Layer search" not in paths.markdown and "Layer search" not in paths.html.read_text()
    assert not {"search_heatmap", "search_path"} & set(paths.figures)
    assert not list((tmp_path / "run" / "report").glob("search_*"))


def test_a_search_that_evaluated_no_arm_yet_reports_no_choice_and_an_unpredicted_heatmap(tmp_path):
    from layertime.report import write_report

    root = _run_root(tmp_path / "run", None)
    report.write_tables(Search(SPACE), None, root / "tables")
    paths = write_report(root)
    assert "## Layer search" in paths.markdown and "no choice" in paths.markdown
    assert "search_heatmap" in paths.figures and "search_path" not in paths.figures  # nothing predicted
