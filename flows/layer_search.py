"""The `layer-search` flow: find the best (checkpoint, layer) of a spec's grid without scoring all of it.

    record                          [CPU]  each task's texts, as in layer-by-layer
    stage 1: gpu(checkpoint)        [GPU]  the seven label-free metrics of every arm (the metrics pass of
                                           layer-by-layer's gpu task, no task embedded)
    stage 2, until the stop rule:   the search (layertime.search), rebuilt from the completion records,
                                    proposes a batch of whole arms; their missing (checkpoint, task)
                                    embeddings are gpu task runs, their (checkpoint, task, layer)
                                    scorings score task runs, run exactly as layer-by-layer runs them
    merge                                  the grid's tables of what exists, then artifacts in the UI

Same library, store, units and completion records as `layer-by-layer` (flows/layer_by_layer.py, whose
`Units` runs each batch): every evaluation of a search is a grid unit a later grid run reuses, and
every unit recorded is an observation the search starts from. The records are the search's one state:
before each batch the `Search` is rebuilt from them (`layertime.search.records`), so a search that was
stopped or killed resumes where its records end and never repeats an evaluation.

A (checkpoint, task)'s embeddings are kept while the search runs: it may score another layer of them
later. When it ends, those whose every layer is scored are deleted (as layer-by-layer deletes them); the
others stay for the next search or grid run, which scores from them without GPU work.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Failed

from flows.clusters import profile
from flows.guard import Guard
from flows.layer_by_layer import (
    HANDLED,
    Units,
    UnitsFailed,
    delete_scored_embeddings,
    record_tasks,
    verify_ready,
)
from flows.logs import quiet_finished_task_runs
from layertime import fastmteb
from layertime.costs import MODELS_PER_GPU
from layertime.demo.world import prepare_world
from layertime.encoder import import_model_classes
from layertime.phases import merge, score
from layertime.phases.context import Context
from layertime.plan import make_plan
from layertime.runroot import claim_run_root, write_snapshot
from layertime.search import Score, Search, Stop, report
from layertime.search import records as search_records
from layertime.spec import load_spec
from tasks import units

quiet_finished_task_runs()


class SearchStuck(RuntimeError):
    """A batch computed nothing the records did not hold: the search would propose it forever."""


@flow(name="layer-search")
def layer_search(
    spec: str = "deployments/search-demo.yaml",
    cluster: str = "local",
    overrides: dict | None = None,
    cluster_overrides: dict | None = None,
    force: bool = False,
) -> dict:
    """Search the grid of the spec at path `spec` on the `cluster` profile for its best (checkpoint,
    layer), with the spec's `search:` settings (defaults without the block); returns the chosen arm and
    the tables' paths. `overrides`, `cluster_overrides` and `force` as in layer-by-layer."""
    try:
        with Guard() as guard:  # a cancel, a signal or the worker's death stops it all (flows/guard.py)
            result, failures = _search(guard, spec, cluster, overrides, cluster_overrides, force)
        if failures:
            raise UnitsFailed(f"{len(failures)} unit(s) failed:\n" + "\n".join(failures))
    except HANDLED as e:  # a condition we name: its message, not a traceback in the worker's log
        return Failed(message=f"{type(e).__name__}: {e}", data=e)
    return result


