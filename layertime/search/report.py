"""What a layer search shows its user, as plain data: progress, the chosen arm, every arm's posterior,
and what was spent against the full grid (the `layer-search` flow publishes them as Prefect artifacts,
flows/layer_search.py). Scores are in points (mteb's 0-100 scale), costs in hours.

`write_tables` also leaves the search's state in the run root's `tables/` (`search_arms` and
`search.json`), where the run's report (`layertime.report`) draws its "Layer search" section from."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from layertime.io import atomic_write_text
from layertime.search.search import Search, Stop
from layertime.tables import write_table


def grid_size(search: Search) -> int:
    """(checkpoint, task, layer) evaluations of the full grid."""
    return search.space.n_arms * len(search.space.tasks)


def spent(search: Search) -> dict[str, float]:
    """Evaluations known and their cost, beside the full grid's expected cost (CPU-h, GPU-h)."""
    grid_cpu_s, grid_gpu_s = search.space.grid_cost()
    return {
        "evaluations": search.evaluations,
        "grid_evaluations": grid_size(search),
        "cpu_h": search.spent_cpu_s / 3600,
        "grid_cpu_h": grid_cpu_s / 3600,
        "gpu_h": search.spent_gpu_s / 3600,
        "grid_gpu_h": grid_gpu_s / 3600,
    }


def progress(search: Search) -> tuple[float, str]:
    """(percent, one line): budget spent (the share of the tightest budget, else of the grid's scoring
    CPU) and the current best arm."""
    s, settings = spent(search), search.settings
    shares = []
    if settings.budget_cpu_h:
        shares.append(s["cpu_h"] / settings.budget_cpu_h)
    if settings.budget_gpu_h:
        shares.append(s["gpu_h"] / settings.budget_gpu_h)
    if not shares:
        shares.append(s["cpu_h"] / s["grid_cpu_h"] if s["grid_cpu_h"] else 0.0)
    line = (
        f"{s['evaluations']}/{s['grid_evaluations']} evaluations, {s['cpu_h']:.3g} CPU-h"
        f"{_of(settings.budget_cpu_h)}, {s['gpu_h']:.3g} GPU-h{_of(settings.budget_gpu_h)}"
    )
    choice = search.chosen()
    if choice is None:
        line += "; no arm evaluated yet"
    else:
        line += (
            f"; best so far {choice.arm.checkpoint} layer {choice.arm.block}: {choice.value:.2f} "
            f"(P within {settings.epsilon:g} points = {choice.probability:.2f})"
        )
    return min(100.0, 100.0 * max(shares)), line


def _of(budget: float | None) -> str:
    return f" of {budget:g}" if budget else ""


def choice_markdown(search: Search, stop: Stop | None = None) -> str:
    """The chosen arm with its credible interval, why the search stopped, and what it cost."""
    choice, s = search.chosen(), spent(search)
    lines = ["# Layer search"]
    if choice is None:
        lines += ["", "No arm was evaluated on every task: no choice."]
    else:
        lines += [
            "",
            f"**Chosen: {choice.arm.checkpoint}, layer {choice.arm.block}** (block index; step "
            f"{choice.arm.step}): rule-(a) average **{choice.value:.2f}** points over "
            f"{len(search.space.tasks)} tasks.",
            "",
            f"With posterior probability 0.95 the best arm of the grid scores at most "
            f"{choice.best_upper:.2f} (credible interval of the best: [{choice.value:.2f}, "
            f"{choice.best_upper:.2f}]); P(best within {search.settings.epsilon:g} points of the chosen "
            f"arm) = {choice.probability:.3f}.",
        ]
    if stop is not None:
        lines += ["", f"Stopped: {stop.reason or 'not stopped'}."]
    lines += ["", "| | search | full grid | share |", "|---|---|---|---|"]
    for name, unit in (("evaluations", ""), ("cpu_h", " CPU-h"), ("gpu_h", " GPU-h")):
        mine, grid = s[name], s[f"grid_{name}"]
        share = f"{100 * mine / grid:.1f}%" if grid else "-"
        lines.append(f"| {name.split('_')[0]}{unit} | {mine:.4g} | {grid:.4g} | {share} |")
    return "\n".join(lines)


def arm_rows(search: Search) -> list[dict]:
    """One row per arm: checkpoint, step, layer, predicted mean and sd (points; exact where evaluated),
    tasks scored, evaluated, P(best). Means and sds are None before the model is fitted."""
    rows = search.posterior().rows()
    for row in rows:
        for key in ("mean", "sd", "p_best"):
            value = row[key]
            row[key] = None if value != value else round(value, 4)  # NaN: not predicted yet
    return rows


