"""The report's numbers (issue 7): pure functions on polars frames, callable from a notebook or a test.

No files and no drawing here: `load.py` reads a run into `RunData`, `analyze` turns it into an
`Analysis`, and `figures.py`, `markdown.py` and `html.py` render that (`write.py` writes them).
- `task_table` / `arm_table`: one score per (revision, layer, task); one row per arm (checkpoint, layer)
  with the rule-a `average` and `avg_<Type>` of `tables.rule_a_average` (each null unless every task it
  averages is in), `n_tasks` and metric columns;
- `correlations` / `correlation_table`: Spearman and Kendall (scipy.stats) of metrics against scores;
- `layer_choice`: per checkpoint, the layer a metric ranks best, its score, regret and hit rate, beside
  always-the-last-layer and a uniformly random layer (its expected value, not a draw);
- `coverage`: which evaluations of the spec's grid are present; `scoring_seconds`: where CPU time went;
- `profile_frame`, `reference_comparison`, `key_numbers`, ...: the views the figures and pages share.

Layers are 0-based block indices b (`hidden_state` = b + 1 = the paper's layer index). Scores are
stored in 0-1 and shown ×100, as the paper does. Revisions sharing a commit (`main` = `step3000`) are
one checkpoint in cross-checkpoint analyses, so no arm is counted twice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from layertime import tables

# The paper's results for Pythia-410m `main` (rule a), by its layer index = our hidden_state (docs/design.md §4).
PAPER_MODEL = "EleutherAI/pythia-410m"
PAPER_REVISIONS = ("main", "step143000")
PAPER_REFERENCE = {15: 0.5086, 17: 0.5192, 20: 0.5097, 23: 0.4923, 24: 0.4682}

ARM_KEYS = ["checkpoint", "label", "step", "layer", "hidden_state", "depth"]
CHOICE_SCHEMA = {
    "strategy": pl.String, "kind": pl.String, "checkpoint": pl.String, "label": pl.String,
    "step": pl.Int64, "chosen_layer": pl.Int64, "chosen_score": pl.Float64, "best_layer": pl.Int64,
    "best_score": pl.Float64, "regret": pl.Float64, "hit": pl.Float64,
}  # fmt: skip


# ------------------------------------------------------------------------------------------- the run


@dataclass
class RunData:
    """A run's tables and snapshot, as `load.load_run` read them (any part may be missing)."""

    root: Path
    scores: pl.DataFrame
    metrics: pl.DataFrame
    spec: Any | None  # ExperimentSpec, None when spec.yaml is missing or unreadable
    environment: dict
    notes: list[str] = field(default_factory=list)
    costs: pl.DataFrame | None = None  # tables/costs, None when the run's tables have none
    texts: pl.DataFrame = field(default_factory=pl.DataFrame)  # per task: texts requested, unique
    csv_tables: list[Path] = field(default_factory=list)  # tables/*.csv, for the page's links
    search: dict | None = None  # tables/search.json of a layer search (layertime.search.report.summary)
    search_arms: pl.DataFrame | None = None  # tables/search_arms: every arm's posterior, training order


@dataclass(frozen=True)
class Grid:
    """The evaluations a run's spec asks for: revisions × layers × tasks."""

    model: str
    revisions: list[str]
    layers: list[int]
    tasks: list[str]
    metric_layers: list[int]  # layers measured per checkpoint (empty: no metrics)


def expected_grid(run: RunData) -> Grid:
    """The spec's grid; layers like `all` resolve with the block count the tables imply (L = hs / depth)."""
    observed = pl.concat([run.scores.select(_GRID_COLS), run.metrics.select(_GRID_COLS)])
    if run.spec is None:
        revisions = unique_values(observed["revision"])
        layers = sorted(unique_values(observed["layer"]))
        return Grid(_first(observed["model"]), revisions, layers, unique_values(run.scores["task"]), layers)
    spec = run.spec
    layers = _spec_layers(spec, observed)
    metric_layers = []
    if spec.metrics is not None:
        n = num_blocks(observed)
        metric_layers = list(range(n)) if spec.metrics.all_layers and n else layers
    return Grid(spec.model, list(spec.checkpoints), layers, list(spec.tasks), metric_layers)


