"""The run's tables, built with polars from the completion records (docs/design.md §7).

- `scores`: one row per (checkpoint revision, layer, task, split, subset), mteb's main score (0-1).
- `layers`: one row per (checkpoint revision, layer): the rule-a average over tasks (a task's score
  is the mean of its subsets' main scores: AmazonCounterfactual = mean(en, en-ext), STS17 = en-en),
  the per-type averages and how many tasks it covers. `rule_a_average` is the one place these
  averages are computed (the report's arms use it too).
- `summary.csv`: the old scripts' columns, for people migrating.
Rows carry `layer` (0-based block index), `hidden_state` (= layer + 1) and `depth` ((layer + 1) / L).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from layertime import suite
from layertime.io import atomic_write

SCORE_SCHEMA = {
    "model": pl.String, "revision": pl.String, "commit": pl.String, "step": pl.Int64, "layer": pl.Int64,
    "hidden_state": pl.Int64, "depth": pl.Float64, "task": pl.String, "task_type": pl.String,
    "subset": pl.String, "split": pl.String, "main_score": pl.Float64, "mteb_version": pl.String,
    "dataset_revision": pl.String, "seconds": pl.Float64, "peak_memory_gb": pl.Float64,
}  # fmt: skip


def _frame(rows: Sequence[dict], schema: dict, order: list[str]) -> pl.DataFrame:
    """A typed long table from row dicts (missing keys -> null, extra keys dropped), sorted."""
    frame = pl.DataFrame([{c: r.get(c) for c in schema} for r in rows], schema=schema)
    return frame.sort(order, nulls_last=True)


def scores_frame(rows: Sequence[dict]) -> pl.DataFrame:
    """The long `scores` table from score rows (dicts with SCORE_SCHEMA's keys)."""
    return _frame(rows, SCORE_SCHEMA, ["step", "revision", "layer", "task", "split", "subset"])


def task_scores(scores: pl.DataFrame) -> pl.DataFrame:
    """One score per (revision, layer, task): the mean of that task's subsets (rule a)."""
    keys = ["model", "revision", "commit", "step", "layer", "hidden_state", "depth", "task", "task_type"]
    return scores.group_by(keys, maintain_order=True).agg(pl.col("main_score").mean().alias("score"))


def layers_frame(scores: pl.DataFrame, tasks: Sequence[str]) -> pl.DataFrame:
    """Per (revision, layer): `n_tasks`, the rule-a `average` and `avg_<Type>` over the spec's `tasks`."""
    keys = ["model", "revision", "commit", "step", "layer", "hidden_state", "depth"]
    layers = rule_a_average(task_scores(scores), tasks, keys)
    return layers.sort(["step", "revision", "layer"], nulls_last=True)


def rule_a_average(per_task: pl.DataFrame, tasks: Sequence[str], keys: Sequence[str]) -> pl.DataFrame:
    """Per group of `keys` of one-score-per-task rows (`task`, `score`), the columns after `keys`:

    - `n_tasks`: how many of `tasks` have a score;
    - `average`: the unweighted mean over `tasks` (rule a), null unless every one has a score;
    - `avg_<Type>` per task type of `tasks` (types in alphabetical order): the mean over that type's
      tasks, null unless every one has a score. A mean over the tasks present would compare different
      task sets across layers and checkpoints without saying so; `n_tasks` tells how far an arm is.
    """
    types = task_types(tasks)
    by_type = {kind: [t for t in tasks if types[t] == kind] for kind in sorted(set(types.values()))}
    rows = per_task.filter(pl.col("task").is_in(list(tasks)))
    return rows.group_by(list(keys), maintain_order=True).agg(
        pl.len().alias("n_tasks"),
        _complete_mean("average", list(tasks)),
        *[_complete_mean(f"avg_{kind}", names) for kind, names in by_type.items()],
    )


def _complete_mean(name: str, tasks: list[str]) -> pl.Expr:
    """The mean score over `tasks`, null unless each of them is in the group (once, as task_scores gives)."""
    of = pl.col("task").is_in(tasks)
    return pl.when(of.sum() == len(tasks)).then(pl.col("score").filter(of).mean()).alias(name)


def task_types(tasks: Sequence[str]) -> dict[str, str]:
    """Each task's MTEB type from the suites (what the pipeline writes in `task_type`)."""
    return {t: task_type(t) for t in tasks}


def task_type(task: str) -> str:
    """`suite.task_type`, or 'Other' for a task outside the suites (hand-made tables, old runs)."""
    try:
        return suite.task_type(task)
    except KeyError:
        return "Other"


METRIC_SCHEMA = {
    "model": pl.String, "revision": pl.String, "commit": pl.String, "step": pl.Int64, "layer": pl.Int64,
    "hidden_state": pl.Int64, "depth": pl.Float64, "corpus": pl.String, "metric": pl.String,
    "normalization": pl.String, "value": pl.Float64, "n_prompts": pl.Int64, "n_skipped": pl.Int64,
}  # fmt: skip


def metrics_frame(rows: Sequence[dict]) -> pl.DataFrame:
    """The long `metrics` table: one row per (revision, layer, corpus, metric, normalization)."""
    return _frame(rows, METRIC_SCHEMA, ["step", "revision", "layer", "metric", "normalization"])


COST_SCHEMA = {
    "model": pl.String, "revision": pl.String, "commit": pl.String, "phase": pl.String, "task": pl.String,
    "device": pl.String, "seconds": pl.Float64, "texts": pl.Int64, "unique_texts": pl.Int64,
    "real_tokens": pl.Int64, "padded_tokens": pl.Int64, "batches": pl.Int64, "truncated": pl.Int64,
    "peak_memory_gb": pl.Float64, "peak_gpu_memory_gb": pl.Float64,
}  # fmt: skip


def costs_frame(rows: Sequence[dict]) -> pl.DataFrame:
    """The `costs` table: one row per GPU unit (embed per checkpoint and task, measure per checkpoint),
    with its seconds, peak memory (host; GPU on CUDA), texts and tokens; each commit once (under the
    first revision naming it). Scoring's cost is in `scores` (`seconds`, `peak_memory_gb` per row)."""
    return _frame(rows, COST_SCHEMA, ["revision", "phase", "task"])


def with_metrics(layers: pl.DataFrame, metrics: pl.DataFrame) -> pl.DataFrame:
    """`layers` with one column per metric beside the scores: `<metric>` for raw values,
    `<metric>_<normalization>` otherwise (e.g. `prompt_entropy_max_entropy`, `infonce_mi_lower_bound`)."""
    if metrics.height == 0:
        return layers
    named = metrics.with_columns(
        pl.when(pl.col("normalization") == "raw")
        .then(pl.col("metric"))
        .otherwise(pl.col("metric") + "_" + pl.col("normalization"))
        .alias("column")
    )
    wide = named.pivot(on="column", index=["revision", "layer"], values="value")
    return layers.join(wide, on=["revision", "layer"], how="full", coalesce=True).sort(
        ["step", "revision", "layer"], nulls_last=True
    )


def summary_frame(scores: pl.DataFrame, output_dir: str) -> pl.DataFrame:
    """The old scripts' `summary.csv`: model_family, model_size, revision, layer, task, score, output_dir."""
    family, size = split_model_name(scores["model"][0]) if scores.height else ("", "")
    return task_scores(scores).select(
        pl.lit(family).alias("model_family"),
        pl.lit(size).alias("model_size"),
        "revision",
        "layer",
        "task",
        "score",
        pl.lit(output_dir).alias("output_dir"),
    )


def split_model_name(model: str) -> tuple[str, str]:
    """('pythia', '410m') from 'EleutherAI/pythia-410m'; (name, '') when there is no size suffix."""
    name = model.rstrip("/").split("/")[-1]
    m = re.fullmatch(r"(.+?)-(\d+(?:\.\d+)?[kKmMbB])(?:-.*)?", name)
    return (m.group(1), m.group(2)) if m else (name, "")


def write_table(frame: pl.DataFrame, directory: Path, name: str, csv: bool = True) -> list[Path]:
    """Write `name`.parquet (and `name`.csv) atomically."""
    paths = [atomic_write(directory / f"{name}.parquet", lambda tmp: frame.write_parquet(tmp))]
    if csv:
        paths.append(atomic_write(directory / f"{name}.csv", lambda tmp: frame.write_csv(tmp)))
    return paths
