"""The run's report: what a researcher opens a run for (issue 7).

`write_report(run_root)` reads the merged tables (docs/design.md §7) and writes `<run_root>/report/`:
`report.html` (self-contained, PNG figures beside it) and `summary.md` (also the flow's artifact).

The numbers come from pure functions on polars frames, callable from a notebook or a test:
- `task_table` / `arm_table`: one score per (revision, layer, task); one row per arm (checkpoint, layer)
  with the rule-a `average` (null unless every task is in), strict per-type averages and metric columns;
- `correlations` / `correlation_table`: Spearman and Kendall (scipy.stats) of metrics against scores;
- `layer_choice`: per checkpoint, the layer a metric ranks best, its score, regret and hit rate, beside
  always-the-last-layer and a uniformly random layer (its expected value, not a draw);
- `coverage`: which evaluations of the spec's grid are present; `scoring_seconds`: where CPU time went.

Layers are 0-based block indices b (`hidden_state` = b + 1 = the paper's layer index). Scores are
stored in 0-1 and shown ×100, as the paper does. Revisions sharing a commit (`main` = `step3000`) are
one checkpoint in cross-checkpoint analyses, so no arm is counted twice.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from layertime import suite, tables
from layertime.io import atomic_write_dir

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


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class RunData:
    """A run's tables and snapshot, as the report reads them (any part may be missing)."""

    root: Path
    scores: pl.DataFrame
    metrics: pl.DataFrame
    spec: Any | None  # ExperimentSpec, None when spec.yaml is missing or unreadable
    environment: dict
    notes: list[str] = field(default_factory=list)


def load_run(run_root: Path) -> RunData:
    """Read `tables/scores`, `tables/metrics`, `spec.yaml` and `environment.json` of a run root."""
    root = Path(run_root)
    notes: list[str] = []
    scores = _read_table(root / "tables" / "scores.parquet", tables.scores_frame([]), notes)
    metrics = _read_table(root / "tables" / "metrics.parquet", tables.metrics_frame([]), notes)
    spec = None
    if (root / "spec.yaml").is_file():
        from layertime.spec import SpecError, load_spec

        try:
            spec = load_spec(root / "spec.yaml")
        except SpecError as e:
            notes.append(f"spec.yaml could not be read ({e}); the expected grid is what the tables hold")
    else:
        notes.append("no spec.yaml: the expected grid is what the tables hold")
    env_path = root / "environment.json"
    environment = json.loads(env_path.read_text()) if env_path.is_file() else {}
    return RunData(root, scores, metrics, spec, environment, notes)


def _read_table(path: Path, empty: pl.DataFrame, notes: list[str]) -> pl.DataFrame:
    if not path.is_file():
        notes.append(f"{path.name} is missing: nothing of it is reported")
        return empty
    return pl.read_parquet(path)


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
        revisions = _unique(observed["revision"])
        layers = sorted(_unique(observed["layer"]))
        return Grid(_first(observed["model"]), revisions, layers, _unique(run.scores["task"]), layers)
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
        return sorted(_unique(observed["layer"]))


def num_blocks(frame: pl.DataFrame) -> int | None:
    """The model's block count L from any row (depth = hidden_state / L), None without rows."""
    rows = frame.drop_nulls(["hidden_state", "depth"]).filter(pl.col("depth") > 0)
    return round(rows["hidden_state"][0] / rows["depth"][0]) if rows.height else None


def _unique(series: pl.Series) -> list:
    return list(dict.fromkeys(series.drop_nulls().to_list()))


