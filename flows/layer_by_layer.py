"""The `layer-by-layer` flow: plan a spec's grid, embed and score every unit, merge the tables.

    gpu(checkpoint)                 [GPU]  one model load: representation metrics of every layer (one
                                           streamed pass), then each task's embeddings (one forward
                                           pass per unique text, all layers)
    score(checkpoint, task, layers) [CPU]  mteb.evaluate over stored embeddings, each layer in turn
                                           (up to LAYERS_PER_SCORE_TASK of them), submitted as soon
                                           as its checkpoint's GPU work ends
    merge                                  tables of docs/design.md §7 from the completion records, then
                                           artifacts in the UI

A (checkpoint, task)'s embeddings are deleted by the flow itself, under the store's claims, once every
layer of it is scored: a file deletion is not worth a task run (exp2: 1,600 of them, ~0.1 s of
orchestration each, benchmarks/RESULTS.md). A unit with a failed layer keeps its embeddings, so the
re-run scores it without GPU work; embeddings an earlier run left of units whose layers are all
recorded (it was killed before it deleted them) are deleted when the flow starts.

A checkpoint's GPU work is one task, so one worker loads each model once: split per task, Dask spread
every checkpoint over every GPU and each GPU reloaded every checkpoint (benchmarks/RESULTS.md).

The completion records under the store are the one truth for "done": the flow reads them before it
submits anything (a unit with a valid record gets no task at all) and the tables are merged from
them, so a failure anywhere never drops rows that exist. `gpu` tasks are kept MODELS_PER_GPU per GPU
slot submitted, the next one as one ends: a `gpu` task never waits in a Dask worker's queue, where
it would hold back the scoring queued behind it.

One failed unit never stops the others: the flow finishes what it can, writes the tables of what
exists, then fails with a summary naming each failed unit. Re-running recomputes only what failed.
"""

from __future__ import annotations

import collections
import functools
import queue
import time
from pathlib import Path
from typing import Any

import dask
from distributed.client import FutureCancelledError
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Failed

from flows.clusters import GPU, ClusterError, SlurmRejected, profile
from flows.guard import Guard
from flows.logs import quiet_finished_task_runs
from layertime import claims, fastmteb, leftovers, records, scoreparts
from layertime.costs import LAYERS_PER_SCORE_TASK, MODELS_PER_GPU
from layertime.demo.world import prepare_world
from layertime.encoder import import_model_classes
from layertime.phases import merge, record, score
from layertime.phases.context import Context
from layertime.phases.gpu import CheckpointDone
from layertime.plan import Plan, make_plan
from layertime.rundir import RunInUse
from layertime.runroot import IncompatibleRun, claim_run_root, write_snapshot
from layertime.spec import ExperimentSpec, SpecError, load_spec
from tasks import units

quiet_finished_task_runs()  # exp2's ~6,500 "Finished in state Completed()" lines would bury the run's log


# Layers of one (checkpoint, task) that one score task run scores (layertime.costs.LAYERS_PER_SCORE_TASK:
# the cost model simulates the same batches), each still an evaluation of its own with its own
# completion record. A task run costs Prefect CPU whatever it does: ~60 ms in the server and its
# database alone (its states go through the server's event pipeline), plus the task engine and Dask's
# submit in the flow. One per layer made that the larger part of exp2's non-compute time at its scale;
# per 4 layers, exp2 is 1,683 task runs, not 6,483, and its scale run took 449 s instead of 937
# (benchmarks/RESULTS.md, issue 15). Not more: a layer sweep of one task still spreads over workers.


def score_batches(layers: list[int]) -> list[units.Layers]:
    """The score task runs of one (checkpoint, task): its `layers` in order, LAYERS_PER_SCORE_TASK at a time."""
    step = LAYERS_PER_SCORE_TASK
    return [units.Layers(layers[i : i + step]) for i in range(0, len(layers), step)]


class UnitsFailed(RuntimeError):
    """Some units failed; the message names each one."""


class NotReady(RuntimeError):
    """Something the run needs is missing from the cache; the message lists each item and its fix."""


