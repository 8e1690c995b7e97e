"""The `layer-by-layer` flow: plan a spec's grid, embed and score every unit, merge the tables.

    gpu(checkpoint)                 [GPU]  one model load: representation metrics of every layer (one
                                           streamed pass), then each task's embeddings (one forward
                                           pass per unique text, all layers)
    score(checkpoint, task, layer)  [CPU]  mteb.evaluate over stored embeddings (cached across runs),
                                           submitted as soon as its checkpoint's GPU work is done
    cleanup(checkpoint, task)              embeddings deleted once every layer is scored
    merge                                  tables of DESIGN §7, then artifacts in the UI

A checkpoint's GPU work is one task, so one worker loads each model once: split per task, Dask spread
every checkpoint over every GPU and each GPU reloaded every checkpoint (benchmarks/RESULTS.md).

One failed unit never stops the others: the flow finishes what it can, writes the tables of what
exists, then fails with a summary naming each failed unit. Re-running recomputes only what failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed

from flows.clusters import GPU, profile
from flows.logs import quiet_finished_task_runs
from layertime import pipeline
from layertime.plan import Plan, make_plan
from layertime.rundir import RunDir
from layertime.spec import ExperimentSpec, load_spec
from tasks import units

quiet_finished_task_runs()  # exp2's ~8,100 "Finished in state Completed()" lines would bury the run's log


class UnitsFailed(RuntimeError):
    """Some units failed; the message names each one."""


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
    experiment = load_spec(spec, **(overrides or {}))
    where = profile(cluster, cluster_overrides)
    pipeline.prepare_world(experiment)
    _verify(experiment, spec)
    plan = make_plan(experiment, strict=True)
    needs = where.check_fits(plan.tasks, plan.hidden_size)  # before any GPU work
    settings = pipeline.Settings.of(experiment, where.device)
    run = RunDir.of(experiment.run_root, experiment.store)
    with run.lock():  # a second run on the same run root is refused, by name
        pipeline.claim_run_root(run, experiment, force)
        pipeline.write_snapshot(plan, run, settings)
        get_run_logger().info(
            f"{experiment.name}: {plan.evaluations} evaluations, {len(plan.units())} distinct units "
            f"(layers are 0-based block indices {plan.blocks})"
        )
        with where.task_runner() as runner, units.scoring_pool(where.scoring_processes):
            revisions = _record(runner, experiment, plan)
            scores, metric_rows, failures = _gpu_and_score(
                runner, experiment, plan, settings, run, revisions, needs
            )
            paths = _merge(runner, plan, settings, scores, metric_rows)
        _publish(plan, paths, failures)
    if failures:
        raise UnitsFailed(f"{len(failures)} unit(s) failed:\n" + "\n".join(failures))
    return paths


class NotReady(RuntimeError):
    """Something the run needs is missing from the cache; the message lists each item and its fix."""


def _verify(spec: ExperimentSpec, spec_path: str) -> None:
    """The checks of `layertime verify` (task data not loaded: snapshots are checked); no GPU work
    starts while anything is missing or corrupt."""
    from layertime import verify

    items = verify.verify(spec, spec_path=spec_path, load_tasks=False)
    if verify.failed(items):
        raise NotReady(
            f"not ready to run {spec.name}:\n{verify.format_table(verify.failed(items), spec_path)}"
        )
    get_run_logger().info(f"verified {len(items)} items offline: checkpoints, task data, metrics corpus")


def _cached(task: Any, policy: Any, store: Path) -> Any:
    """`task` with its results and cache keys kept in the shared store, so they outlive this run."""
    return task.with_options(cache_policy=policy(store), result_storage=store / "prefect" / "results")


def _record(runner: Any, spec: ExperimentSpec, plan: Plan) -> dict[str, str]:
    """The recording pass of every task (CPU, in parallel); task -> dataset revision."""
    store = RunDir.of(spec.run_root, spec.store).store
    record = _cached(units.record, units.record_policy, store)
    futures = {t: runner.submit(record, {"task_name": t, "spec": spec}) for t in plan.tasks}
    return {t: f.result()[0] for t, f in futures.items()}


def _gpu_and_score(runner, spec, plan, settings, run, revisions, needs) -> tuple[dict, dict, list[str]]:
    """Each checkpoint's GPU work on a GPU slot; as each ends, its layers' scoring on workers with the
    memory their task needs (`needs`: task -> MEM_GB, DESIGN §10). Already scored layers are read back."""
    score_task = _cached(units.score, units.score_policy, run.store)
    metric_rows = pipeline.recorded_metrics(plan, run, settings)
    pending: dict[Any, tuple[units.Unit, int]] = {}
    cleanups: list[Any] = []

    def submit_scores(unit: units.Unit, missing: list[int], embeddings: str | None) -> None:
        with dask.annotate(resources={"MEM_GB": needs[unit.task]}):
            futures = [
                runner.submit(
                    score_task, {"unit": unit, "layer": b, "embeddings": embeddings if b in missing else None}
                )
                for b in plan.blocks
            ]
        pending.update({f: (unit, b) for f, b in zip(futures, plan.blocks, strict=True)})
        if embeddings is not None:
            cleanups.append(runner.submit(units.cleanup, {"unit": unit}, wait_for=futures))

    missing: dict[tuple[str, str], list[int]] = {}  # (checkpoint key, task) -> layers not yet scored
    gpu_work: dict[Any, units.GpuWork] = {}
    for ckpt in plan.distinct_checkpoints():
        to_embed = []
        for task in plan.tasks:
            unit = units.Unit(
                spec, ckpt, task, revisions[task], settings, tuple(plan.blocks), plan.num_blocks
            )
            missing[ckpt.key, task] = pipeline.missing_layers(run, settings, ckpt, task, plan.blocks)
            if missing[ckpt.key, task]:
                to_embed.append(unit)
            else:
                submit_scores(unit, [], None)
        measure = spec.metrics is not None and ckpt.key not in metric_rows
        if to_embed or measure:
            work = units.GpuWork(plan, settings, ckpt, tuple(to_embed), measure)
            with dask.annotate(resources=GPU):
                gpu_work[runner.submit(units.gpu, {"work": work})] = work

    failures = []
    for future in as_completed(list(gpu_work)):
        work = gpu_work[future]
        try:
            done = future.result()
        except Exception as e:  # noqa: BLE001 -- a failed checkpoint is reported, the sweep goes on
            error = f"{type(e).__name__}: {e}"
            done = units.GpuDone({}, None, {**{u.task: error for u in work.units}, "measure": error})
        if done.metrics is not None:
            metric_rows[work.checkpoint.key] = done.metrics
        elif work.measure:
            failures.append(f"measure[{work.label}]: {done.failed.get('measure', 'not measured')}")
        for unit in work.units:
            if unit.task in done.embeddings:
                submit_scores(unit, missing[unit.checkpoint.key, unit.task], done.embeddings[unit.task])
            else:
                failures.append(f"embed[{unit.label}]: {done.failed.get(unit.task, 'not embedded')}")
    scores, score_failures = _collect(pending, cleanups)
    return scores, metric_rows, failures + score_failures


def _collect(pending: dict, cleanups: list) -> tuple[dict, list[str]]:
    """Score rows by (checkpoint, task, layer) as units finish, with a progress artifact; failures named."""
    scores: dict[tuple[str, str, int], list[dict]] = {}
    failures: list[str] = []
    progress = create_progress_artifact(0.0, key="layer-by-layer-progress", description="scored units")
    for done, future in enumerate(as_completed(list(pending)), start=1):
        unit, layer = pending[future]
        try:
            scores[(unit.checkpoint.key, unit.task, layer)] = future.result()
        except Exception as e:  # noqa: BLE001 -- a failed unit is reported, the sweep goes on
            failures.append(f"score[{unit.label} · L{layer}]: {type(e).__name__}: {e}")
        if done % max(1, len(pending) // 50) == 0 or done == len(pending):
            update_progress_artifact(
                progress, 100.0 * done / len(pending), description=f"{done}/{len(pending)} units"
            )
    for future in cleanups:
        future.wait()
    return scores, failures


def _merge(
    runner: Any, plan: Plan, settings: pipeline.Settings, scores: dict, metric_rows: dict
) -> dict[str, str]:
    parameters = {"plan": plan, "settings": settings, "rows": scores, "metric_rows": metric_rows}
    return runner.submit(units.merge, parameters).result()


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