def _first(series: pl.Series) -> str:
    values = _unique(series)
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
    """One row per distinct arm (checkpoint, layer): `average` over `tasks` (null unless all are in),
    `avg_<Type>` (null unless all of that type's tasks are in), `n_tasks`, and one column per metric."""
    types = {t: _task_type(t) for t in tasks}
    per_task = (
        task_scores.filter(pl.col("task").is_in(tasks)).drop("step", "commit").join(index, on="revision")
    )
    per_task = per_task.unique(subset=["checkpoint", "layer", "task"], keep="first")
    arms = per_task.group_by(ARM_KEYS).agg(
        pl.len().alias("n_tasks"),
        pl.when(pl.len() == len(tasks)).then(pl.col("score").mean()).alias("average"),
        *[
            _type_average(kind, [t for t in tasks if types[t] == kind])
            for kind in dict.fromkeys(types.values())
        ],
    )
    wide = metric_columns(metrics, index)
    if wide.height:
        arms = arms.join(wide, on=ARM_KEYS, how="full", coalesce=True, nulls_equal=True)  # main: step is null
    return arms.with_columns(pl.col("n_tasks").fill_null(0)).sort(["step", "label", "layer"], nulls_last=True)


def _type_average(kind: str, names: list[str]) -> pl.Expr:
    of_type = pl.col("task").is_in(names)
    complete = of_type.sum() == len(names)
    return pl.when(complete).then(pl.col("score").filter(of_type).mean()).alias(f"avg_{kind}")


def _task_type(task: str) -> str:
    try:
        return suite.task_type(task)
    except KeyError:
        return "Other"


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


def texts_info(run: RunData) -> pl.DataFrame:
    """Per task: texts mteb asks for per evaluation and unique texts forwarded, from the store's records."""
    store = _store(run)
    rows = []
    if store is None or run.spec is None:
        return pl.DataFrame()
    for task in run.spec.tasks:
        found = sorted(
            (store / "texts").glob(f"{task}__*__{run.spec.aggregation}.json"), key=os.path.getmtime
        )
        if found:
            data = json.loads(found[-1].read_text())
            rows.append({"task": task, "requested": data["requested"], "unique": len(data["texts"])})
    return pl.DataFrame(rows)


def _store(run: RunData) -> Path | None:
    spec = run.spec
    candidates = [run.root.parent / "store"]
    if spec is not None and spec.store is not None:
        candidates = [Path(spec.store), run.root.parent / Path(spec.store).name, *candidates]
    return next((p for p in candidates if (p / "texts").is_dir()), None)


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
    layers = sorted(layers or _unique(arms["layer"]))
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


# ------------------------------------------------------------------------------------------ the report


@dataclass
class ReportPaths:
    """What `write_report` wrote, and the summary for a Prefect markdown/table artifact."""

    directory: Path
    html: Path
    summary_md: Path
    figures: dict[str, Path]  # figure name -> PNG beside report.html
    markdown: str  # the text of summary.md
    table: list[dict]  # key numbers per checkpoint (for create_table_artifact)
    gaps: int  # evaluations of the spec's grid without a score


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


def write_report(run_root: Path, out_dir: Path | None = None, failures: Sequence[str] = ()) -> ReportPaths:
    """Write `report.html`, its PNG figures and `summary.md` into `out_dir` (default `<run_root>/report`).

    `failures` (e.g. the flow's `score[step1000 · DemoSTS · L3]: ValueError: ...` lines) are listed in
    the report. The directory is built aside and swapped in whole: a reader sees the old report or the
    new one, never a mix.
    """
    from layertime import figures

    run_root = Path(run_root)
    out = Path(out_dir) if out_dir is not None else run_root / "report"
    analysis = analyze(load_run(run_root), failures)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written["made"] = made = figures.draw_all(analysis, tmp)
        written["markdown"], written["table"] = summary_markdown(analysis, out / "report.html")
        (tmp / "summary.md").write_text(written["markdown"])  # inside the temp directory: swapped in whole
        (tmp / "report.html").write_text(render_html(analysis, made, out))

    atomic_write_dir(out, write)
    gaps = analysis.coverage.filter(~pl.col("present")).height
    paths = {name: out / p.name for name, p in written["made"].items()}
    return ReportPaths(
        out, out / "report.html", out / "summary.md", paths, written["markdown"], written["table"], gaps
    )


# ----------------------------------------------------------------------------------- summary.md