_GRID_COLS = ["model", "revision", "layer", "hidden_state", "depth"]


def _spec_layers(spec: Any, observed: pl.DataFrame) -> list[int]:
    """The spec's blocks; `all` or {last: N} need the block count, known once any row is in."""
    from layertime.spec import SpecError

    try:
        return spec.blocks(num_blocks(observed))
    except SpecError:  # no rows yet: the layers that are in (none), rather than asking the hub
        return sorted(unique_values(observed["layer"]))


def num_blocks(frame: pl.DataFrame) -> int | None:
    """The model's block count L from any row (depth = hidden_state / L), None without rows."""
    rows = frame.drop_nulls(["hidden_state", "depth"]).filter(pl.col("depth") > 0)
    return round(rows["hidden_state"][0] / rows["depth"][0]) if rows.height else None


def unique_values(series: pl.Series) -> list:
    return list(dict.fromkeys(series.drop_nulls().to_list()))


def _first(series: pl.Series) -> str:
    values = unique_values(series)
    return values[0] if values else ""


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_index(frame: pl.DataFrame, commits: dict[str, str] | None = None) -> pl.DataFrame:
    """One row per revision: `checkpoint` (its commit, else its name) and a `label` naming every alias.

    Revisions sharing a commit (main = step3000) get one checkpoint, labelled `step3000 = main`.
    """
    revs = frame.select("revision", "commit", "step").unique(subset="revision", keep="first")
    if commits:
        revs = revs.with_columns(
            pl.col("commit").fill_null(pl.col("revision").replace_strict(commits, default=None))
        )
    revs = revs.with_columns(pl.coalesce("commit", "revision").alias("checkpoint"))
    groups = (
        revs.sort(["step", "revision"], nulls_last=True)
        .group_by("checkpoint", maintain_order=True)
        .agg(pl.col("revision").str.join(" = ").alias("label"), pl.col("step").max().alias("ckpt_step"))
    )
    return revs.join(groups, on="checkpoint").select(
        "revision", "checkpoint", "label", pl.col("ckpt_step").alias("step")
    )


def final_revision(revisions: list[str], index: pl.DataFrame) -> str | None:
    """The revision the profile shows: `main` if present, else the latest step, else the last named."""
    if not revisions:
        return None
    if "main" in revisions:
        return "main"
    steps = index.filter(pl.col("revision").is_in(revisions)).drop_nulls("step").sort("step")
    return steps["revision"][-1] if steps.height else revisions[-1]


# --------------------------------------------------------------------------------------------- scores


def task_table(scores: pl.DataFrame) -> pl.DataFrame:
    """One score per (revision, layer, task): the mean of the task's subsets (rule a)."""
    return tables.task_scores(scores)


def arm_table(
    task_scores: pl.DataFrame, metrics: pl.DataFrame, tasks: list[str], index: pl.DataFrame
) -> pl.DataFrame:
    """One row per distinct arm (checkpoint, layer): `n_tasks`, `average` and `avg_<Type>` over `tasks`
    (`tables.rule_a_average`: each null unless every task it averages is in), one column per metric."""
    per_task = (
        task_scores.filter(pl.col("task").is_in(tasks)).drop("step", "commit").join(index, on="revision")
    )
    per_task = per_task.unique(subset=["checkpoint", "layer", "task"], keep="first")
    arms = tables.rule_a_average(per_task, tasks, ARM_KEYS)
    wide = metric_columns(metrics, index)
    if wide.height:
        arms = arms.join(wide, on=ARM_KEYS, how="full", coalesce=True, nulls_equal=True)  # main: step is null
    return arms.with_columns(pl.col("n_tasks").fill_null(0)).sort(["step", "label", "layer"], nulls_last=True)


