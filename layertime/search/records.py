"""A layer search from a run root's completion records: the grid flow's units are the search's observations.

`known(ctx)` reads what the store holds for the plan — every (checkpoint, task, layer) score record,
every (checkpoint, task) embedding cost record, every layer's metrics — and `search_from(ctx, known)`
builds the `SearchSpace` and a `Search` that has observed all of it. A search that stopped or failed
is rebuilt the same way and never proposes an evaluation that has a record.

Costs. An arm's expected cost is per task: scoring one layer costs the median of that task's measured
scoring seconds in the records (`costs.score_cpu_seconds` while none is measured), embedding one
checkpoint's task the median measured embedding seconds (`costs.embed_gpu_seconds` while none is).
The budget counts every evaluation recorded under the run root, whoever made it (a grid run, an
earlier search): a search restarted from its records resumes with what it already spent, not with a
fresh budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import median

from layertime import costs, records
from layertime.phases import measure, score
from layertime.phases.context import Context
from layertime.search.search import Search
from layertime.search.space import METRIC_NORMALIZATION, SearchSpace


@dataclass
class Known:
    """What the store holds for a plan, by arm name (the checkpoint's revision) and block.

    `scores[(revision, task, block)]`: the rule-(a) task score (mean of its subsets' main scores, 0-1)
    and its measured scoring seconds; `embedded[(revision, task)]`: measured embedding seconds;
    `metrics[(revision, block)]`: {metric: value}.
    """

    scores: dict[tuple[str, str, int], tuple[float, float]] = field(default_factory=dict)
    embedded: dict[tuple[str, str], float] = field(default_factory=dict)
    metrics: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)


def task_score(rows: Iterable[dict]) -> tuple[float, float]:
    """(score, seconds) of one (checkpoint, task, layer) record: the mean of its subsets' main scores
    (rule a, as `tables.task_scores`) and the sum of their scoring seconds."""
    rows = list(rows)
    if not rows:
        raise ValueError("a score record without rows")
    mean = sum(float(r["main_score"]) for r in rows) / len(rows)
    return mean, sum(float(r.get("seconds") or 0.0) for r in rows)


def known(ctx: Context) -> Known:
    """Every record of the plan's grid: scores, embedding costs and (with a metrics spec) metrics."""
    plan, out = ctx.plan, Known()
    for ckpt in plan.distinct_checkpoints():
        for task in plan.tasks:
            for block in plan.blocks:
                if (rows := score.recorded(ctx, ckpt, task, block)) is not None:
                    out.scores[ckpt.revision, task, block] = task_score(rows)
            cost = ctx.run.cost_record(ctx.settings.id, ckpt, f"embed__{task}")
            if cost.exists() and (found := records.read_cost(cost)) is not None:
                out.embedded[ckpt.revision, task] = found.seconds
        if plan.spec.metrics is not None:
            for block in plan.blocks:
                for row in measure.recorded(ctx, ckpt, block) or []:
                    if METRIC_NORMALIZATION.get(row["metric"]) == row["normalization"] and _finite(
                        row["value"]
                    ):
                        out.metrics.setdefault((ckpt.revision, block), {})[row["metric"]] = float(
                            row["value"]
                        )
    return out


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def space_of(ctx: Context, found: Known) -> SearchSpace:
    """The plan's grid as a search space: its distinct checkpoints (by revision, ordered by step; a
    revision without a step, such as `main` alone, counts as the last), blocks, tasks, expected costs
    (module doc) and the metrics found (a metric missing for some arm is not a feature)."""
    plan = ctx.plan
    ckpts = plan.distinct_checkpoints()
    last = max((c.step or 0 for c in ckpts), default=0) + 1
    dim = plan.hidden_size or costs.REFERENCE_DIM
    params = costs.forward_params(plan.num_blocks or 24, dim)
    score_s, embed_s = {}, {}
    for task in plan.tasks:
        measured = [s for (_, t, _), (_, s) in found.scores.items() if t == task and s > 0]
        score_s[task] = median(measured) if measured else costs.score_cpu_seconds(task, dim)
        embedded = [s for (_, t), s in found.embedded.items() if t == task and s > 0]
        embed_s[task] = (
            median(embedded) if embedded else costs.embed_gpu_seconds(task, params, plan.spec.max_length)
        )
    return SearchSpace.build(
        [(c.revision, c.step if c.step is not None else last) for c in ckpts],
        plan.blocks,
        plan.num_blocks or max(plan.blocks) + 1,
        plan.tasks,
        score_s,
        embed_s,
        found.metrics or None,
    )


def search_from(ctx: Context, found: Known | None = None) -> Search:
    """A `Search` over the plan's grid with the spec's `search:` settings (defaults without one), having
    observed every recorded embedding and score at its measured cost (module doc)."""
    found = known(ctx) if found is None else found
    search = Search(space_of(ctx, found), ctx.spec.search)
    for (revision, task), seconds in sorted(found.embedded.items()):
        search.observe_embedding(revision, task, seconds)
    for (revision, task, block), (value, seconds) in sorted(found.scores.items()):
        search.observe(revision, task, block, value, seconds)
    return search
