"""Merge: the run's tables (docs/design.md §7) from the completion records, whoever computed them."""

from __future__ import annotations

from pathlib import Path

from layertime import records
from layertime.io import atomic_write
from layertime.phases import measure, score
from layertime.phases.context import Context


def recorded_rows(ctx: Context) -> dict[tuple[str, str, int], list[dict]]:
    """Rows of every completion record of the plan, by (checkpoint key, task, layer)."""
    plan = ctx.plan
    rows = {}
    for ckpt in plan.distinct_checkpoints():
        for task in plan.tasks:
            for block in plan.blocks:
                if (found := score.recorded(ctx, ckpt, task, block)) is not None:
                    rows[(ckpt.key, task, block)] = found
    return rows


def recorded_metrics(ctx: Context) -> dict[str, list[dict]]:
    """Metric rows of every checkpoint of the plan whose layers are all measured, by checkpoint key."""
    plan = ctx.plan
    if plan.spec.metrics is None:
        return {}
    found = {}
    for ckpt in plan.distinct_checkpoints():
        layers = [measure.recorded(ctx, ckpt, b) for b in measure.metrics_blocks(plan)]
        if all(rows is not None for rows in layers):
            found[ckpt.key] = [row for rows in layers for row in rows]
    return found


def merge(
    ctx: Context,
    rows: dict[tuple[str, str, int], list[dict]] | None = None,
    metric_rows: dict[str, list[dict]] | None = None,
) -> dict[str, Path]:
    """Write the tables from `rows` and `metric_rows` (default: the completion records).

    Revisions sharing a commit (main and step143000) share rows but both appear, under their names.
    """
    from layertime import tables

    plan, run, settings = ctx.plan, ctx.run, ctx.settings
    rows = recorded_rows(ctx) if rows is None else rows
    metric_rows = recorded_metrics(ctx) if metric_rows is None else metric_rows
    flat = [
        {**row, "revision": ckpt.revision, "step": ckpt.step}
        for ckpt in plan.checkpoints
        for task in plan.tasks
        for block in plan.blocks
        for row in rows.get((ckpt.key, task, block), [])
    ]
    scores = tables.scores_frame(flat)
    measured = tables.metrics_frame(
        [
            {**r, "revision": c.revision, "step": c.step}
            for c in plan.checkpoints
            for r in metric_rows.get(c.key, [])
        ]
    )
    out: dict[str, Path] = {}
    out["scores"] = tables.write_table(scores, run.tables, "scores")[0]
    out["metrics"] = tables.write_table(measured, run.tables, "metrics")[0]
    # A damaged cost record is removed (a cost is measured while the work is done: the table then lacks
    # its row, and a unit whose embeddings are kept writes it again from their manifest).
    costs = [
        {**cost.row(), "model": ckpt.model, "commit": ckpt.commit, "revision": ckpt.revision}
        for ckpt in plan.distinct_checkpoints()  # GPU work is per commit: counted once
        for p in run.cost_records(settings.id, ckpt)
        if (cost := records.read_cost(p)) is not None
    ]
    out["costs"] = tables.write_table(tables.costs_frame(costs), run.tables, "costs")[0]
    layers = tables.with_metrics(tables.layers_frame(scores, plan.tasks), measured)
    out["layers"] = tables.write_table(layers, run.tables, "layers")[0]
    summary = tables.summary_frame(scores, str(run.root))
    out["summary"] = atomic_write(run.tables / "summary.csv", lambda tmp: summary.write_csv(tmp))
    return out