def _search(
    guard: Guard, spec: str, cluster: str, overrides: dict | None, cluster_overrides: dict | None, force: bool
) -> tuple[dict, list[str]]:
    """The flow's work: plan, verify, measure every arm, search, merge; (the choice and tables, failures)."""
    experiment = load_spec(spec, **(overrides or {}))
    where = profile(cluster, cluster_overrides)
    prepare_world(experiment)
    verify_ready(experiment, spec)
    plan = make_plan(experiment, strict=True)
    needs = where.check_fits(plan.tasks, plan.hidden_size)  # before any GPU work
    ctx = Context.of(plan, where.device)
    guard.keep(ctx.run, ctx.settings.id, plan.units())  # what a stop says is kept
    fastmteb.mteb_unchanged()
    import_model_classes()  # before the Dask threads: transformers' lazy imports race (issue 23)
    parts = {t: where.score_parts(t) for t in plan.tasks}
    gpu_at_once = where.gpu_slots * MODELS_PER_GPU
    logger = get_run_logger()
    with ctx.run.lock(guard.label):  # a second run on the same run root is refused, naming this one
        claim_run_root(ctx.run, experiment, force)
        write_snapshot(plan, ctx.run, ctx.settings)
        delete_scored_embeddings(ctx)
        progress = _Progress()
        with where.task_runner() as runner, units.scoring_pool(where.scoring_processes):
            revisions, failures = record_tasks(runner, experiment, plan)
            if not failures and plan.spec.metrics is not None:  # stage 1: every arm's metrics
                failures += _Batch(runner, ctx, needs, progress, gpu_at_once, parts, {}, measure=True).run(
                    revisions
                )
            search = search_records.search_from(ctx)
            logger.info(
                f"{plan.spec.name}: searching {search.space.n_arms} arms ({len(search.space.checkpoints)} "
                f"checkpoints x {len(search.space.blocks)} layers) over {len(plan.tasks)} tasks; "
                f"{search.evaluations} of {report.grid_size(search)} evaluations recorded already; "
                f"features: step, depth{', ' if search.space.metric_names else ''}"
                f"{', '.join(search.space.metric_names)}"
            )
            stop, batches = _stage2(runner, ctx, needs, progress, gpu_at_once, parts, revisions, failures) if not failures else (None, 0)  # fmt: skip
            search = search_records.search_from(ctx)
            paths = runner.submit(units.merge, {"ctx": ctx}).result()
        delete_scored_embeddings(ctx)
        progress.show(search, final=True)
        result = _publish(search, stop, {**paths, **_write_report(ctx, search, stop)})
        logger.info(
            f"{batches} batch(es); {report.progress(search)[1]}; {stop.reason if stop else 'not run'}"
        )
    return result, failures


def _stage2(
    runner: Any,
    ctx: Context,
    needs: dict[str, int],
    progress: _Progress,
    gpu_at_once: int,
    parts: dict[str, int],
    revisions: dict[str, str],
    failures: list[str],
) -> tuple[Stop, int]:
    """Propose, evaluate, observe (from the records) until the stop rule or the budget says stop; a
    failed unit ends the loop (`failures` names it: the re-run retries it)."""
    logger = get_run_logger()
    batches, before, todo = 0, -1, {}
    while True:
        search = search_records.search_from(ctx)  # the records are the search's state
        if search.evaluations <= before:  # a batch that records nothing would be proposed forever
            raise SearchStuck(f"batch {batches} recorded no new evaluation: {sorted(todo)}")
        before = search.evaluations
        progress.show(search, final=True)
        stop = search.should_stop()
        if stop.stop:
            return stop, batches
        actions = search.propose()
        scorings = [a for a in actions if isinstance(a, Score)]
        if not scorings:
            return Stop(True, "nothing left to propose", stop.probability), batches
        todo = {}
        for a in scorings:
            todo.setdefault((a.checkpoint, a.task), set()).add(a.block)
        batches += 1
        arms = len({(a.checkpoint, a.block) for a in scorings})
        logger.info(
            f"batch {batches}: {len(scorings)} scoring(s) of {arms} arm(s), "
            f"{len(actions) - len(scorings)} embedding(s) proposed"
        )
        failures += _Batch(runner, ctx, needs, progress, gpu_at_once, parts, todo).run(revisions)
        if failures:
            return Stop(True, "a unit failed", stop.probability), batches