def metric_columns(metrics: pl.DataFrame, index: pl.DataFrame) -> pl.DataFrame:
    """Metrics wide per distinct arm: `<metric>` (raw) or `<metric>_<normalization>`, as in `layers`."""
    if metrics.height == 0:
        return pl.DataFrame()
    named = (
        metrics.drop("step", "commit")
        .join(index, on="revision")
        .with_columns(
            pl.when(pl.col("normalization") == "raw")
            .then(pl.col("metric"))
            .otherwise(pl.col("metric") + "_" + pl.col("normalization"))
            .alias("column")
        )
    )
    named = named.unique(subset=["checkpoint", "layer", "column"], keep="first")
    return named.pivot(on="column", index=ARM_KEYS, values="value", sort_columns=True)


def metric_names(arms: pl.DataFrame) -> list[str]:
    """The metric columns of an arm table, in a stable order."""
    skip = {*ARM_KEYS, "n_tasks", "average"}
    return sorted(c for c in arms.columns if c not in skip and not c.startswith("avg_"))


NORMALIZATIONS = ("max_entropy", "mi_lower_bound")


def preferred_metrics(columns: list[str]) -> list[str]:
    """One column per metric: its normalised variant where there is one, else the raw value."""
    chosen: dict[str, str] = {}
    for column in columns:
        base = next(
            (column.removesuffix(f"_{n}") for n in NORMALIZATIONS if column.endswith(f"_{n}")), column
        )
        if base not in chosen or chosen[base] == base:
            chosen[base] = column
    return sorted(chosen.values())


def score_columns(arms: pl.DataFrame) -> list[str]:
    return ["average", *sorted(c for c in arms.columns if c.startswith("avg_"))]


# ------------------------------------------------------------------------------------------- coverage


def coverage(task_scores: pl.DataFrame, grid: Grid) -> pl.DataFrame:
    """Every evaluation of the grid (revision, layer, task) with `present` true where it has a score."""
    expected = pl.DataFrame(
        [(r, b, t) for r in grid.revisions for b in grid.layers for t in grid.tasks],
        schema={"revision": pl.String, "layer": pl.Int64, "task": pl.String},
        orient="row",
    )
    have = task_scores.select("revision", "layer", "task").unique().with_columns(present=pl.lit(True))
    out = expected.join(have, on=["revision", "layer", "task"], how="left")
    return out.with_columns(pl.col("present").fill_null(False))


def metric_coverage(metrics: pl.DataFrame, grid: Grid) -> tuple[int, int]:
    """(measured, expected) (revision, layer) metric arms."""
    expected = {(r, b) for r in grid.revisions for b in grid.metric_layers}
    have = set(metrics.select("revision", "layer").unique().iter_rows()) & expected
    return len(have), len(expected)


def scoring_seconds(scores: pl.DataFrame) -> pl.DataFrame:
    """CPU seconds of mteb scoring per task (all arms, all subsets), largest first.

    A commit's rows appear under each revision naming it (main = step3000) but were scored once.
    """
    once = scores.unique(subset=[pl.coalesce("commit", "revision"), "layer", "task", "split", "subset"])
    return (
        once.group_by("task", "task_type")
        .agg(pl.col("seconds").sum(), pl.len().alias("rows"))
        .sort("seconds", descending=True)
    )


# --------------------------------------------------------------------------------------- correlations


