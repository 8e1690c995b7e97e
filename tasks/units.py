"""The Prefect tasks of the layer-by-layer flow (docs/design.md §2): record, gpu (a checkpoint's embeddings
and metrics), score, merge. Embeddings are deleted by the flow itself (flows/layer_by_layer.py).

Each is a few lines over the library's phases (`layertime.phases`). Nothing is cached or persisted in Prefect's result
storage: the completion records under the store are the one truth for "done" (the flow reads them
before it submits anything, and merges the tables from them), so a damaged record is recomputed, a
Prefect result can never stand in for a missing one, and a store keeps working wherever it is
mounted (issue 14). Errors that cannot heal (`layertime.errors.Permanent`: a bad spec, a missing
checkpoint, NaN embeddings, a text that was never embedded) are not retried; every other error is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layertime import CODE_VERSION
from layertime.checkpoints import Checkpoint
from layertime.errors import Permanent
from layertime.phases import gpu as gpu_phase
from layertime.phases import merge as merging
from layertime.phases import record as recording
from layertime.phases import score as scoring
from layertime.phases.context import Context
from layertime.pool import ScoringPool
from layertime.rundir import RunDir
from layertime.spec import ExperimentSpec
from tasks.logs import library_to_api

# Results live in the store's completion records, never in Prefect's result storage (module doc).
NOT_CACHED = {"cache_policy": NO_CACHE, "persist_result": False}

library_to_api()  # a file the library rejects is a line of the run's log (here: any process running tasks)


@dataclass(frozen=True)
class Unit:
    """One (checkpoint, task) of a spec: small and picklable, shipped to workers."""

    ctx: Context
    checkpoint: Checkpoint
    task: str
    dataset_revision: str

    @property
    def label(self) -> str:
        return f"{self.checkpoint.revision} · {self.task}"

    def key(self) -> str:
        c = self.checkpoint
        return "|".join(
            [
                CODE_VERSION,
                self.ctx.settings.id,
                c.model,
                c.key,
                self.task,
                self.dataset_revision,
                self.ctx.spec.aggregation,
            ]
        )


def _may_heal(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may heal (I/O hiccups, preemption), never a `Permanent` error (a wrong or
    missing input: layertime/errors.py)."""
    try:
        state.result()
    except Permanent:
        return False
    except Exception:
        return True
    return True


@task(name="record", task_run_name="record[{task_name}]", retries=1, retry_condition_fn=_may_heal,
      **NOT_CACHED)  # fmt: skip
def record(task_name: str, spec: ExperimentSpec) -> tuple[str, int, int]:
    """One recording pass of `task_name` (kept in the store): (dataset revision, unique texts, requested)."""
    found = recording.task_texts(
        task_name, RunDir.of(spec.run_root, spec.store), spec.aggregation, spec.hf_cache
    )
    get_run_logger().info(
        f"{task_name}: mteb asks for {found.requested:,} texts, {len(found.texts):,} unique "
        f"(dataset revision {found.dataset_revision})"
    )
    return found.dataset_revision, len(found.texts), found.requested


@dataclass(frozen=True)
class GpuWork:
    """One checkpoint's GPU work: embed `units` (each a task of it) and, with `measure`, its metrics."""

    ctx: Context
    checkpoint: Checkpoint
    units: tuple[Unit, ...]
    measure: bool

    @property
    def label(self) -> str:
        return self.checkpoint.revision


_GPU_LOCK = threading.Lock()  # one checkpoint computes at a time on a worker's GPU


def _gpu(work: GpuWork, logger: gpu_phase.Logger = gpu_phase.log) -> gpu_phase.CheckpointDone:
    """The library's checkpoint GPU work, with this worker's GPU lock: a worker runs MODELS_PER_GPU
    checkpoints' tasks at once (flows/clusters.GPU), the next loading while this one computes. A
    unit whose error cannot heal is reported and the others go on; any other error fails the task,
    whose retry redoes only what is not on disk yet. A plain function, so the task pickles it by
    reference (the lock stays in the worker)."""
    tasks = [u.task for u in work.units]
    return gpu_phase.checkpoint_gpu_work(
        work.ctx,
        work.checkpoint,
        tasks,
        work.measure,
        gpu_lock=_GPU_LOCK,
        contain=(Permanent,),
        logger=logger,
    )


@task(name="gpu", task_run_name="gpu[{work.label}]", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_may_heal, **NOT_CACHED)  # fmt: skip
def gpu(work: GpuWork) -> gpu_phase.CheckpointDone:
    """A checkpoint's GPU work on one worker: its metrics and every task's embeddings (each unique
    text once, all layers), from one model load."""
    return _gpu(work, get_run_logger())


_POOL: list[ScoringPool] = []  # the flow process's scoring processes (local profile), while it runs
_KEPT: dict[int, ScoringPool] = {}  # pools kept warm across flow runs (keep_scoring_processes), by size