def cost_rows(search: Search) -> list[dict]:
    """The search's evaluations and cost against the full grid's, one row each."""
    s = spent(search)
    return [
        {
            "what": name,
            "search": round(s[name], 6),
            "full_grid": round(s[f"grid_{name}"], 6),
            "share": round(s[name] / s[f"grid_{name}"], 6) if s[f"grid_{name}"] else None,
        }
        for name in ("evaluations", "cpu_h", "gpu_h")
    ]


def path_rows(search: Search) -> list[dict]:
    """The best layer's path over training: per checkpoint (in training order), the layer with the
    highest predicted mean, its mean and sd, and whether that arm was evaluated. Empty before the model
    predicts every arm (fewer than two arms evaluated)."""
    rows = arm_rows(search)
    if any(r["mean"] is None for r in rows):
        return []
    out: list[dict] = []
    for checkpoint in search.space.checkpoints:
        best = max((r for r in rows if r["checkpoint"] == checkpoint), key=lambda r: r["mean"])
        out.append({k: best[k] for k in ("checkpoint", "step", "layer", "mean", "sd", "evaluated")})
    return out


def heatmap_markdown(search: Search) -> str:
    """A checkpoint x layer table of predicted rule-(a) averages (points), evaluated arms marked `*`
    (exact), the chosen arm in bold; `?` where the model does not predict yet."""
    rows = {(r["checkpoint"], r["layer"]): r for r in arm_rows(search)}
    choice = search.chosen()
    chosen = None if choice is None else (choice.arm.checkpoint, choice.arm.block)
    blocks = search.space.blocks
    lines = [
        "Predicted rule-(a) average (points) by checkpoint and layer; `*` evaluated (exact), **bold** chosen.",
        "",
        "| checkpoint | " + " | ".join(f"L{b}" for b in blocks) + " |",
        "|---|" + "---|" * len(blocks),
    ]
    for checkpoint in search.space.checkpoints:
        cells = []
        for b in blocks:
            r = rows[checkpoint, b]
            cell = "?" if r["mean"] is None else f"{r['mean']:.1f}" + ("*" if r["evaluated"] else "")
            cells.append(f"**{cell}**" if (checkpoint, b) == chosen else cell)
        lines.append(f"| {checkpoint} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ARM_SCHEMA = {
    "checkpoint": pl.String, "step": pl.Int64, "checkpoint_order": pl.Int64, "layer": pl.Int64,
    "mean": pl.Float64, "sd": pl.Float64, "n_tasks": pl.Int64, "evaluated": pl.Boolean,
    "p_best": pl.Float64,
}  # fmt: skip


def arms_frame(search: Search) -> pl.DataFrame:
    """`arm_rows` as a typed table in training order: `checkpoint_order` is the checkpoint's index in
    training order, `layer` the 0-based block index; `mean`, `sd` in points (null before the model)."""
    order = {c: i for i, c in enumerate(search.space.checkpoints)}
    rows = [{**r, "checkpoint_order": order[r["checkpoint"]]} for r in arm_rows(search)]
    frame = pl.DataFrame([{c: r.get(c) for c in ARM_SCHEMA} for r in rows], schema=ARM_SCHEMA)
    return frame.sort(["checkpoint_order", "layer"])


def summary(search: Search, stop: Stop | None = None) -> dict:
    """The chosen arm (None before any arm has every task), the settings, why it stopped, and what
    it spent against the full grid: the content of `tables/search.json`."""
    choice = search.chosen()
    return {
        "chosen": None
        if choice is None
        else {
            "checkpoint": choice.arm.checkpoint,
            "step": choice.arm.step,
            "layer": choice.arm.block,
            "value": choice.value,
            "best_upper": choice.best_upper,
            "probability": choice.probability,
        },
        "epsilon": search.settings.epsilon,
        "confidence": search.settings.confidence,
        "tasks": list(search.space.tasks),
        "stop": None if stop is None else stop.reason,
        "spent": spent(search),
    }


def write_tables(search: Search, stop: Stop | None, directory: Path) -> dict[str, Path]:
    """Write `search_arms.parquet` and `.csv` (every arm, `arms_frame`) and `search.json` (`summary`)
    into `directory` (the run root's `tables/`), each atomically; returns their paths by name."""
    directory = Path(directory)
    parquet, csv = write_table(arms_frame(search), directory, "search_arms")
    text = json.dumps(summary(search, stop), indent=2) + "\n"
    return {
        "search_arms": parquet,
        "search_arms_csv": csv,
        "search": atomic_write_text(directory / "search.json", text),
    }
