"""The Prefect tasks of the layer-by-layer flow (docs/design.md §2): record, gpu (a checkpoint's embeddings
and metrics), score, cleanup, merge.

Each is a few lines over `layertime.pipeline`. Cache keys name what determines a result — model,
commit, task, its dataset revision, layer, the settings that change numbers and CODE_VERSION —
never the task's source, so a comment edit keeps a day of GPU work valid. Errors that cannot heal
(a bad spec, a missing checkpoint, NaN embeddings, a text that was never embedded) are not retried.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from prefect.context import TaskRunContext

from layertime import CODE_VERSION, pipeline
from layertime.checkpoints import Checkpoint, CheckpointError
from layertime.plan import Plan
from layertime.pool import ScoringPool
from layertime.rundir import RunDir
from layertime.spec import ExperimentSpec, SpecError


@dataclass(frozen=True)
class Unit:
    """One (checkpoint, task) of a spec: small and picklable, shipped to workers."""

    spec: ExperimentSpec
    checkpoint: Checkpoint
    task: str
    dataset_revision: str
    settings: pipeline.Settings
    blocks: tuple[int, ...]
    num_blocks: int

    @property
    def label(self) -> str:
        return f"{self.checkpoint.revision} · {self.task}"

    @property
    def run(self) -> RunDir:
        return RunDir.of(self.spec.run_root, self.spec.store)

    def key(self) -> str:
        c = self.checkpoint
        return "|".join(
            [
                CODE_VERSION,
                self.settings.id,
                c.model,
                c.key,
                self.task,
                self.dataset_revision,
                self.spec.aggregation,
            ]
        )


PERMANENT = (SpecError, CheckpointError, FileNotFoundError, FloatingPointError, KeyError, ValueError)


def _not_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may heal (I/O hiccups, preemption), never a wrong input."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception:
        return True
    return True


def _score_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"score|{parameters['unit'].key()}|L{parameters['layer']}"


def _record_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    import mteb

    spec = parameters["spec"]
    return f"record|{CODE_VERSION}|{parameters['task_name']}|{spec.aggregation}|mteb-{mteb.__version__}"


def record_policy(store: Path) -> CachePolicy:
    """Recording passes cached across runs by task, aggregation rule and mteb version."""
    return CacheKeyFnPolicy(cache_key_fn=_record_key).configure(key_storage=store / "prefect" / "keys")


def score_policy(store: Path) -> CachePolicy:
    """Score results cached across runs by unit and layer, keys kept in the shared store."""
    return CacheKeyFnPolicy(cache_key_fn=_score_key).configure(key_storage=store / "prefect" / "keys")


@task(name="record", task_run_name="record[{task_name}]", retries=1, retry_condition_fn=_not_transient,
      persist_result=True)  # fmt: skip
def record(task_name: str, spec: ExperimentSpec) -> tuple[str, int, int]:
    """One recording pass of `task_name` (kept in the store): (dataset revision, unique texts, requested)."""
    found = pipeline.task_texts(
        task_name, RunDir.of(spec.run_root, spec.store), spec.aggregation, spec.hf_cache
    )
    return found.dataset_revision, len(found.texts), found.requested


@dataclass(frozen=True)
class GpuWork:
    """One checkpoint's GPU work: embed `units` (each a task of it) and, with `measure`, its metrics."""

    plan: Plan
    settings: pipeline.Settings
    checkpoint: Checkpoint
    units: tuple[Unit, ...]
    measure: bool

    @property
    def label(self) -> str:
        return self.checkpoint.revision


@dataclass(frozen=True)
class GpuDone:
    """What a checkpoint's GPU work produced: embeddings by task, metric rows, and what failed (by
    task, or "measure") with the error, for the units that cannot heal by retrying."""

    embeddings: dict[str, str]
    metrics: list[dict] | None
    failed: dict[str, str]


_GPU_LOCK = threading.Lock()  # one checkpoint computes at a time on a worker's GPU


