import polars as pl
import pytest

from layertime import tables


def _row(task, task_type, subset, score, layer=1, revision="main"):
    return {
        "model": "EleutherAI/pythia-410m", "revision": revision, "commit": "c" * 40, "step": None,
        "layer": layer, "hidden_state": layer + 1, "depth": (layer + 1) / 24, "task": task,
        "task_type": task_type, "subset": subset, "split": "test", "main_score": score,
        "mteb_version": "2.26.24", "dataset_revision": "r", "seconds": 1.0,
    }  # fmt: skip


ROWS = [
    _row("AmazonCounterfactualClassification", "Classification", "en", 0.60),
    _row("AmazonCounterfactualClassification", "Classification", "en-ext", 0.70),
    _row("STS17", "STS", "en-en", 0.80),
    _row("SciDocsRR", "Reranking", "default", 0.50),
]


def test_rule_a_averages_subsets_within_a_task_then_tasks():
    layers = tables.layers_frame(tables.scores_frame(ROWS), n_tasks=3)
    row = layers.row(0, named=True)
    assert row["n_tasks"] == 3
    assert row["average"] == pytest.approx((0.65 + 0.80 + 0.50) / 3)
    assert row["avg_Classification"] == pytest.approx(0.65)
    assert row["avg_STS"] == pytest.approx(0.80)


def test_incomplete_layers_have_no_average():
    layers = tables.layers_frame(tables.scores_frame(ROWS[:3]), n_tasks=3)
    assert layers["n_tasks"][0] == 2 and layers["average"][0] is None


def test_summary_has_the_old_scripts_columns():
    summary = tables.summary_frame(tables.scores_frame(ROWS), "runs/x")
    assert summary.columns == [
        "model_family",
        "model_size",
        "revision",
        "layer",
        "task",
        "score",
        "output_dir",
    ]
    assert summary.filter(pl.col("task") == "STS17")["score"][0] == pytest.approx(0.80)
    assert summary["model_family"][0] == "pythia" and summary["model_size"][0] == "410m"


@pytest.mark.parametrize(
    ("model", "expected"),
    [("EleutherAI/pythia-410m", ("pythia", "410m")), ("EleutherAI/pythia-1.4b-deduped", ("pythia", "1.4b")),
     ("layertime/tiny-neox", ("tiny-neox", ""))],
)  # fmt: skip
def test_model_family_and_size(model, expected):
    assert tables.split_model_name(model) == expected


def test_tables_are_written_atomically_as_parquet_and_csv(tmp_path):
    frame = tables.scores_frame(ROWS)
    paths = tables.write_table(frame, tmp_path, "scores")
    assert [p.name for p in paths] == ["scores.parquet", "scores.csv"]
    assert pl.read_parquet(paths[0]).equals(frame)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
