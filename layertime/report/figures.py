"""The report's figures: one idea each, PNG, drawn with matplotlib's object API (no pyplot state).

`Figure` objects render through the Agg canvas whatever backend a notebook has chosen, and are safe in
the flow's worker threads. Scores are shown ×100 (the paper's unit); layers as 0-based block indices b
with the paper's layer index L = b + 1 (= hidden_states[b + 1]) beneath.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from layertime.io import atomic_write
from layertime.report.analysis import (
    Analysis,
    correlations,
    distinct_checkpoints,
    metric_names,
    preferred_metrics,
    profile_frame,
    reference_comparison,
    score_columns,
    scoring_seconds,
    search_path,
)

DPI = 110
TYPE_COLORS = {"Classification": "#1f77b4", "Clustering": "#ff7f0e", "PairClassification": "#2ca02c",
               "Reranking": "#d62728", "STS": "#9467bd", "Other": "#7f7f7f"}  # fmt: skip
LAYER_AXIS = "layer: block index b (0-based); below: the paper's layer L = b + 1 = hidden_states[b + 1]"
SCORE_AXIS = "average main score ×100 (rule a)"


def draw_all(a: Analysis, directory: Path) -> dict[str, Path]:
    """Every figure that applies to the run, by name -> PNG path in `directory`."""
    made: dict[str, Path] = {}
    prof = profile_frame(a)
    if prof is not None and prof.drop_nulls("average").height:
        made["profile"] = profile_average(prof, reference_comparison(a), a.final, directory / "profile.png")
    types = [c for c in score_columns(a.arms) if c.startswith("avg_")]
    if prof is not None and any(prof[c].drop_nulls().len() for c in types if c in prof.columns):
        made["profile_types"] = profile_types(prof, types, a.final, directory / "profile_types.png")
    ckpts = distinct_checkpoints(a)
    if ckpts.height > 1:
        made["heatmap"] = heatmap(a.arms, ckpts, a.grid.layers, len(a.grid.tasks), directory / "heatmap.png")
        if ckpts["step"].drop_nulls().len() > 1:
            made["steps"] = steps_lines(a.arms, a.grid.layers, directory / "steps.png")
    for column in preferred_metrics(metric_names(a.arms)):
        if a.arms.drop_nulls([column, "average"]).height:
            made[f"metric_{column}"] = metric_scatter(a.arms, column, directory / f"metric_{column}.png")
    if a.choice_summary.height:
        made["layer_choice"] = choice_regret(a.choice_summary, directory / "layer_choice.png")
    seconds = scoring_seconds(a.run.scores)
    if seconds.height:
        made["cost"] = cost(seconds, directory / "cost.png")
    arms = a.run.search_arms
    if a.run.search is not None and arms is not None and arms.height:
        chosen = a.run.search.get("chosen")
        made["search_heatmap"] = search_heatmap(arms, chosen, directory / "search_heatmap.png")
        if (path := search_path(arms)).height:
            layers = sorted(arms["layer"].unique().to_list())
            made["search_path"] = search_path_figure(path, layers, directory / "search_path.png")
    return made


def _figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    """Atomically (temp file + rename): a figure drawn alone, from a notebook, is never seen half-written."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _layer_ticks(ax, layers: list[int]) -> None:
    ax.set_xticks(layers, [f"{b}\nL{b + 1}" for b in layers])
    ax.set_xlabel(LAYER_AXIS, fontsize=8.5)
    if len(layers) == 1:
        ax.set_xlim(layers[0] - 1, layers[0] + 1)