class _Batch(Units):
    """One batch of the search run as layer-by-layer runs its units: `todo` maps (revision, task) to
    the layers to score; their embeddings are computed unless the store holds them whole. With
    `measure`, each checkpoint without metrics records gets its metrics pass (stage 1).

    Embeddings are kept after scoring (the search may score another layer of them later): only the
    claim on them is released."""

    def __init__(
        self,
        runner: Any,
        ctx: Context,
        needs: dict[str, int],
        progress: _Progress,
        gpu_at_once: int,
        parts: dict[str, int],
        todo: dict[tuple[str, str], set[int]],
        measure: bool = False,
    ) -> None:
        super().__init__(runner, ctx, needs, progress, gpu_at_once, parts)
        self.todo, self.measure = todo, measure
        self.progress.total = sum(len(b) for b in todo.values())
        self.progress.scored = self.progress.failed = self.progress.embedded = self.progress.to_embed = 0

    def _plan_work(self, revisions: dict[str, str]) -> None:
        measured = merge.recorded_metrics(self.ctx) if self.measure else {}
        for ckpt in self.plan.distinct_checkpoints():
            work = []
            for task in self.plan.tasks:
                blocks = sorted(self.todo.get((ckpt.revision, task), ()))
                layers = score.missing_layers(self.ctx, ckpt, task, blocks)
                self.progress.scored += len(blocks) - len(layers)
                if layers and task not in revisions:
                    self.progress.failed += len(layers)
                elif layers:
                    self.missing[ckpt.key, task] = layers
                    unit = units.Unit(self.ctx, ckpt, task, revisions[task])
                    self.claims.take(self._embeddings(unit))
                    (self.embedded if self._kept_whole(unit, layers) else work).append(unit)
            measure = self.measure and ckpt.key not in measured
            if work or measure:
                self.waiting.append(units.GpuWork(self.ctx, ckpt, tuple(work), measure))
                self.progress.to_embed += len(work)

    def _planned(self) -> str:
        if self.measure:
            return f"stage 1: the metrics of {len(self.waiting)} checkpoint(s) to measure"
        return (
            f"{self.progress.total} scoring(s), {self.progress.scored} recorded already; "
            f"{len(self.waiting)} checkpoint(s) with GPU work, {len(self.embedded)} (checkpoint, task) "
            f"scored from embeddings kept in the store"
        )

    def _cleanup(self, unit: units.Unit) -> None:
        self.claims.release(self._embeddings(unit))
        self.cleaned["kept for the search"] += 1


class _Progress:
    """The progress artifact: budget spent and the current best after each batch, and the batch's
    scorings done while it runs (the counters `Units` keeps). Updated at most every few seconds."""

    EVERY_S = 2.0

    def __init__(self) -> None:
        self.total = self.scored = self.failed = self.embedded = self.to_embed = 0
        self.shown = 0.0
        self.percent, self.line = 0.0, "starting: the metrics of every arm"
        self.id = create_progress_artifact(0.0, key="layer-search-progress", description=self.line)

    def show(self, search: Search | None = None, final: bool = False) -> None:
        if not final and time.monotonic() - self.shown < self.EVERY_S:
            return
        self.shown = time.monotonic()
        if search is not None:
            self.percent, self.line = report.progress(search)
        text = self.line
        if self.total and search is None:
            text += f" | this batch: {self.scored}/{self.total} scored, {self.failed} failed"
            if self.to_embed:
                text += f", {self.embedded}/{self.to_embed} embedded"
        update_progress_artifact(self.id, self.percent, description=text)


def _write_report(ctx: Context, search: Search, stop: Stop | None) -> dict[str, str]:
    """The search's tables (`tables/search_arms`, `tables/search.json`) and the run's report, which
    draws its "Layer search" section from them; their paths by name."""
    from layertime.report import write_report

    out = {name: str(path) for name, path in report.write_tables(search, stop, ctx.run.tables).items()}
    try:
        out["report"] = str(write_report(ctx.run.root).html)
    except Exception as e:  # noqa: BLE001 -- a report error must not hide the search's results
        get_run_logger().warning(f"the report could not be written: {type(e).__name__}: {e}")
    return out


def _publish(search: Search, stop: Stop | None, paths: dict[str, str]) -> dict:
    """The chosen arm (markdown), every arm's posterior (table), the heatmap of predicted scores
    (markdown), the best layer's path over training and the cost against the grid (tables)."""
    create_markdown_artifact(
        report.choice_markdown(search, stop), key="layer-search-choice", description="the chosen arm"
    )
    create_table_artifact(
        report.arm_rows(search),
        key="layer-search-arms",
        description="every arm: predicted rule-a average (points), sd, tasks scored, evaluated, P(best)",
    )
    create_markdown_artifact(
        report.heatmap_markdown(search),
        key="layer-search-heatmap",
        description="predicted score by checkpoint and layer",
    )
    if path := report.path_rows(search):
        create_table_artifact(
            path, key="layer-search-path", description="the best layer's path over training (predicted)"
        )
    create_table_artifact(
        report.cost_rows(search),
        key="layer-search-cost",
        description="the search's cost against the full grid",
    )
    summary = report.summary(search, stop)  # what tables/search.json holds
    return {"chosen": summary["chosen"], "stop": summary["stop"], "spent": summary["spent"], "tables": paths}