# Conditions whose message says all (what failed, what to change): the flow run ends Failed with it
# (`state.result()` raises it), without Prefect's "Encountered exception" traceback in the log.
# A task the SLURM cluster's watchdog cancelled (jobs cannot run, SLURM refused them) says why, too.
HANDLED = (UnitsFailed, NotReady, ClusterError, SlurmRejected, RunInUse, IncompatibleRun, SpecError,
           FutureCancelledError)  # fmt: skip


class _FailedSteps:
    """The failed steps (parts, merge) of a split batch, read as one failed score task run: `result()`
    raises their errors together (each layer's from every step that failed it, in order)."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors

    def result(self) -> None:
        other = [e for e in self.errors if not isinstance(e, units.LayersFailed)]
        if other:  # a part that failed as a whole: every layer of the batch is named with its error
            raise other[0]
        errors: dict[int, str] = {}
        for e in self.errors:
            for layer, error in e.errors.items():
                errors[layer] = f"{errors[layer]}; {error}" if layer in errors else error
        unembedded = sorted({b for e in self.errors for b in e.unembedded})  # the flow embeds them again
        raise units.LayersFailed(errors, tuple(unembedded))


@flow(name="layer-by-layer")
def layer_by_layer(
    spec: str = "deployments/demo.yaml",
    cluster: str = "local",
    overrides: dict | None = None,
    cluster_overrides: dict | None = None,
    force: bool = False,
) -> dict:
    """Run the experiment spec at path `spec` on the `cluster` profile; returns the tables' paths.

    `overrides` replaces spec fields for this run (e.g. {"checkpoints": ["main"]}),
    `cluster_overrides` profile fields (e.g. {"partition": "a100"}). `force` lets this code version
    take over a run root that another one wrote (its units are recomputed).
    """
    try:
        with Guard() as guard:  # a cancel, a signal or the worker's death stops it all (flows/guard.py)
            paths, failures = _run(guard, spec, cluster, overrides, cluster_overrides, force)
        if failures:
            raise UnitsFailed(f"{len(failures)} unit(s) failed:\n" + "\n".join(failures))
    except HANDLED as e:  # a condition we name: its message, not a traceback in the worker's log
        return Failed(message=f"{type(e).__name__}: {e}", data=e)
    _supersede_earlier_failures()
    return paths


def _run(
    guard: Guard, spec: str, cluster: str, overrides: dict | None, cluster_overrides: dict | None, force: bool
) -> tuple[dict, list[str]]:
    """The flow's work: plan, verify, embed and score every unit not done, merge; (tables, failures)."""
    experiment = load_spec(spec, **(overrides or {}))
    where = profile(cluster, cluster_overrides)
    prepare_world(experiment)
    verify_ready(experiment, spec)
    plan = make_plan(experiment, strict=True)
    progress = _Progress(plan)  # in the UI from the start
    needs = where.check_fits(plan.tasks, plan.hidden_size)  # before any GPU work
    ctx = Context.of(plan, where.device)
    guard.keep(ctx.run, ctx.settings.id, plan.units())  # what a stop says is kept
    fastmteb.mteb_unchanged()  # the mteb guard, once, before any task thread asks for it (issue 14.3)
    import_model_classes()  # before the Dask threads: transformers' lazy imports race (issue 23)
    with ctx.run.lock(guard.label):  # a second run on the same run root is refused, naming this one
        claim_run_root(ctx.run, experiment, force)
        write_snapshot(plan, ctx.run, ctx.settings)
        delete_scored_embeddings(ctx)
        with where.task_runner() as runner, units.scoring_pool(where.scoring_processes):
            revisions, failures = record_tasks(runner, experiment, plan)
            parts = {t: where.score_parts(t) for t in plan.tasks}
            work = Units(runner, ctx, needs, progress, where.gpu_slots * MODELS_PER_GPU, parts)
            failures += work.run(revisions)
            paths = runner.submit(units.merge, {"ctx": ctx}).result()
        progress.show(final=True)
        _publish(plan, paths, failures)
    return paths, failures


