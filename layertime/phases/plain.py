"""Every phase in turn in this process, one checkpoint at a time: `layertime run --plain` (the flow,
flows/layer_by_layer.py, runs the same phases as Prefect tasks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layertime import claims, leftovers
from layertime.demo.world import prepare_world
from layertime.phases import gpu, merge, record, score
from layertime.phases.context import Context
from layertime.plan import make_plan
from layertime.runroot import claim_run_root, write_snapshot
from layertime.spec import ExperimentSpec

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class RunResult:
    run_root: Path
    tables: dict[str, Path]
    scored: int  # (checkpoint, task, layer) units computed now
    skipped: int  # units already done before this run
    texts_requested: int  # texts mteb asks for, per evaluation of every task once
    texts_embedded: int  # texts forwarded through the model, all checkpoints


def run_spec(
    spec: ExperimentSpec, progress: Progress | None = None, device: str | None = None, force: bool = False
) -> RunResult:
    """Run a whole spec in this process: plan, record texts, embed and score each unit, merge.

    Resumable: units with completion records are skipped; embeddings are deleted once every layer
    of their unit is scored, unless `keep_embeddings` or another run on the store still claims them
    (layertime/claims.py). A run root another code version wrote is
    refused unless `force` (`runroot.claim_run_root`).
    """
    prepare_world(spec)
    plan = make_plan(spec, strict=True)  # a missing checkpoint fails here, before any work
    ctx = Context.of(plan, device)
    with ctx.run.lock():
        claim_run_root(ctx.run, spec, force)
        return _run_locked(ctx, progress, device)


def _run_locked(ctx: Context, progress: Progress | None, device: str | None) -> RunResult:
    """One checkpoint at a time: its GPU work (`gpu.checkpoint_gpu_work`, the flow's `gpu` task), then
    the scoring of every layer it embedded; any error stops the run (the flow goes on instead)."""
    spec, plan, run, settings = ctx.spec, ctx.plan, ctx.run, ctx.settings
    write_snapshot(plan, run, settings)
    leftovers.delete_scored_embeddings(ctx)  # what a run killed between its last record and the delete left
    texts = {t: record.task_texts(t, run, spec.aggregation, spec.hf_cache) for t in plan.tasks}
    measured = merge.recorded_metrics(ctx)
    checkpoints = plan.distinct_checkpoints()
    scored = skipped = embedded = 0
    for i, ckpt in enumerate(checkpoints):
        todo = {t: score.missing_layers(ctx, ckpt, t, plan.blocks) for t in plan.tasks}
        skipped += sum(len(plan.blocks) - len(layers) for layers in todo.values())
        to_embed = [t for t in plan.tasks if todo[t]]
        measure = spec.metrics is not None and ckpt.key not in measured
        if to_embed or measure:  # load a checkpoint only when it has work left
            # Claimed while embedded and scored: another run on this store deletes nothing we need.
            with claims.Claims() as held:
                for task in to_embed:
                    held.take(run.embeddings(settings.id, ckpt, task))
                done = gpu.checkpoint_gpu_work(ctx, ckpt, to_embed, measure, device)
                for task in to_embed:
                    path = Path(done.embeddings[task])
                    embedded += len(texts[task].texts)
                    score.score_unit(ctx, ckpt, task, todo[task], path)
                    scored += len(todo[task])
                    held.release(path)
                    if not spec.keep_embeddings:
                        claims.delete_unclaimed(path)  # the last run that needs them deletes them
        if progress:
            progress("units", (i + 1) * len(plan.tasks), len(checkpoints) * len(plan.tasks))
    paths = merge.merge(ctx)
    return RunResult(run.root, paths, scored, skipped, sum(v.requested for v in texts.values()), embedded)