def correlations(x: Any, y: Any) -> dict[str, float | int | None]:
    """Spearman ρ and Kendall τ (τ-b) of paired values with their two-sided p-values (scipy.stats).

    Pairs with a missing value are dropped; fewer than 3 pairs or a constant side give nulls.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out: dict[str, float | int | None] = {"n": int(keep.sum())}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out | {"spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, rho_p = stats.spearmanr(x, y)
        tau, tau_p = stats.kendalltau(x, y)
    return out | {"spearman": float(rho), "spearman_p": float(rho_p), "kendall": float(tau),
                  "kendall_p": float(tau_p)}  # fmt: skip


def correlation_table(arms: pl.DataFrame, metrics: list[str], targets: list[str]) -> pl.DataFrame:
    """One row per (metric, target score): n, spearman, spearman_p, kendall, kendall_p over all arms."""
    rows = [
        {"metric": m, "target": t, **correlations(arms[m].to_numpy(), arms[t].to_numpy())}
        for m in metrics
        for t in targets
        if m in arms.columns and t in arms.columns
    ]
    schema = {"metric": pl.String, "target": pl.String, "n": pl.Int64, "spearman": pl.Float64,
              "spearman_p": pl.Float64, "kendall": pl.Float64, "kendall_p": pl.Float64}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


# ---------------------------------------------------------------------------------------- layer choice


def layer_choice(
    arms: pl.DataFrame, metrics: list[str], score: str = "average", layers: list[int] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Label-free layer choice per checkpoint: (per-checkpoint choices, summary per strategy).

    Every strategy is judged on the same checkpoints: those where each of `layers` (default: all
    layers in `arms`) has a `score` and every metric. Strategies: each metric picking its highest and
    its lowest layer (ties go to the lower layer), the last of `layers`, and a uniformly random layer,
    scored by its expected value (mean score; hit = share of layers at the best).
    `regret` = best score − chosen score; `hit` = 1 when the chosen layer scores the best.
    """
    layers = sorted(layers or unique_values(arms["layer"]))
    metrics = [m for m in metrics if m in arms.columns]
    groups = _complete_checkpoints(arms, [score, *metrics], layers)
    rows = []
    for group in groups:
        best = group[score].max()
        base = {"checkpoint": group["checkpoint"][0], "label": group["label"][0], "step": group["step"][0],
                "best_layer": _argmax(group, score), "best_score": best}  # fmt: skip
        rows.append(_pick("last layer", "baseline", group, layers[-1], score, base))
        rows.append(_random_pick(group, score, base))
        for m in metrics:
            for sign, word in ((1, "highest"), (-1, "lowest")):
                chosen = _argmax(group.with_columns(pl.col(m) * sign), m)
                rows.append(_pick(f"{m} ({word})", "metric", group, chosen, score, base))
    choices = pl.DataFrame(rows, schema=CHOICE_SCHEMA)
    return choices, summarize_choices(choices)


def _complete_checkpoints(arms: pl.DataFrame, columns: list[str], layers: list[int]) -> list[pl.DataFrame]:
    """Per checkpoint with a finite value in every one of `columns` at every one of `layers`: its arms."""
    finite = [pl.col(c).is_not_null() & pl.col(c).is_finite() for c in columns]
    have = arms.filter(pl.col("layer").is_in(layers), *finite)
    return [
        g.sort("layer")
        for _, g in have.group_by("checkpoint", maintain_order=True)
        if sorted(g["layer"].to_list()) == layers
    ]


def _argmax(group: pl.DataFrame, column: str) -> int:
    """The layer with the largest `column`; ties go to the lower layer (`group` is sorted by layer)."""
    return int(group["layer"][int(np.argmax(group[column].to_numpy()))])


def _pick(strategy: str, kind: str, group: pl.DataFrame, layer: int, score: str, base: dict) -> dict:
    chosen = group.filter(pl.col("layer") == layer)[score][0]
    hit = float(chosen >= base["best_score"])
    return {"strategy": strategy, "kind": kind, **base, "chosen_layer": layer, "chosen_score": chosen,
            "regret": base["best_score"] - chosen, "hit": hit}  # fmt: skip


def _random_pick(group: pl.DataFrame, score: str, base: dict) -> dict:
    values = group[score].to_numpy()
    mean = float(values.mean())
    return {"strategy": "random layer (expected)", "kind": "baseline", **base, "chosen_layer": None,
            "chosen_score": mean, "regret": base["best_score"] - mean,
            "hit": float((values >= base["best_score"]).mean())}  # fmt: skip