def key_numbers(a: Analysis) -> list[dict]:
    """Per checkpoint: best layer and its average, the last layer's, the oracle average, tasks done."""
    rows = []
    last = a.grid.layers[-1] if a.grid.layers else None
    for (ckpt,), group in a.arms.group_by("checkpoint", maintain_order=True):
        scored = group.drop_nulls("average").sort("layer")
        row = {"checkpoint": group["label"][0], "step": group["step"][0]}
        if scored.height:
            best = scored.row(int(np.argmax(scored["average"].to_numpy())), named=True)
            row |= {"best_layer": best["layer"], "best_average": _x100(best["average"])}
        at_last = scored.filter(pl.col("layer") == last)["average"]
        row["last_layer_average"] = _x100(at_last[0]) if at_last.len() else None
        row["oracle_average"] = _x100(
            oracle_average(a.tasks.filter(pl.col("checkpoint") == ckpt), a.grid.tasks)
        )
        row["tasks_scored"] = f"{int(group['n_tasks'].sum())}/{len(a.grid.tasks) * len(a.grid.layers)}"
        rows.append(row)
    return rows


def oracle_average(per_task: pl.DataFrame, tasks: list[str]) -> float | None:
    """Mean over `tasks` of each task's best score over layers (null unless every task has a score)."""
    best = per_task.filter(pl.col("task").is_in(tasks)).group_by("task").agg(pl.col("score").max())
    return float(best["score"].mean()) if best.height == len(tasks) and tasks else None


def _x100(value: float | None) -> float | None:
    """A 0-1 score as the paper shows it (×100, 2 decimals); None stays None."""
    if value is None or math.isnan(value):
        return None
    return round(100 * value, 2)


MD_CHECKPOINTS = 12  # rows of the per-checkpoint table in summary.md
MD_FAILURES = 20


def summary_markdown(a: Analysis, html_path: Path | None = None) -> tuple[str, list[dict]]:
    """The markdown summary (headline numbers, key table, layer choice, gaps) and the key-number rows."""
    table = key_numbers(a)
    done = a.coverage["present"].sum()
    lines = [f"# {_title(a)}", "", _facts_line(a), "",
             f"**Progress**: {done}/{a.coverage.height} evaluations scored."]  # fmt: skip
    lines += ["", *_profile_lines(a)]
    if table:
        shown = table[-MD_CHECKPOINTS:]
        lines += ["", "## Per checkpoint (average main score ×100, rule a)", "", *_md_table(shown)]
        if len(shown) < len(table):
            lines += ["", f"(the last {len(shown)} of {len(table)} checkpoints; all in report.html)"]
    if a.choice_summary.height:
        rows = [_choice_row(r) for r in _top_choices(a.choice_summary).iter_rows(named=True)]
        lines += ["", "## Label-free layer choice", "", *_md_table(rows)]
    if a.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in a.notes]]
    if a.failures:
        lines += ["", "## Failed units", "", *[f"- `{f}`" for f in a.failures[:MD_FAILURES]]]
        lines += [f"- … and {len(a.failures) - MD_FAILURES} more"] if len(a.failures) > MD_FAILURES else []
    if html_path is not None:
        lines += ["", f"Full report (figures, per-task tables, correlations): `{html_path.resolve()}`"]
    return "\n".join(lines) + "\n", table


def _title(a: Analysis) -> str:
    name = a.run.spec.name if a.run.spec is not None else a.run.root.name
    return f"{name}: {a.grid.model}"


def _facts_line(a: Analysis) -> str:
    g = a.grid
    layers = _ranges(g.layers) or "(known once a row is in)"
    plural = "s" if len(g.revisions) != 1 else ""
    return (
        f"{len(g.revisions)} checkpoint{plural}, layers (0-based blocks) {layers}, {len(g.tasks)} tasks; "
        "layer b = hidden_states[b + 1] = the paper's layer index b + 1."
    )