def profile_average(prof: pl.DataFrame, reference: pl.DataFrame | None, revision: str, path: Path) -> Path:
    """Rule-a average per layer of one checkpoint, with the paper's values where they apply."""
    fig, ax = _figure(7.2, 4.2)
    layers = prof["layer"].to_list()
    values = 100 * prof["average"].to_numpy().astype(float)
    ax.plot(layers, values, "o-", color="black", lw=2, label=f"ours, {revision}")
    best = int(np.nanargmax(values))
    ax.scatter([layers[best]], [values[best]], s=180, facecolors="none", edgecolors="black", lw=1.5,
               label=f"best: block {layers[best]} ({values[best]:.2f})", zorder=3)  # fmt: skip
    if reference is not None and reference.height:
        ax.plot(reference["block"], reference["paper"], "D", color="crimson", ms=7,
                label="paper (Skean et al. 2025), Pythia-410m main")  # fmt: skip
    _mark_gaps(ax, layers, values)
    _layer_ticks(ax, layers)
    ax.set_ylabel(SCORE_AXIS)
    ax.set_title(f"Which layer embeds best? ({revision})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _mark_gaps(ax, layers: list[int], values: np.ndarray) -> None:
    gaps = [b for b, v in zip(layers, values, strict=True) if np.isnan(v)]
    for b in gaps:
        ax.axvspan(b - 0.4, b + 0.4, color="0.85", hatch="//", fill=False, lw=0)
    if gaps:
        ax.text(0.01, 0.02, f"hatched: {len(gaps)} layer(s) without every task yet", transform=ax.transAxes,
                fontsize=8, color="0.35")  # fmt: skip


def profile_types(prof: pl.DataFrame, columns: list[str], revision: str, path: Path) -> Path:
    """Per task type, the mean main score per layer of one checkpoint."""
    fig, ax = _figure(7.2, 4.2)
    layers = prof["layer"].to_list()
    for column in columns:
        if column in prof.columns and prof[column].drop_nulls().len():
            kind = column.removeprefix("avg_")
            ax.plot(layers, 100 * prof[column].to_numpy().astype(float), "o-", label=kind,
                    color=TYPE_COLORS.get(kind, "0.5"))  # fmt: skip
    _layer_ticks(ax, layers)
    ax.set_ylabel("mean main score ×100 over the type's tasks")
    ax.set_title(f"Layer profile per task type ({revision})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    return _save(fig, path)


def _grid(arms: pl.DataFrame, ckpts: pl.DataFrame, layers: list[int], column: str) -> np.ndarray:
    """(layers, checkpoints) matrix of `column`, NaN where an arm is missing."""
    out = np.full((len(layers), ckpts.height), np.nan)
    col = {c: j for j, c in enumerate(ckpts["checkpoint"])}
    row = {b: i for i, b in enumerate(layers)}
    for r in arms.select("checkpoint", "layer", column).iter_rows():
        if r[0] in col and r[1] in row and r[2] is not None:
            out[row[r[1]], col[r[0]]] = r[2]
    return out


def heatmap(arms: pl.DataFrame, ckpts: pl.DataFrame, layers: list[int], n_tasks: int, path: Path) -> Path:
    """Average score per (checkpoint, layer); the best layer of each checkpoint outlined; gaps hatched."""
    values = 100 * _grid(arms, ckpts, layers, "average")
    done = _grid(arms, ckpts, layers, "n_tasks")
    n_c, n_l = ckpts.height, len(layers)
    fig, ax = _figure(min(12.5, max(7.5, 3.2 + 0.55 * n_c)), min(9.0, max(3.6, 2.2 + 0.45 * n_l)))
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label=SCORE_AXIS, shrink=0.9)
    _heat_cells(ax, values, done, n_tasks, annotate=n_c <= 24 and n_l <= 16)
    step = max(1, n_c // 25)
    ax.set_xticks(range(0, n_c, step), ckpts["label"].to_list()[::step], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_l), [f"{b} (L{b + 1})" for b in layers])
    ax.set_xlabel("checkpoint (training order)")
    ax.set_ylabel("layer: block b (paper's L = b + 1)")
    ax.set_title("Average score per checkpoint × layer (outlined: each checkpoint's best)", fontsize=10)
    return _save(fig, path)


def _heat_cells(ax, values: np.ndarray, done: np.ndarray, n_tasks: int, annotate: bool) -> None:
    norm = Normalize(np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else None
    for j in range(values.shape[1]):
        column = values[:, j]
        if np.isfinite(column).all():  # a best layer only where every layer is in
            i = int(np.nanargmax(column))
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=2.5))
        for i, v in enumerate(column):
            if np.isnan(v):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", ec="0.6", lw=0))
                k = 0 if np.isnan(done[i, j]) else int(done[i, j])
                if annotate:
                    ax.text(j, i, f"{k}/{n_tasks}\ntasks", ha="center", va="center", fontsize=7, color="0.3")
            elif annotate:
                light = norm is not None and norm(v) < 0.6
                ax.text(
                    j,
                    i,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7.5,
                    color="white" if light else "black",
                )


