import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from layertime import costs, io, tables
from layertime.hub import cache, fake
from layertime.report import figures


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
    tasks = ["AmazonCounterfactualClassification", "STS17", "SciDocsRR"]
    layers = tables.layers_frame(tables.scores_frame(ROWS), tasks)
    row = layers.row(0, named=True)
    assert row["n_tasks"] == 3
    assert row["average"] == pytest.approx((0.65 + 0.80 + 0.50) / 3)
    assert row["avg_Classification"] == pytest.approx(0.65)
    assert row["avg_STS"] == pytest.approx(0.80)


def test_incomplete_layers_have_no_average():
    tasks = ["AmazonCounterfactualClassification", "STS17", "SciDocsRR"]
    layers = tables.layers_frame(tables.scores_frame(ROWS[:3]), tasks)
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


# --- every writer is atomic: temp file + rename, through layertime.io --------------------------------
#
# What tells an atomic write from a plain one, checked on each writer of the package:
# - rename, not rewrite in place: a reader that opened the old file still reads all of it afterwards
#   (a plain write truncates the very file the reader holds);
# - a write that fails half-way (here: the file-size limit, a real EFBIG from the kernel) leaves the old
#   file whole and no temp behind (a plain write leaves the first half of the new one);
# - temps that dead writers left beside the target are removed by the next write (io's naming scheme).


def _scores(n: int) -> pl.DataFrame:
    """A scores table of n rows of distinct scores (random: parquet cannot compress them away)."""
    scores = np.random.default_rng(n).random(n)
    return tables.scores_frame(
        [{**ROWS[0], "layer": i % 24, "main_score": float(s)} for i, s in enumerate(scores)]
    )


def _cost_rows(n: int) -> list:
    return [costs.TaskCost(f"Task{i}", "STS", 2.0, 1.0, 10, 20, 50.0, 1024, 1.0, "m", "2.26.24", "d")
            for i in range(n)]  # fmt: skip


def _seconds(n: int) -> pl.DataFrame:
    return pl.DataFrame({"task": [f"Task{i}" for i in range(n)], "task_type": ["STS"] * n,
                         "seconds": [float(i + 1) for i in range(n)]})  # fmt: skip


# name -> (the file it writes in a directory, write it small (False) or big (True))
WRITERS: dict[str, tuple[Callable[[Path], Path], Callable[[Path, bool], object]]] = {
    "tables.write_table": (
        lambda d: d / "scores.parquet",
        lambda d, big: tables.write_table(_scores(20_000 if big else 5), d, "scores"),
    ),
    "costs.write_table": (
        lambda d: d / "task_costs.csv",
        lambda d, big: costs.write_table(_cost_rows(2_000 if big else 3), d / "task_costs.csv"),
    ),
    "figures": (
        lambda d: d / "cost.png",
        lambda d, big: figures.cost(_seconds(60 if big else 2), d / "cost.png"),
    ),
}
# Writers whose files are small and fixed-size (a ref: 40 hex characters): the size limit cannot cut them.
SMALL_WRITERS = {
    "fake hub ref": (
        lambda d: cache.ref_file("org/model", "main", d),
        lambda d, big: fake.write_snapshot(d, "org/model", {"config.json": b"{}"}, ["main"],
                                               commit=fake.fake_commit("org/model", str(big))),
    ),
}  # fmt: skip


@pytest.mark.parametrize("writer", sorted(WRITERS | SMALL_WRITERS))
def test_a_reader_holding_the_old_file_reads_it_whole_after_a_rewrite(writer, tmp_path):
    target, write = (WRITERS | SMALL_WRITERS)[writer]
    write(tmp_path, False)
    old = target(tmp_path).read_bytes()
    with open(target(tmp_path), "rb") as reader:
        write(tmp_path, True)
        assert reader.read() == old  # the reader's file was replaced, not rewritten under it
    assert target(tmp_path).read_bytes() != old


CHILD = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_tables
target, write = test_tables.WRITERS[{writer!r}]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
write(Path({directory!r}), True)
"""


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_that_fails_half_way_leaves_the_old_file_whole_and_no_temp(writer, tmp_path):
    target, write = WRITERS[writer]
    write(tmp_path, False)
    old = target(tmp_path).read_bytes()
    limit = len(old) + 1024  # the new file, much bigger, fails past this offset
    code = CHILD.format(tests=str(Path(__file__).parent), writer=writer, limit=limit, directory=str(tmp_path))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "File too large" in out.stderr, out.stderr[-2000:]
    assert target(tmp_path).read_bytes() == old
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: a pid that no longer runs
    return dead.pid


@pytest.mark.parametrize("writer", sorted(WRITERS | SMALL_WRITERS))
def test_a_write_removes_the_temps_dead_writers_left_beside_its_file(writer, tmp_path):
    target, write = (WRITERS | SMALL_WRITERS)[writer]
    left = target(tmp_path).with_name(f".{target(tmp_path).name}.{io._HOST}.{_dead_pid()}.abc123.tmp")
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"half a file")
    write(tmp_path, False)
    assert target(tmp_path).is_file() and not left.exists()


def test_a_fabricated_hub_cache_is_readable_by_the_other_users_of_a_shared_cache(tmp_path):
    old = os.umask(0o022)
    try:
        fake.write_snapshot(tmp_path, "org/model", {"config.json": b"{}"}, ["main"])
    finally:
        os.umask(old)
    for path in cache.repo_dir("org/model", tmp_path).rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_mode & 0o044 == 0o044, path  # the umask's permissions, not a private 0600


def test_a_report_write_removes_the_temp_directories_dead_writers_left(tmp_path):
    from layertime.report import write_report

    root = tmp_path / "run"
    tables.write_table(tables.scores_frame(ROWS), root / "tables", "scores")
    left = root / f".report.{io._HOST}.{_dead_pid()}.abc123.tmp"
    (left / "figures").mkdir(parents=True)
    paths = write_report(root)
    assert paths.html.is_file() and not left.exists()
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