def summarize_choices(choices: pl.DataFrame) -> pl.DataFrame:
    """Per strategy: checkpoints counted, hit rate, mean chosen score, mean and max regret (best first)."""
    return (
        choices.group_by("strategy", "kind", maintain_order=True)
        .agg(
            pl.len().alias("n"),
            pl.col("hit").mean().alias("hit_rate"),
            pl.col("chosen_score").mean().alias("mean_score"),
            pl.col("regret").mean().alias("mean_regret"),
            pl.col("regret").max().alias("max_regret"),
        )
        .sort(["mean_regret", "strategy"])
    )


# ------------------------------------------------------------------------------------------ the analysis


@dataclass
class Analysis:
    """Everything the report shows, computed once from a run's tables."""

    run: RunData
    grid: Grid
    index: pl.DataFrame
    tasks: pl.DataFrame  # task_table, with checkpoint/label
    arms: pl.DataFrame
    coverage: pl.DataFrame
    correlations: pl.DataFrame
    choices: pl.DataFrame
    choice_summary: pl.DataFrame
    final: str | None
    notes: list[str]
    failures: list[str]


def analyze(run: RunData, failures: Sequence[str] = ()) -> Analysis:
    """All the report's numbers from a loaded run (`failures`: units a flow reported as failed)."""
    grid = expected_grid(run)
    commits = run.environment.get("checkpoints", {})
    both = pl.concat(
        [run.scores.select("revision", "commit", "step"), run.metrics.select("revision", "commit", "step")]
    )
    index = checkpoint_index(both, commits)
    per_task = task_table(run.scores)
    arms = arm_table(per_task, run.metrics, grid.tasks, index)
    metrics = metric_names(arms)
    corr = correlation_table(arms, metrics, score_columns(arms))
    choices, summary = layer_choice(arms, preferred_metrics(metrics), "average", grid.layers)
    cov = coverage(per_task, grid)
    per_task = per_task.join(index.drop("step"), on="revision", how="left")
    notes = list(run.notes) + _gap_notes(cov, run, grid)
    if failures:
        notes.insert(0, f"{len(failures)} unit(s) failed in the last run: see Failed units.")
    final = final_revision([r for r in grid.revisions if r in set(index["revision"])], index)
    return Analysis(
        run, grid, index, per_task, arms, cov, corr, choices, summary, final, notes, list(failures)
    )


def _gap_notes(cov: pl.DataFrame, run: RunData, grid: Grid) -> list[str]:
    notes = []
    missing = cov.filter(~pl.col("present")).height
    if missing:
        notes.append(
            f"{missing} of {cov.height} evaluations (revision × layer × task) have no score yet (failed or "
            "not run): they are gaps in the figures and tables, and a layer's rule-a average stays empty "
            "until all its tasks are in."
        )
    measured, expected = metric_coverage(run.metrics, grid)
    if measured < expected:
        notes.append(
            f"{expected - measured} of {expected} (revision × layer) metric arms are not measured yet."
        )
    return notes


# ------------------------------------------------------------------------------- key numbers


def key_numbers(a: Analysis) -> list[dict]:
    """Per checkpoint: best layer and its average, the last layer's, the oracle average, tasks done."""
    rows = []
    last = a.grid.layers[-1] if a.grid.layers else None
    for (ckpt,), group in a.arms.group_by("checkpoint", maintain_order=True):
        scored = group.drop_nulls("average").sort("layer")
        row = {"checkpoint": group["label"][0], "step": group["step"][0]}
        if scored.height:
            best = scored.row(int(np.argmax(scored["average"].to_numpy())), named=True)
            row |= {"best_layer": best["layer"], "best_average": x100(best["average"])}
        at_last = scored.filter(pl.col("layer") == last)["average"]
        row["last_layer_average"] = x100(at_last[0]) if at_last.len() else None
        row["oracle_average"] = x100(
            oracle_average(a.tasks.filter(pl.col("checkpoint") == ckpt), a.grid.tasks)
        )
        row["tasks_scored"] = f"{int(group['n_tasks'].sum())}/{len(a.grid.tasks) * len(a.grid.layers)}"
        rows.append(row)
    return rows