def _ranges(values: list[int]) -> str:
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 1:
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def _profile_lines(a: Analysis) -> list[str]:
    prof = profile_frame(a)
    if prof is None or prof.drop_nulls("average").height == 0:
        return [f"No layer of `{a.final}` has all its tasks yet." if a.final else "No scores yet."]
    scored = prof.drop_nulls("average")
    best = scored.row(int(np.argmax(scored["average"].to_numpy())), named=True)
    last = scored.filter(pl.col("layer") == a.grid.layers[-1])
    text = [f"`{a.final}`: best layer **{best['layer']}** (hidden state {best['hidden_state']}) at "
            f"**{100 * best['average']:.2f}**"]  # fmt: skip
    if last.height:
        text.append(f"last layer {a.grid.layers[-1]} at {100 * last['average'][0]:.2f}")
    lines = ["; ".join(text) + "."]
    ref = reference_comparison(a)
    if ref is not None and ref.height:
        pairs = ", ".join(
            f"L{r['paper_layer']}: ours {_fmt(r['ours'])} vs paper {_fmt(r['paper'])}"
            for r in ref.iter_rows(named=True)
        )
        lines.append(f"Paper's Pythia-410m `main` (×100, paper layer L = hidden state): {pairs}.")
    return lines


def _top_choices(summary: pl.DataFrame) -> pl.DataFrame:
    baselines = summary.filter(pl.col("kind") == "baseline")
    metrics = summary.filter(pl.col("kind") == "metric").head(5)
    return pl.concat([metrics, baselines])


def _choice_row(r: dict) -> dict:
    return {"strategy": r["strategy"], "checkpoints": r["n"], "picks best": f"{100 * r['hit_rate']:.0f}%",
            "mean score": _fmt(100 * r["mean_score"]), "mean regret": _fmt(100 * r["mean_regret"]),
            "max regret": _fmt(100 * r["max_regret"])}  # fmt: skip


def _md_table(rows: list[dict]) -> list[str]:
    heads = list(rows[0])
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    out += ["| " + " | ".join(_fmt(r.get(h)) for h in heads) + " |" for r in rows]
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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
            value = _x100(ours[0])
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


# ------------------------------------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #e5e5ea;
     padding-bottom: 4px; } h3 { margin-top: 26px; }