@contextlib.contextmanager
def scoring_pool(processes: int) -> Iterator[None]:
    """Score in `processes` one-thread processes of this process while the context lasts (0: in the
    calling thread). Dask threads of a local cluster submit to it; SLURM workers score in place.
    A pool of that size kept by `keep_scoring_processes` is used, and left running, if there is one."""
    if not processes:
        yield
        return
    kept = _KEPT.get(processes)
    with contextlib.nullcontext(kept) if kept else ScoringPool(processes) as pool:
        _POOL.append(pool)
        try:
            yield
        finally:
            _POOL.remove(pool)


@contextlib.contextmanager
def keep_scoring_processes(processes: int) -> Iterator[ScoringPool]:
    """Keep one pool of `processes` scoring processes for every flow run of this process that asks for
    that many while the context lasts (a notebook or a test session running many flows): each reuses
    its processes and the tasks they loaded, instead of spawning its own that import mteb again
    (~4.5 CPU-s each). A score does not depend on what its process did before (docs/guarantees.md,
    tests/test_reproducible.py). A flow run asking for another size starts a pool of its own."""
    outer = _KEPT.get(processes)  # a context around this one keeps its own again after it
    with ScoringPool(processes) as pool:
        _KEPT[processes] = pool
        try:
            yield pool
        finally:
            if outer is None:
                del _KEPT[processes]
            else:
                _KEPT[processes] = outer


def _in_scoring_process(fn: Any, *args: Any) -> Any:
    return _POOL[-1].run(fn, *args) if _POOL else fn(*args)


class Layers(tuple):
    """The layers (block indices) one score task run scores, named in the UI: L3, L20-23, L2,5."""

    @property
    def label(self) -> str:
        b = list(self)
        if len(b) > 1 and b == list(range(b[0], b[-1] + 1)):
            return f"L{b[0]}-{b[-1]}"
        return "L" + ",".join(map(str, b))


class LayersFailed(RuntimeError):
    """Layers of a score task run failed (the others were scored); `errors`: layer -> its error;
    `unembedded`: the failed layers whose embeddings were missing or rejected (the flow embeds them
    again)."""

    def __init__(self, errors: dict[int, str], unembedded: tuple[int, ...] = ()) -> None:
        super().__init__("; ".join(f"L{b}: {e}" for b, e in errors.items()))
        self.errors = errors
        self.unembedded = unembedded

    def __reduce__(self) -> tuple:  # pickled by its errors, not its message (SLURM workers ship it)
        return type(self), (self.errors, self.unembedded)


class LayersFailedPermanently(LayersFailed, Permanent):
    """Every failed layer's error is Permanent: a retry would fail the same way."""


def _layers_failed(errors: dict[int, Exception]) -> LayersFailed:
    permanent = all(isinstance(e, Permanent) for e in errors.values())
    kind = LayersFailedPermanently if permanent else LayersFailed
    unembedded = tuple(b for b, e in errors.items() if isinstance(e, scoring.MissingEmbeddings))
    return kind({b: f"{type(e).__name__}: {e}" for b, e in errors.items()}, unembedded)


@task(name="score", task_run_name="score[{unit.label} · {layers.label}]", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_may_heal, **NOT_CACHED)  # fmt: skip
def score(unit: Unit, layers: Layers, embeddings: str | None) -> dict[int, list[dict]]:
    """mteb main scores of some layers of one (checkpoint, task): layer -> rows. Each layer is an
    evaluation of its own, scored in a free scoring process and written to its completion record as
    it ends; one that fails does not stop the others, and the task then fails naming each failed
    layer (a retry reads the scored ones back from their records and scores only the rest)."""
    logger = get_run_logger()
    logger.debug(f"scoring {unit.task} {layers.label} of {unit.checkpoint.revision} from {embeddings}")
    done: dict[int, list[dict]] = {}
    errors: dict[int, Exception] = {}
    for layer in layers:
        try:
            done[layer] = _in_scoring_process(
                scoring.score_unit, unit.ctx, unit.checkpoint, unit.task, [layer],
                Path(embeddings) if embeddings else None,
            )[layer]  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- the other layers go on; the task fails below, naming it
            errors[layer] = e
    if done:  # one INFO line per score task run, with the numbers (exp2: 1,600 of them)
        logger.info("scored " + "; ".join(_scores_line(unit.task, b, rows) for b, rows in done.items()))
    if errors:
        raise _layers_failed(errors)
    return done


def _scores_line(task: str, layer: int, rows: list[dict]) -> str:
    scores = ", ".join(f"{r['subset']}/{r['split']} {r['main_score']:.4f}" for r in rows)
    return f"{task} layer {layer}: main score {scores}"


@task(name="merge", task_run_name="merge[{ctx.spec.name}]", **NOT_CACHED)
def merge(ctx: Context) -> dict[str, str]:
    """The run's tables from the completion records: every unit done, by this run or an earlier one
    (partial runs give the tables of what exists, whatever failed)."""
    paths = {name: str(path) for name, path in merging.merge(ctx).items()}
    get_run_logger().info(f"tables written: {ctx.run.tables}")
    return paths