def oracle_average(per_task: pl.DataFrame, tasks: list[str]) -> float | None:
    """Mean over `tasks` of each task's best score over layers (null unless every task has a score)."""
    best = per_task.filter(pl.col("task").is_in(tasks)).group_by("task").agg(pl.col("score").max())
    return float(best["score"].mean()) if best.height == len(tasks) and tasks else None


def x100(value: float | None) -> float | None:
    """A 0-1 score as the paper shows it (×100, 2 decimals); None stays None."""
    if value is None or math.isnan(value):
        return None
    return round(100 * value, 2)


# ---------------------------------------------------------------------------------- shared views


def profile_frame(a: Analysis) -> pl.DataFrame | None:
    """The arms of the final revision's checkpoint, one row per expected layer (gaps as nulls)."""
    if a.final is None:
        return None
    ckpt = a.index.filter(pl.col("revision") == a.final)["checkpoint"][0]
    layers = pl.DataFrame({"layer": a.grid.layers}, schema={"layer": pl.Int64})
    arms = a.arms.filter(pl.col("checkpoint") == ckpt)
    out = layers.join(arms, on="layer", how="left").with_columns(hidden_state=pl.col("layer") + 1)
    return out.sort("layer")


def reference_applies(a: Analysis) -> bool:
    """The paper's values apply: Pythia-410m and the final revision is main (= step143000)."""
    if a.grid.model != PAPER_MODEL or a.final is None:
        return False
    label = a.index.filter(pl.col("revision") == a.final)["label"][0]
    return any(rev in PAPER_REVISIONS for rev in label.split(" = "))


def reference_comparison(a: Analysis) -> pl.DataFrame | None:
    """Ours vs the paper (×100) at each paper layer we evaluated; None if it does not apply."""
    prof = profile_frame(a)
    if prof is None or not reference_applies(a):
        return None
    rows = []
    for hs, paper in sorted(PAPER_REFERENCE.items()):
        ours = prof.filter(pl.col("hidden_state") == hs)["average"]
        if ours.len():
            value = x100(ours[0])
            diff = None if value is None else round(value - 100 * paper, 2)
            rows.append(
                {"paper_layer": hs, "block": hs - 1, "ours": value, "paper": 100 * paper, "diff": diff}
            )
    schema = {"paper_layer": pl.Int64, "block": pl.Int64, "ours": pl.Float64, "paper": pl.Float64,
              "diff": pl.Float64}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def distinct_checkpoints(a: Analysis) -> pl.DataFrame:
    """Checkpoints in training order, one per commit: checkpoint, label, step."""
    return (
        a.index.unique(subset="checkpoint", keep="first")
        .select("checkpoint", "label", "step")
        .sort(["step", "label"], nulls_last=True)
    )


def search_path(arms: pl.DataFrame) -> pl.DataFrame:
    """The layer search's best layer over training: per checkpoint (in training order), the arm with
    the highest predicted mean (ties: the lower layer); empty while any arm has no prediction."""
    if arms.height == 0 or arms["mean"].null_count():
        return arms.clear()
    best = arms.sort(["mean", "layer"], descending=[True, False]).unique(subset="checkpoint", keep="first")
    return best.sort("checkpoint_order")


def gpu_seconds(costs: pl.DataFrame) -> pl.DataFrame:
    """Per GPU phase (embed, measure): units, seconds, texts forwarded, real and padded tokens."""
    return (
        costs.group_by("phase")
        .agg(
            pl.len().alias("units"),
            pl.col("seconds").sum(),
            pl.col("unique_texts").sum(),
            pl.col("real_tokens").sum(),
            pl.col("padded_tokens").sum(),
            pl.col("device").unique().sort().str.join(", "),
        )
        .sort("phase")
    )