def _supersede_earlier_failures() -> None:
    """After a retried flow run completed (`prefect flow-run retry`, the UI's Retry), its earlier
    attempts' Failed and Crashed task runs become Completed, named "Superseded": every unit they failed
    is done now, and the UI would otherwise count them as the run's outcome ("14 Completed, 1
    Failed"). Prefect keeps every task run of a flow run across its attempts and has no state for
    "replaced by a later attempt"; a forced state is the one way to say so, and the failure stays in
    each task run's state history."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Completed

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.run_count <= 1:
        return
    flow_run = context.flow_run
    failed = filters.TaskRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED])
    with get_client(sync_client=True) as client:
        found: list = []
        while page := client.read_task_runs(
            flow_run_filter=filters.FlowRunFilter(id=filters.FlowRunFilterId(any_=[flow_run.id])),
            task_run_filter=filters.TaskRunFilter(state=filters.TaskRunFilterState(type=failed)),
            limit=200, offset=len(found),
        ):  # fmt: skip
            found += page
        earlier = [t for t in found if t.flow_run_run_count < flow_run.run_count]
        message = f"its units are done: attempt {flow_run.run_count} of this flow run completed"
        for task_run in earlier:
            client.set_task_run_state(task_run.id, Completed(name="Superseded", message=message), force=True)
    if earlier:
        get_run_logger().info(f"{len(earlier)} failed task run(s) of earlier attempts are superseded")


def delete_scored_embeddings(ctx: Context) -> None:
    """Embeddings an earlier run left of units whose every layer is recorded (it was killed between its
    last record and the delete) are deleted now, unless another run claims them."""
    if deleted := leftovers.delete_scored_embeddings(ctx):
        get_run_logger().info(
            f"deleted the embeddings of {deleted} scored (checkpoint, task) unit(s) left by an earlier run"
        )


def verify_ready(spec: ExperimentSpec, spec_path: str) -> None:
    """The checks of `layertime verify` (task data not loaded: snapshots are checked); no GPU work
    starts while anything is missing or corrupt."""
    from layertime.hub import verify

    items = verify.verify(spec, spec_path=spec_path, load_tasks=False)
    if verify.failed(items):
        raise NotReady(
            f"not ready to run {spec.name}:\n{verify.format_table(verify.failed(items), spec_path)}"
        )
    get_run_logger().info(f"verified {len(items)} items offline: checkpoints, task data, metrics corpus")


def record_tasks(runner: Any, spec: ExperimentSpec, plan: Plan) -> tuple[dict[str, str], list[str]]:
    """The recording pass of every task (CPU, in parallel): task -> dataset revision, and the failed
    recordings named (their task's units are not computed; the others go on)."""
    futures = {t: runner.submit(units.record, {"task_name": t, "spec": spec}) for t in plan.tasks}
    revisions, failures = {}, []
    for task, future in futures.items():
        try:
            revisions[task] = future.result()[0]
        except Exception as e:  # noqa: BLE001 -- a failed unit is reported, the sweep goes on
            failures.append(f"record[{task}]: {type(e).__name__}: {e}")
    return revisions, failures


class _Progress:
    """The progress artifact: (checkpoint, task, layer) units scored of the plan's, (checkpoint, task)
    embeddings done, units failed. Shown every EVERY_S seconds while work is in flight, counting the
    layers and embeddings that running tasks have finished (their completion records and manifests),
    so it moves from the first scored layer, not only when a task run ends.

    The description is short (the UI's artifact card cut "0/80 units scored, 0 failed; 10/20 (check"):
    `scored 31/80 · embedded 12/20 · 2 failed`, at most 40 characters at exp2's size."""

    EVERY_S = 2.0

    def __init__(self, plan: Plan) -> None:
        self.total = len(plan.units())
        self.scored = self.failed = self.embedded = self.to_embed = 0
        self.shown = 0.0
        self.in_flight: Any = lambda: (0, 0)  # (layers scored, units embedded) by running tasks
        self.id = create_progress_artifact(0.0, key="layer-by-layer-progress",
                                           description=f"scored 0/{self.total} (starting)")  # fmt: skip

    def show(self, final: bool = False) -> None:
        if not final and time.monotonic() - self.shown < self.EVERY_S:
            return
        self.shown = time.monotonic()
        scored, embedded = (0, 0) if final else self.in_flight()
        scored, embedded = self.scored + scored, self.embedded + embedded
        text = progress_text(scored, self.total, embedded, self.to_embed, self.failed)
        update_progress_artifact(self.id, 100.0 * scored / max(1, self.total), description=text)


def progress_text(scored: int, total: int, embedded: int, to_embed: int, failed: int) -> str:
    """'scored 31/80 · embedded 12/20 · 2 failed' (embedded when there is GPU work, failed when any)."""
    words = [f"scored {scored}/{total}"]
    words += [f"embedded {embedded}/{to_embed}"] if to_embed else []
    words += [f"{failed} failed"] if failed else []
    return " · ".join(words)


class Units:
    """Each checkpoint's GPU work on a GPU slot, at most `gpu_at_once` submitted (MODELS_PER_GPU per
    slot), the next as one ends; as each ends, its layers' scoring on workers with the memory their
    task needs (`needs`: task -> MEM_GB, docs/design.md §10). Each task is handled as soon as it finishes.

    Only units without a valid completion record get tasks. Submitting a `gpu` task only when a slot
    is free keeps it out of the Dask worker's queue of resource-constrained tasks, where a waiting
    task holds back every one behind it, scoring included (issue 14.4); `gpu` tasks are given
    priority over the scoring queued before them, so a free slot is taken at once.
    """

    def __init__(
        self,
        runner: Any,
        ctx: Context,
        needs: dict[str, int],
        progress: _Progress,
        gpu_at_once: int,
        parts: dict[str, int] | None = None,
    ) -> None:
        self.runner, self.ctx, self.plan = runner, ctx, ctx.plan
        self.needs, self.progress, self.gpu_at_once = needs, progress, gpu_at_once
        self.waiting: collections.deque[units.GpuWork] = collections.deque()
        self.missing: dict[tuple[str, str], list[int]] = {}  # (checkpoint key, task) -> layers to score
        self.gpu_running = 0
        self.running: dict[Any, Any] = {}  # future -> what to do when it ends
        self.scoring: dict[Any, tuple[units.Unit, units.Layers]] = {}  # score future -> what it scores
        self.embedding: dict[Any, units.GpuWork] = {}  # gpu future -> its work
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.failures: list[str] = []
        self.embedded: list[units.Unit] = []  # units whose embeddings are in the store already
        self.left: dict[tuple[str, str], int] = {}  # (checkpoint key, task) -> layers still scoring
        self.unscored: set[tuple[str, str]] = set()  # (checkpoint key, task) with a failed layer
        self.unembedded: dict[tuple[str, str], list[int]] = {}  # layers whose embeddings scoring rejected
        self.embedded_again: set[tuple[str, str]] = set()  # units embedded again in this run (once each)
        self.cleaned = collections.Counter()  # what became of each scored unit's embeddings
        self.claims = claims.Claims()  # the embeddings this run needs, kept from other runs' cleanup
        self.parts = parts or {}  # task -> processes a layer of it is split over (1: whole)

    def run(self, revisions: dict[str, str]) -> list[str]:
        """Run every unit not done; the failed ones, named."""
        self._plan_work(revisions)
        get_run_logger().info(self._planned())
        self.progress.show(final=True)
        self.progress.in_flight = self._in_flight
        with self.claims:
            self._submit_gpu()
            for unit in self.embedded:
                self._submit_scores(unit, str(self._embeddings(unit)))
            while self.running:
                try:
                    future = self.finished.get(timeout=self.progress.EVERY_S)
                except queue.Empty:  # nothing ended: the progress still moves with what tasks wrote
                    self.progress.show()
                    continue
                self.scoring.pop(future, None)
                self.embedding.pop(future, None)
                self.running.pop(future)(future)
                self._submit_gpu()
                self.progress.show()
        if self.cleaned:
            get_run_logger().info(
                "embeddings of the scored (checkpoint, task) units: "
                + ", ".join(f"{n} {what}" for what, n in sorted(self.cleaned.items()))
            )
        return self.failures

    def _planned(self) -> str:
        """The log line saying what this run of units has to do."""
        return (
            f"{self.plan.spec.name}: {self.plan.evaluations} evaluations, {self.progress.total} distinct "
            f"units, {self.progress.scored} done (completion records), {len(self.waiting)} checkpoint(s) "
            f"with GPU work, {len(self.embedded)} (checkpoint, task) embedded already (layers are 0-based "
            f"block indices {self.plan.blocks})"
        )

    def _embeddings(self, unit: units.Unit) -> Path:
        return self.ctx.run.embeddings(self.ctx.settings.id, unit.checkpoint, unit.task)

    IN_FLIGHT_CHECKED = 512  # task runs whose files one progress update looks at (stats on a shared FS)

    def _in_flight(self) -> tuple[int, int]:
        """(layers, (checkpoint, task) embeddings) that running task runs have finished: their
        completion records and manifests, written last. The oldest task runs first, at most
        IN_FLIGHT_CHECKED of them (exp2 can have hundreds queued)."""
        scoring = list(self.scoring.values())[: self.IN_FLIGHT_CHECKED]
        scored = sum(
            self.ctx.run.score_record(self.ctx.settings.id, unit.checkpoint, unit.task, layer).is_file()
            for unit, layers in scoring
            for layer in layers
        )
        embedding = [u for work in self.embedding.values() for u in work.units][: self.IN_FLIGHT_CHECKED]
        embedded = sum((self._embeddings(u) / "done.json").is_file() for u in embedding)
        return scored, embedded

    def _plan_work(self, revisions: dict[str, str]) -> None:
        """What is not done: the layers without a valid record (a damaged one is removed), and each
        checkpoint's GPU work for them and its metrics. Units of a task whose recording failed count
        as failed."""
        spec, plan = self.plan.spec, self.plan
        measured = merge.recorded_metrics(self.ctx)
        for ckpt in plan.distinct_checkpoints():
            todo = []
            for task in plan.tasks:
                layers = score.missing_layers(self.ctx, ckpt, task, plan.blocks)
                self.progress.scored += len(plan.blocks) - len(layers)
                if layers and task not in revisions:
                    self.progress.failed += len(layers)
                elif layers:
                    self.missing[ckpt.key, task] = layers
                    unit = units.Unit(self.ctx, ckpt, task, revisions[task])
                    self.claims.take(self._embeddings(unit))  # before any GPU work looks at the store
                    # Kept by a run whose scoring of them failed: scored again without GPU work,
                    # once checked whole (a rejected file sends the unit to GPU work, which logs it).
                    (self.embedded if self._kept_whole(unit, layers) else todo).append(unit)
            measure = spec.metrics is not None and ckpt.key not in measured
            if todo or measure:
                self.waiting.append(units.GpuWork(self.ctx, ckpt, tuple(todo), measure))
                self.progress.to_embed += len(todo)

    def _kept_whole(self, unit: units.Unit, layers: list[int]) -> bool:
        """True when the unit's kept embeddings hold `layers`, every file checked against its manifest
        and the unit's texts (records.check_embeddings), so its scoring needs no GPU work."""
        path = self._embeddings(unit)
        if not (path / "done.json").is_file():
            return False
        spec = self.plan.spec
        texts = record.task_texts(unit.task, self.ctx.run, spec.aggregation, spec.hf_cache).texts
        ask = records.EmbeddingsAsk.of(unit.checkpoint.model, unit.checkpoint.commit, unit.task, texts)
        return records.check_embeddings(path, ask).holds(layers)

    def _watch(self, future: Any, then: Any) -> None:
        self.running[future] = then
        future.add_done_callback(self.finished.put)

    def _submit_gpu(self) -> None:
        while self.waiting and self.gpu_running < self.gpu_at_once:
            work = self.waiting.popleft()
            with dask.annotate(resources=GPU, priority=1):
                future = self.runner.submit(units.gpu, {"work": work})
            self.gpu_running += 1
            self.embedding[future] = work
            self._watch(future, functools.partial(self._gpu_done, work))

    def _gpu_done(self, work: units.GpuWork, future: Any) -> None:
        self.gpu_running -= 1
        try:
            done = future.result()
        except Exception as e:  # noqa: BLE001 -- a failed checkpoint is reported, the sweep goes on
            error = f"{type(e).__name__}: {e}"
            done = CheckpointDone({}, None, {**{u.task: error for u in work.units}, "measure": error})
        if work.measure and done.metrics is None:
            self.failures.append(f"measure[{work.label}]: {done.failed.get('measure', 'not measured')}")
        for unit in work.units:
            if unit.task in done.embeddings:
                self.progress.embedded += 1
                self._submit_scores(unit, done.embeddings[unit.task])
            else:
                self.claims.release(self._embeddings(unit))
                self.failures.append(f"embed[{unit.label}]: {done.failed.get(unit.task, 'not embedded')}")
                self.progress.failed += len(self.missing[unit.checkpoint.key, unit.task])

    def _submit_scores(self, unit: units.Unit, embeddings: str) -> None:
        batches = score_batches(self.missing[unit.checkpoint.key, unit.task])
        self.left[unit.checkpoint.key, unit.task] = len(batches)
        parts = self.parts.get(unit.task, 1)
        for layers in batches:
            if parts == 1:
                self._submit_score(unit, layers, embeddings, units.WHOLE, self._score_done)
            else:  # each part (layertime/scoreparts.py); when all have ended, the merge
                batch = {"left": parts, "failed": []}
                done = functools.partial(self._part_done, batch=batch, embeddings=embeddings)
                for part in range(parts):
                    self._submit_score(unit, layers, embeddings, units.Part((part, parts)), done)

    def _submit_score(
        self, unit: units.Unit, layers: units.Layers, embeddings: str, part: units.Part, then: Any
    ) -> None:
        with dask.annotate(resources={"MEM_GB": self.needs[unit.task]}):
            future = self.runner.submit(
                units.score, {"unit": unit, "layers": layers, "embeddings": embeddings, "part": part}
            )
        if part == units.WHOLE or part[0] == scoreparts.MERGE:  # the steps that write its records
            self.scoring[future] = (unit, layers)
        self._watch(future, lambda f: then(unit, layers, f))

    def _part_done(
        self, unit: units.Unit, layers: units.Layers, future: Any, batch: dict, embeddings: str
    ) -> None:
        """A part of a split batch ended; after the last, the merge: it records each layer whose parts
        are all there and names the others (with their parts' errors, `_merge_done`)."""
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 -- reported with the merge's outcome
            batch["failed"].append(e)
        batch["left"] -= 1
        if not batch["left"]:
            merge = units.Part((scoreparts.MERGE, self.parts[unit.task]))
            then = functools.partial(self._merge_done, failed_parts=batch["failed"])
            self._submit_score(unit, layers, embeddings, merge, then)

    def _merge_done(self, unit: units.Unit, layers: units.Layers, future: Any, failed_parts: list) -> None:
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 -- each layer named with its parts' and the merge's errors
            self._score_done(unit, layers, _FailedSteps([*failed_parts, e]))
        else:
            self._score_done(unit, layers, future)

    def _score_done(self, unit: units.Unit, layers: units.Layers, future: Any) -> None:
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 -- a failed unit is reported, the sweep goes on
            # The records say which layers were scored (a task that crashed may have scored some).
            key = (unit.checkpoint.key, unit.task)
            failed = score.missing_layers(self.ctx, unit.checkpoint, unit.task, list(layers))
            errors = e.errors if isinstance(e, units.LayersFailed) else {}
            # Embeddings rejected when scored: embedded again in this run (once per unit).
            again = (
                [] if key in self.embedded_again else [b for b in failed if b in getattr(e, "unembedded", ())]
            )
            self.unembedded.setdefault(key, []).extend(again)
            for layer in failed:
                if layer not in again:
                    error = errors.get(layer, f"{type(e).__name__}: {e}")
                    self.failures.append(f"score[{unit.label} · L{layer}]: {error}")
            self.progress.failed += len(failed) - len(again)
            self.progress.scored += len(layers) - len(failed)
            # Embeddings kept for the re-run only if a layer lacks its record (a task run can also
            # fail after its last record is written: then there is nothing to re-run).
            if len(failed) > len(again):
                self.unscored.add(key)
        else:
            self.progress.scored += len(layers)
        self.left[unit.checkpoint.key, unit.task] -= 1
        if not self.left[unit.checkpoint.key, unit.task]:
            if self.unembedded.get((unit.checkpoint.key, unit.task)):
                self._embed_again(unit)
            else:
                self._cleanup(unit)

    def _embed_again(self, unit: units.Unit) -> None:
        """Scoring rejected the unit's embeddings (changed since they were checked): its GPU work is
        queued again for those layers, its claim still held; its scoring follows as usual."""
        key = (unit.checkpoint.key, unit.task)
        self.missing[key] = sorted(self.unembedded.pop(key))
        self.embedded_again.add(key)
        get_run_logger().warning(
            f"{unit.label}: embeddings of layers {self.missing[key]} rejected when scored; embedding them again"
        )
        self.waiting.append(units.GpuWork(self.ctx, unit.checkpoint, (unit,), False))
        self.progress.to_embed += 1

    def _cleanup(self, unit: units.Unit) -> None:
        """The unit's last layer is done: release its claim, then delete its embeddings unless the
        spec keeps them, a layer failed (the re-run scores it from them) or another run claims them."""
        path = self._embeddings(unit)
        # Released first: the embeddings are deleted only if no run (this one included) claims them.
        self.claims.release(path)
        if self.plan.spec.keep_embeddings:
            self.cleaned["kept (keep_embeddings)"] += 1
        elif (unit.checkpoint.key, unit.task) in self.unscored:
            self.cleaned["kept for the re-run (a layer failed)"] += 1
        else:
            try:
                deleted = claims.delete_unclaimed(path)
            except OSError as e:  # a disk cost, never a lost unit: the run goes on, the log says where
                get_run_logger().warning(f"embeddings of {unit.label} not deleted ({path}): {e}")
                self.cleaned["not deleted (error, logged)"] += 1
            else:
                self.cleaned["deleted" if deleted else "kept (claimed by another run)"] += 1


def _publish(plan: Plan, paths: dict[str, str], failures: list[str]) -> None:
    """The report (HTML beside the tables) and its summary, key numbers and paths as UI artifacts."""
    import polars as pl

    from layertime.report import write_report

    logger = get_run_logger()
    layers = pl.read_parquet(paths["layers"]).select(
        "revision", "layer", "hidden_state", "n_tasks", "average"
    )
    create_table_artifact(layers.to_dicts(), key="layer-averages",
                          description=f"{plan.spec.name}: rule-a average per checkpoint and layer (layer = block index)")  # fmt: skip
    lines = [f"# {plan.spec.name}", "", f"{plan.evaluations} evaluations; tables:", ""]
    lines += [f"- **{name}**: `{Path(path).resolve()}`" for name, path in paths.items()]
    try:
        report = write_report(Path(plan.spec.run_root), failures=failures)
    except Exception as e:  # noqa: BLE001 -- a report error must not hide the results themselves
        logger.warning(f"the report could not be written: {type(e).__name__}: {e}")
    else:
        lines.append(f"- **report**: `{report.html.resolve()}`")
        create_markdown_artifact(
            report.markdown, key="layer-by-layer-report", description=f"report: {report.html}"
        )
        if report.table:
            create_table_artifact(report.table, key="layer-by-layer-key-numbers",
                                  description="per checkpoint: best layer, last layer, oracle average (x100, rule a)")  # fmt: skip
    create_markdown_artifact(
        "\n".join(lines), key="layer-by-layer-tables", description="where the tables are"
    )