def steps_lines(arms: pl.DataFrame, layers: list[int], path: Path) -> Path:
    """Each layer's average across training steps; the best layer at each step marked."""
    fig, ax = _figure(8.5, 4.5)
    stepped = arms.drop_nulls("step").unique(subset=["checkpoint", "layer"]).sort("step")
    colors = _layer_colors(layers)
    for b in layers:
        line = stepped.filter(pl.col("layer") == b)
        values = 100 * line["average"].to_numpy().astype(float)
        ax.plot(line["step"], values, "-", marker=".", color=colors[b], label=f"block {b} (L{b + 1})")
    best = _best_per_checkpoint(stepped)
    if best.height:
        ax.scatter(best["step"], 100 * best["average"], s=90, facecolors="none", edgecolors="black", lw=1.3,
                   zorder=3, label="best layer at that step")  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel(SCORE_AXIS)
    ax.set_title("Each layer across training (gaps: checkpoints not complete yet)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    return _save(fig, path)


def _layer_colors(layers: list[int]) -> dict[int, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    return {b: cmap(0.1 + 0.75 * i / max(1, len(layers) - 1)) for i, b in enumerate(layers)}


def _best_per_checkpoint(arms: pl.DataFrame) -> pl.DataFrame:
    complete = arms.group_by("checkpoint").agg(pl.col("average").is_not_null().all().alias("ok"))
    scored = arms.join(complete.filter("ok"), on="checkpoint").drop_nulls("average")
    return scored.sort(["average", "layer"], descending=[True, False]).unique(
        subset="checkpoint", keep="first"
    )


def metric_scatter(arms: pl.DataFrame, column: str, path: Path) -> Path:
    """One metric against the average score over all arms, coloured by layer, with ρ and τ."""
    fig, ax = _figure(5.6, 4.3)
    rows = arms.drop_nulls([column, "average"])
    layers = sorted(rows["layer"].unique().to_list())
    colors = _layer_colors(layers)
    for b in layers:
        pts = rows.filter(pl.col("layer") == b)
        ax.scatter(pts[column], 100 * pts["average"], color=colors[b], s=36, label=f"block {b} (L{b + 1})",
                   edgecolors="white", lw=0.5)  # fmt: skip
    c = correlations(arms[column].to_numpy(), arms["average"].to_numpy())
    ax.set_title(column, fontsize=11)
    fig.suptitle(_corr_text(c), fontsize=8.5, y=0.0, va="bottom", color="0.25")  # under the axes
    fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    ax.set_xlabel(f"{column} ({_unit(column)})")
    ax.set_ylabel(SCORE_AXIS)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2, loc="best")
    return _save(fig, path)


def _corr_text(c: dict) -> str:
    if c["spearman"] is None:
        return f"n = {c['n']}: too few or constant values for a correlation"
    return (f"Spearman ρ = {c['spearman']:+.2f} (p = {c['spearman_p']:.2g}),  "
            f"Kendall τ = {c['kendall']:+.2f} (p = {c['kendall_p']:.2g});  n = {c['n']} arms")  # fmt: skip


def _unit(column: str) -> str:
    if column.endswith("_max_entropy"):
        return "entropy / max entropy, 0-1"
    if column.endswith("_mi_lower_bound"):
        return "1 − loss / log N"
    return {"curvature": "radians", "effective_rank": "dimensions", "infonce": "loss, nats",
            "dime": "nats", "lidar": "nats"}.get(column, "raw")  # fmt: skip


def choice_regret(summary: pl.DataFrame, path: Path) -> Path:
    """Mean regret of each label-free strategy (lower is better), with how often it picks the best layer."""
    rows = summary.sort("mean_regret", descending=True)
    fig, ax = _figure(8.5, 1.4 + 0.3 * rows.height)
    colors = ["#e08214" if k == "baseline" else "#4575b4" for k in rows["kind"]]
    y = np.arange(rows.height)
    regret = 100 * rows["mean_regret"].to_numpy()
    ax.barh(y, regret, color=colors)
    for i, (r, hit) in enumerate(zip(regret, rows["hit_rate"], strict=True)):
        ax.text(r, i, f"  picks best {100 * hit:.0f}%", va="center", fontsize=7.5)
    ax.set_yticks(y, rows["strategy"].to_list(), fontsize=8)
    ax.set_xlabel("mean regret: best layer's average − chosen layer's (points ×100; 0 = always best)")
    ax.set_xlim(0, max(regret.max(), 1e-6) * 1.35)
    ax.set_title("Label-free layer choice per checkpoint (orange: baselines)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def cost(seconds: pl.DataFrame, path: Path) -> Path:
    """Where scoring CPU time went: seconds per task, summed over every arm."""
    rows = seconds.sort("seconds")
    fig, ax = _figure(7.5, 1.4 + 0.26 * rows.height)
    colors = [TYPE_COLORS.get(t, "0.5") for t in rows["task_type"]]
    ax.barh(rows["task"].to_list(), rows["seconds"].to_numpy(), color=colors)
    ax.set_xlabel("mteb scoring time, CPU seconds (sum over checkpoints and layers)")
    ax.set_title("Scoring cost per task (colour: task type)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def search_heatmap(arms: pl.DataFrame, chosen: dict | None, path: Path) -> Path:
    """A layer search's predicted rule-a average per (checkpoint, layer); dots: evaluated arms (exact
    values), white star: the chosen arm; hatched: not predicted yet (fewer than two arms evaluated)."""
    ckpts = arms.unique(subset="checkpoint").sort("checkpoint_order")["checkpoint"].to_list()
    layers = sorted(arms["layer"].unique().to_list())
    col, row = {c: j for j, c in enumerate(ckpts)}, {b: i for i, b in enumerate(layers)}
    values = np.full((len(layers), len(ckpts)), np.nan)
    for r in arms.iter_rows(named=True):
        if r["mean"] is not None:
            values[row[r["layer"]], col[r["checkpoint"]]] = r["mean"]
    n_c, n_l = len(ckpts), len(layers)
    fig, ax = _figure(min(12.5, max(7.5, 3.2 + 0.3 * n_c)), min(9.0, max(3.6, 2.2 + 0.3 * n_l)))
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="predicted average ×100 (rule a)", shrink=0.9)
    for j, i in np.argwhere(np.isnan(values.T)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", ec="0.6", lw=0))
    done = arms.filter(pl.col("evaluated"))
    ax.scatter([col[c] for c in done["checkpoint"]], [row[b] for b in done["layer"]], s=14, color="black",
               edgecolors="white", lw=0.6, label="evaluated (exact)")  # fmt: skip
    if chosen is not None and chosen["checkpoint"] in col and chosen["layer"] in row:
        ax.scatter([col[chosen["checkpoint"]]], [row[chosen["layer"]]], s=260, marker="*", color="white",
                   edgecolors="black", lw=1.2, zorder=3,
                   label=f"chosen: {chosen['checkpoint']}, block {chosen['layer']}")  # fmt: skip
    step = max(1, n_c // 25)
    ax.set_xticks(range(0, n_c, step), ckpts[::step], rotation=60, ha="right", fontsize=8)
    step = max(1, n_l // 24)
    ax.set_yticks(range(0, n_l, step), [f"{b} (L{b + 1})" for b in layers[::step]])
    ax.set_xlabel("checkpoint (training order)")
    ax.set_ylabel("layer: block b (paper's L = b + 1)")
    ax.set_title("Layer search: predicted score per checkpoint × layer", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.85)
    return _save(fig, path)


def search_path_figure(path_rows: pl.DataFrame, layers: list[int], path: Path) -> Path:
    """The layer search's best layer at each checkpoint (training order), filled where evaluated; the
    y axis spans the searched `layers`."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(8.5, 3.8)
    x = np.arange(path_rows.height)
    ax.plot(x, path_rows["layer"], "-", color="0.5", lw=1)
    done = path_rows["evaluated"].to_numpy()
    ax.scatter(x[done], path_rows["layer"].to_numpy()[done], color="black", s=40, label="evaluated", zorder=3)
    ax.scatter(x[~done], path_rows["layer"].to_numpy()[~done], facecolors="white", edgecolors="black", s=40,
               label="predicted", zorder=3)  # fmt: skip
    step = max(1, path_rows.height // 25)
    ax.set_xticks(x[::step], path_rows["checkpoint"].to_list()[::step], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("checkpoint (training order)")
    ax.set_ylim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("best layer: block b")
    ax.set_title("Layer search: the best layer over training (highest predicted mean)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