.facts { color: #444; } .facts td { padding: 1px 14px 1px 0; vertical-align: top; }
.convention { background: #eef4fb; border-left: 4px solid #4575b4; padding: 8px 12px; margin: 14px 0; }
.notes { background: #fff6e0; border-left: 4px solid #e08214; padding: 8px 12px; margin: 14px 0; }
.notes li { margin: 2px 0; }
figure { margin: 14px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; max-width: 900px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 8px 18px; }
table.data { border-collapse: collapse; font-size: 13px; margin: 10px 0; }
table.data th, table.data td { border: 1px solid #e0e0e6; padding: 3px 8px; }
table.data th { background: #f4f4f7; text-align: left; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data td.best { font-weight: 700; background: #e3f1e3; }
table.data td.gap { color: #999; background: repeating-linear-gradient(45deg, #fafafa, #fafafa 4px,
                    #f0f0f0 4px, #f0f0f0 8px); text-align: center; }
table.data tr.foot td { border-top: 2px solid #bbb; font-weight: 600; }
table.data td small { color: #666; }
details { margin: 6px 0; } summary { cursor: pointer; color: #1f4e8c; }
nav a { margin-right: 14px; } a { color: #1f4e8c; }
.muted { color: #666; font-size: 13px; }
"""


def render_html(a: Analysis, made: dict[str, Path], out: Path) -> str:
    """The self-contained report page (inline CSS, no scripts); figures are `<img>` beside it."""
    sections = [
        ("profile", "Layer profile", _html_profile(a, made)),
        ("training", "Across training", _html_training(a, made)),
        ("tasks", "Per-task scores", _html_tasks(a)),
        ("metrics", "Metrics vs score", _html_metrics(a, made)),
        ("choice", "Label-free layer choice", _html_choice(a, made)),
        ("progress", "Progress and cost", _html_progress(a, made, out)),
    ]
    sections = [(key, title, body) for key, title, body in sections if body]
    nav = " ".join(f'<a href="#{key}">{esc(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<h2 id="{key}">{esc(title)}</h2>{content}' for key, title, content in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(_title(a))}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body>{_html_header(a)}{_html_notes(a)}<nav>{nav}</nav>{body}"
        f'<p class="muted">Generated {now()} by layertime.report.</p></body></html>\n'
    )


CONVENTION = (
    "<div class='convention'><b>Layers</b> are 0-based block indices <i>b</i>: block <i>b</i>'s output "
    "is <code>hidden_states[b + 1]</code>, which the paper (Skean et al., 2025) calls layer "
    "L = <i>b</i> + 1. <b>Scores</b> are mteb main scores ×100; a layer's <b>average</b> is rule (a): "
    "the unweighted mean over the tasks, empty until every task is in. Revisions sharing a commit are "
    "one checkpoint (e.g. <code>step143000 = main</code>).</div>"
)


def _html_header(a: Analysis) -> str:
    env, g = a.run.environment, a.grid
    facts = [
        ("model", g.model),
        ("checkpoints", f"{len(g.revisions)}: {_short_list(g.revisions)}"),
        ("layers", f"{len(g.layers)}: blocks {_ranges(g.layers)}"),
        ("tasks", f"{len(g.tasks)}"),
        ("settings", ", ".join(f"{k}={v}" for k, v in env.get("settings", {}).items()) or "—"),
        ("mteb", ", ".join(_unique(a.run.scores["mteb_version"])) or "—"),
        ("code", env.get("git_commit") or "—"),
        ("run root", str(a.run.root)),
    ]
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts)
    return f"<h1>{esc(_title(a))}</h1><table class='facts'>{rows}</table>{CONVENTION}"


def _short_list(values: list[str], limit: int = 8) -> str:
    if len(values) <= limit:
        return ", ".join(values)
    return f"{', '.join(values[:3])}, …, {', '.join(values[-2:])}"


def _html_notes(a: Analysis) -> str:
    if not a.notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in a.notes)
    return f"<div class='notes'><b>Gaps and notes</b><ul>{items}</ul></div>"


def _img(made: dict[str, Path], name: str, caption: str) -> str:
    if name not in made:
        return ""
    file = made[name].name
    return f'<figure><img src="{esc(file)}" alt="{esc(name)}"><figcaption>{caption}</figcaption></figure>'


def _html_profile(a: Analysis, made: dict[str, Path]) -> str:
    if a.final is None:
        return "<p>No scores yet.</p>"
    ref = reference_comparison(a)
    caption = f"Rule-a average per layer of <code>{esc(a.final)}</code>. Circled: the best layer."
    if ref is not None:
        caption += " Red diamonds: the paper's Pythia-410m <code>main</code> values, at block b = L − 1."
    parts = [
        "".join(f"<p>{_md_inline(line)}</p>" for line in _profile_lines(a)),
        _img(made, "profile", caption),
    ]
    if ref is not None:
        parts.append(_reference_html(ref))
    caption = "Mean main score per task type and layer (empty until all of the type's tasks are in)."
    parts.append(_img(made, "profile_types", caption))
    return "".join(parts)


def _reference_html(ref: pl.DataFrame) -> str:
    head = ["paper layer L", "block b", "ours", "paper", "ours − paper"]
    body = [
        [r["paper_layer"], r["block"], r["ours"], r["paper"], r["diff"]] for r in ref.iter_rows(named=True)
    ]
    out = "<h3>Against the paper (Pythia-410m main, ×100)</h3>" + _html_table(head, body)
    missing = sorted(set(PAPER_REFERENCE) - set(ref["paper_layer"].to_list()))
    if missing:
        out += f"<p class='muted'>Paper layers not in this run: {', '.join(f'L{m}' for m in missing)}.</p>"
    return out


def _html_training(a: Analysis, made: dict[str, Path]) -> str:
    if distinct_checkpoints(a).height < 2:
        return ""
    head = [
        "checkpoint",
        "step",
        "best layer",
        "best average",
        "last layer",
        "oracle average",
        "tasks scored",
    ]
    keys = ["checkpoint", "step", "best_layer", "best_average", "last_layer_average", "oracle_average"]
    body = [[r.get(k) for k in keys] + [r["tasks_scored"]] for r in key_numbers(a)]
    heatmap = (
        "Rule-a average per checkpoint and layer. White outline: each checkpoint's best layer (only where "
        "every layer is in). Hatched: not all tasks scored yet."
    )
    steps = "The same numbers over training steps; circles mark each complete checkpoint's best layer."
    oracle = (
        "<p class='muted'>Oracle average: the mean over tasks of each task's best layer (an upper bound "
        "no single layer reaches).</p>"
    )
    tables_ = "<h3>Per checkpoint</h3>" + _html_table(head, body) + oracle
    return _img(made, "heatmap", heatmap) + _img(made, "steps", steps) + tables_


def _html_tasks(a: Analysis) -> str:
    if a.tasks.height == 0:
        return "<p>No task scores yet.</p>"
    ckpts = distinct_checkpoints(a)
    blocks = []
    for i, (ckpt, label) in enumerate(ckpts.select("checkpoint", "label").iter_rows()):
        table = _task_matrix(a.tasks.filter(pl.col("checkpoint") == ckpt), a.grid.layers, a.grid.tasks)
        opened = " open" if i == ckpts.height - 1 else ""
        blocks.append(f"<details{opened}><summary>{esc(label)}</summary>{table}</details>")
    intro = (
        "<p>Main score ×100 per task and layer; bold: the task's best layer. Footer: the rule-a average "
        "per layer and, under <i>best layer</i>, the oracle average (each task at its best layer).</p>"
    )
    return intro + "".join(blocks)


def _task_matrix(rows: pl.DataFrame, layers: list[int], tasks: list[str]) -> str:
    score = {(r["task"], r["layer"]): r["score"] for r in rows.iter_rows(named=True)}
    head = ["task", "type", *[f"block {b} (L{b + 1})" for b in layers], "best layer"]
    body = [_task_row(task, [score.get((task, b)) for b in layers], layers) for task in _by_type(tasks)]
    averages = "".join(_cell(_rule_a(score, tasks, b), False) for b in layers)
    oracle = _cell(oracle_average(rows, tasks), False, "oracle ")
    body.append(f"<tr class='foot'><td>average (rule a)</td><td></td>{averages}{oracle}</tr>")
    return _html_table(head, body, raw_rows=True)


def _by_type(tasks: list[str]) -> list[str]:
    return sorted(tasks, key=lambda t: (_task_type(t), t))


def _task_row(task: str, values: list[float | None], layers: list[int]) -> str:
    present = [v for v in values if v is not None]
    best = max(present) if present else None
    cells = "".join(_cell(v, v is not None and v == best) for v in values)
    best_layer = layers[values.index(best)] if best is not None else None
    kind = _task_type(task)
    return f"<tr><td>{esc(task)}</td><td>{esc(kind)}</td>{cells}<td class='num'>{esc(best_layer)}</td></tr>"


def _rule_a(score: dict, tasks: list[str], layer: int) -> float | None:
    values = [score.get((t, layer)) for t in tasks]
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def _cell(value: float | None, best: bool, prefix: str = "") -> str:
    if value is None:
        return "<td class='gap'>—</td>"
    return f"<td class='num{' best' if best else ''}'>{esc(prefix)}{100 * value:.2f}</td>"


def _html_metrics(a: Analysis, made: dict[str, Path]) -> str:
    if a.correlations.height == 0:
        return "<p>No representation metrics in this run.</p>"
    figures_ = "".join(_img(made, name, "") for name in made if name.startswith("metric_"))
    complete = a.arms.drop_nulls("average").height
    intro = (
        f"<p>Each point is one arm (checkpoint, layer); {complete} arms have a complete average. Spearman ρ "
        "and Kendall τ (τ-b) with two-sided p-values (scipy.stats); the table also correlates each metric "
        "with each task type's mean. Bold: Spearman p &lt; 0.05.</p>"
    )
    table = _corr_html(a.correlations)
    return f"{intro}<div class='grid'>{figures_}</div><h3>Correlations per task type</h3>{table}"


def _corr_html(corr: pl.DataFrame) -> str:
    targets = list(dict.fromkeys(corr["target"]))
    cells = {(r["metric"], r["target"]): _corr_cell(r) for r in corr.iter_rows(named=True)}
    body = [
        f"<tr><td>{esc(metric)}</td>{''.join(cells[(metric, t)] for t in targets)}</tr>"
        for metric in dict.fromkeys(corr["metric"])
    ]
    return _html_table(["metric", *[t.removeprefix("avg_") for t in targets]], body, raw_rows=True)


def _corr_cell(c: dict) -> str:
    if c["spearman"] is None:
        return f"<td class='gap' title='too few pairs or a constant side'>— <small>n={c['n']}</small></td>"
    rho = c["spearman"]
    style = f"background: hsl({10 if rho < 0 else 215}, 70%, {97 - 30 * abs(rho):.0f}%)"
    style += "; font-weight: 700" if c["spearman_p"] < 0.05 else ""
    spearman = f"ρ {rho:+.2f} <small>p {c['spearman_p']:.2g}</small>"
    kendall = f"τ {c['kendall']:+.2f} <small>p {c['kendall_p']:.2g}</small>"
    return f"<td class='num' style='{style}'>{spearman}<br>{kendall}</td>"


def _html_choice(a: Analysis, made: dict[str, Path]) -> str:
    if a.choice_summary.height == 0:
        return "<p>No checkpoint has every layer scored (and measured) yet: nothing to choose from.</p>"
    head = ["strategy", "checkpoints", "picks best", "mean score", "mean regret", "max regret"]
    body = [
        [r["strategy"], r["n"], f"{100 * r['hit_rate']:.0f}%", 100 * r["mean_score"],
         100 * r["mean_regret"], 100 * r["max_regret"]]
        for r in a.choice_summary.iter_rows(named=True)
    ]  # fmt: skip
    judged, total = a.choices["checkpoint"].n_unique(), distinct_checkpoints(a).height
    explain = (
        f"<p>Judged on <b>{judged} of {total}</b> checkpoints: those with every layer scored and measured. "
        "For each, every strategy picks one layer without labels: a metric picks the layer where it is "
        f"highest or lowest (both signs shown), <i>last layer</i> takes block {a.grid.layers[-1]}, "
        "<i>random layer</i> is the expected value of a uniform choice. Regret = the best layer's average "
        "− the chosen layer's (×100). Choosing a metric's sign after seeing this table is itself a use "
        "of labels: fix the sign in advance (e.g. from another run) for an honest test.</p>"
    )
    caption = "Mean regret per strategy; text: share of checkpoints where it picked the best layer."
    return explain + _img(made, "layer_choice", caption) + _html_table(head, body)


def _html_progress(a: Analysis, made: dict[str, Path], out: Path) -> str:
    cost = _img(made, "cost", "mteb scoring time per task (CPU seconds, all arms).")
    parts = [_failures_html(a.failures), _coverage_html(a), _missing_html(a.coverage), _cost_html(a), cost]
    return "".join([*parts, _texts_html(a), _links_html(a.run.root, out)])


def _failures_html(failures: list[str]) -> str:
    if not failures:
        return ""
    items = "".join(f"<li><code>{esc(f)}</code></li>" for f in failures)
    return f"<h3>Failed units ({len(failures)})</h3><ul>{items}</ul>"


def _coverage_html(a: Analysis) -> str:
    cov = a.coverage.group_by("revision", maintain_order=True).agg(
        pl.col("present").sum(), pl.len().alias("n")
    )
    complete = (
        a.coverage.group_by("revision", "layer")
        .agg(pl.col("present").all())
        .group_by("revision")
        .agg(pl.col("present").sum().alias("complete"))
    )
    measured = (
        a.run.metrics.select("revision", "layer")
        .unique()
        .group_by("revision")
        .agg(pl.len().alias("measured"))
    )
    table = cov.join(complete, on="revision", how="left").join(measured, on="revision", how="left")
    n_l, n_m = len(a.grid.layers), len(a.grid.metric_layers)
    head = ["revision", "evaluations scored", "layers complete", "metric layers measured"]
    body = [
        [r["revision"], f"{r['present']}/{r['n']}", f"{r['complete'] or 0}/{n_l}",
         f"{r['measured'] or 0}/{n_m}" if n_m else "—"]
        for r in table.iter_rows(named=True)
    ]  # fmt: skip
    done = int(a.coverage["present"].sum())
    return f"<p><b>{done}/{a.coverage.height}</b> evaluations scored.</p>" + _html_table(head, body)


def _missing_html(cov: pl.DataFrame, limit: int = 300) -> str:
    missing = cov.filter(~pl.col("present"))
    if missing.height == 0:
        return "<p>Nothing missing: every evaluation of the spec's grid has a score.</p>"
    rows = missing.head(limit).iter_rows()
    items = "".join(f"<li>{esc(rev)} · {esc(task)} · block {b}</li>" for rev, b, task, _ in rows)
    more = f"<li>… and {missing.height - limit} more</li>" if missing.height > limit else ""
    summary = f"{missing.height} evaluations without a score (failed or not run yet)"
    return f"<details><summary>{summary}</summary><ul>{items}{more}</ul></details>"


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


def _cost_html(a: Analysis) -> str:
    per_task = scoring_seconds(a.run.scores)
    total, rows = per_task["seconds"].sum(), per_task["rows"].sum()
    text = (
        f"<p>Scoring (CPU, <code>mteb.evaluate</code>): <b>{total:,.1f} s</b> over {rows} subset scores "
        "computed (a commit named twice, like main = step3000, counted once).</p>"
    )
    path = a.run.root / "tables" / "costs.parquet"
    if not path.is_file():
        return text + "<p>Embedding and metric passes: not timed in this run's tables.</p>"
    gpu = gpu_seconds(pl.read_parquet(path))
    items = "".join(
        f"<li>{esc(r['phase'])} ({esc(r['device'])}): <b>{r['seconds']:,.1f} s</b> over {r['units']} units"
        + (f", {r['unique_texts']:,} texts forwarded, {r['real_tokens']:,} real / {r['padded_tokens']:,} "
           "padded tokens" if r["phase"] == "embed" and r["unique_texts"] else "")
        + "</li>"
        for r in gpu.iter_rows(named=True)
    )  # fmt: skip
    return text + f"<p>Forward passes (the GPU phases, timed when they ran):</p><ul>{items}</ul>"


def _texts_html(a: Analysis) -> str:
    info = texts_info(a.run)
    if info.height == 0:
        return ""
    n_ckpt, n_rev, n_l = distinct_checkpoints(a).height, len(a.grid.revisions), len(a.grid.layers)
    requested, unique = int(info["requested"].sum()), int(info["unique"].sum())
    head = ["task", "texts mteb asks for (one evaluation)", "unique texts (forwarded once per checkpoint)"]
    body = [[r["task"], r["requested"], r["unique"]] for r in info.iter_rows(named=True)]
    body.append(["all tasks", requested, unique])
    text = (
        f"<p>mteb asks for {requested:,} texts per (checkpoint, layer) evaluation of all tasks; the run "
        "forwards each unique text once per checkpoint for all layers: "
        f"{unique * n_ckpt:,} forward texts for the grid, against {requested * n_rev * n_l:,} if every "
        "evaluation encoded its own.</p>"
    )
    return "<h3>Texts</h3>" + text + _html_table(head, body)


def _links_html(run_root: Path, out: Path) -> str:
    found = sorted((run_root / "tables").glob("*.csv"))
    if not found:
        return ""
    links = " · ".join(f'<a href="{esc(os.path.relpath(p, out))}">{esc(p.name)}</a>' for p in found)
    return f"<h3>Tables</h3><p>{links}</p>"


def _html_table(head: list[str], body: list, raw_rows: bool = False) -> str:
    """A table; `body` holds value lists (escaped, numbers right-aligned) or, with raw_rows, `<tr>` HTML."""
    thead = "".join(f"<th>{esc(h)}</th>" for h in head)
    rows = "".join(body) if raw_rows else "".join(f"<tr>{''.join(map(_td, row))}</tr>" for row in body)
    return f"<table class='data'><thead><tr>{thead}</tr></thead><tbody>{rows}</tbody></table>"


def _td(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class='num'>{esc(value)}</td>" if numeric else f"<td>{esc(value)}</td>"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _md_inline(text: str) -> str:
    """HTML of one markdown line that uses only **bold** and `code`."""
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def esc(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else _fmt(value))