def _gpu(work: GpuWork) -> GpuDone:
    """Measure, then embed each unit, from one model load (model loads, not scoring, idled the GPUs:
    benchmarks/RESULTS.md).

    The model is read from storage outside the lock: a worker runs two checkpoints' tasks at once
    (flows/clusters.GPU), so the next one loads while this one computes, and only the one computing
    holds the GPU. A unit whose error cannot heal is reported and the others go on; any other error
    (a full disk, a lost device) fails the task, whose retry redoes only what is not on disk yet.
    A plain function, so the task pickles it by reference (the lock stays in the worker).
    """
    blocks = pipeline.gpu_blocks(work.plan.spec, work.plan)
    encoder = pipeline.load_encoder(work.plan.spec, work.checkpoint, blocks, work.settings)
    with _GPU_LOCK:
        try:
            encoder.to_device()
            return _measure_and_embed(work, encoder)
        finally:
            del encoder  # this checkpoint's GPU memory is free before the next one moves in
            _release_gpu_memory()


def _measure_and_embed(work: GpuWork, encoder: Any) -> GpuDone:
    spec, embeddings, failed, metrics = work.plan.spec, {}, {}, None
    if work.measure:
        try:
            run = RunDir.of(spec.run_root, spec.store)
            metrics = pipeline.measure_unit(
                spec, work.plan, run, work.settings, work.checkpoint, encoder=encoder
            )
        except PERMANENT as e:
            failed["measure"] = f"{type(e).__name__}: {e}"
    for unit in work.units:
        try:
            texts = pipeline.task_texts(unit.task, unit.run, spec.aggregation, spec.hf_cache).texts
            path = pipeline.embed_unit(
                encoder, unit.run, unit.settings, unit.checkpoint, unit.task, texts, list(unit.blocks)
            )
        except PERMANENT as e:
            failed[unit.task] = f"{type(e).__name__}: {e}"
        else:
            embeddings[unit.task] = str(path)
    return GpuDone(embeddings, metrics, failed)


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@task(name="gpu", task_run_name="gpu[{work.label}]", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_not_transient)  # fmt: skip
def gpu(work: GpuWork) -> GpuDone:
    """A checkpoint's GPU work on one worker: its metrics and every task's embeddings (each unique
    text once, all layers), from one model load."""
    return _gpu(work)


_POOL: list[ScoringPool] = []  # the flow process's scoring processes (local profile), while it runs


@contextlib.contextmanager
def scoring_pool(processes: int) -> Iterator[None]:
    """Score in `processes` one-thread processes of this process while the context lasts (0: in the
    calling thread). Dask threads of a local cluster submit to it; SLURM workers score in place."""
    if not processes:
        yield
        return
    with ScoringPool(processes) as pool:
        _POOL.append(pool)
        try:
            yield
        finally:
            _POOL.remove(pool)


def _in_scoring_process(fn: Any, *args: Any) -> Any:
    return _POOL[-1].run(fn, *args) if _POOL else fn(*args)


@task(name="score", task_run_name="score[{unit.label} · L{layer}]", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_not_transient, persist_result=True, cache_result_in_memory=False)  # fmt: skip
def score(unit: Unit, layer: int, embeddings: str | None) -> list[dict]:
    """mteb main scores of one (checkpoint, task, layer); a recorded layer is read back."""
    rows = _in_scoring_process(
        pipeline.score_unit,
        unit.run, unit.settings, unit.checkpoint, unit.task, [layer],
        Path(embeddings) if embeddings else None, unit.spec.aggregation, unit.num_blocks, unit.spec.hf_cache,
        unit.spec.digest,
    )  # fmt: skip
    return rows[layer]


@task(name="cleanup", task_run_name="cleanup[{unit.label}]")
def cleanup(unit: Unit) -> bool:
    """Delete the unit's embeddings once every layer is scored (unless the spec keeps them)."""
    path = unit.run.embeddings(unit.settings.id, unit.checkpoint, unit.task)
    if unit.spec.keep_embeddings or not path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


@task(name="merge", task_run_name="merge[{plan.spec.name}]")
def merge(plan: Plan, settings: pipeline.Settings, rows: dict, metric_rows: dict) -> dict[str, str]:
    """The run's tables from the rows the flow collected (partial runs give partial tables)."""
    run = RunDir.of(plan.spec.run_root, plan.spec.store)
    return {name: str(path) for name, path in pipeline.merge(plan, run, settings, rows, metric_rows).items()}
