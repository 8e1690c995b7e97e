"""What a run costs before it runs: the measured per-task cost table, estimates per phase, a schedule.

`task_costs.csv` (package data, refreshed by `python benchmarks/scoring.py`) holds, per task of the
32-task suite, what scoring costs at d=1024 with one thread, measured warm in a long-lived scoring
process as the flow runs it: ONE layer's CPU-seconds (results written), what a score task run pays
once for loading the task (and preparing it, layertime/reranking.py), the scoring process's peak
memory, the number of processes a layer is split over (layertime/scoreparts.py: MindSmallReranking)
and the merge's CPU-seconds; and the task's unique texts and mean text length (for GPU estimates),
with the machine, mteb version and date they were measured on. After a real run, its own measured
scoring seconds can replace the table's (`measured_score_costs`, `layertime plan --costs-from`).

From it, `estimate(...)` gives CPU- and GPU-hours per phase (record, embed, measure, score) and the
memory each worker class needs, and `simulate(...)` the wall-clock time of a grid on G GPU slots and
C CPU slots. GPU time cannot be measured on a CPU machine: it is derived from FLOPs and an ASSUMED
achieved FLOP/s (`GPU_FLOPS`), and every output says so.

No Prefect or Dask here (a test asserts it): the flow reads `scoring_memory_gb` for its Dask resources.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from layertime.io import atomic_write

TABLE = Path(__file__).with_name("task_costs.csv")
COLUMNS: tuple[str, ...] = (
    "task",
    "task_type",
    "score_cpu_s",  # CPU-seconds to score one layer at `dim`, one thread
    "peak_memory_gb",  # peak resident memory (GiB) of a scoring process that scored this task alone
    "unique_texts",  # texts the embedding step forwards per checkpoint
    "requested_texts",  # texts mteb passes to encode (before deduplication)
    "mean_text_chars",
    "dim",
    "scale",  # fraction of the task's real size measured (figures above are extrapolated to 1.0)
    "machine",
    "mteb_version",
    "measured_on",
    "note",
    "parts",  # processes a layer is scored in (layertime/scoreparts.py); peak memory is a part's
    "load_cpu_s",  # CPU-seconds a score task run pays once: loading the task (its part), preparing it
    "merge_cpu_s",  # a split layer's merge (0 when parts = 1)
)
OPTIONAL: dict[str, str] = {"parts": "1", "load_cpu_s": "0", "merge_cpu_s": "0"}  # tables before them

REFERENCE_DIM = 1024  # the table's width (Pythia-410m)
MEMORY_HEADROOM = 1.25  # over the measured peak: real texts, Python overhead, allocator fragmentation
MEMORY_MARGIN_GB = 0.5
DEFAULT_MEMORY_GB = 2  # tasks not in the table (the demo's Demo* tasks are a few hundred texts)
DEFAULT_SCORE_CPU_S = 1.0  # tasks not in the table, one layer
# Tasks whose scoring process needs a big-memory job: none since MindSmallReranking is split into
# parts (layertime/scoreparts.py); `big_memory_jobs` still serve any task listed here.
BIG_MEMORY_TASKS: frozenset[str] = frozenset()
# Layers of one (checkpoint, task) that one score task run scores, one after another (the flow's
# batches, flows/layer_by_layer.py: a task run costs Prefect ~0.1 core-second whatever it does).
LAYERS_PER_SCORE_TASK = 4

# GPU assumptions (no GPU here to measure on): stated in every output that uses them.
GPU_FLOPS = 100e12  # achieved FLOP/s: an A100-class GPU in bf16 at ~1/3 of its 312 TFLOP/s peak
CHARS_PER_TOKEN = 4.0  # English text, GPT-NeoX tokenizer
CHECKPOINT_LOAD_S = 20.0  # seconds to read a checkpoint from shared storage (0.9 GB) into a GPU worker
# Checkpoints a GPU worker holds at once (flows/clusters.GPU): one computes while the next loads.
MODELS_PER_GPU = 2
PADDING = 1.10  # padded / real tokens: the encoder's batches stay under it (benchmarks/encode.py)
MEASURE_TOKENS_PER_TEXT = 128  # wikitext-103 prompts, truncated
MEASURE_PROMPTS = 472  # wikitext-103: the first 1000 lines of train, headings and short lines dropped
MEASURE_OVERHEAD = 1.5  # the metrics add up to 50% to the forward (benchmarks/metrics.py target)


@dataclass(frozen=True)
class TaskCost:
    """One row of the cost table: what scoring one layer of `task` costs."""

    task: str
    task_type: str
    score_cpu_s: float
    peak_memory_gb: float
    unique_texts: int
    requested_texts: int
    mean_text_chars: float
    dim: int
    scale: float
    machine: str
    mteb_version: str
    measured_on: str
    note: str = ""
    parts: int = 1
    load_cpu_s: float = 0.0
    merge_cpu_s: float = 0.0

    def row(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in COLUMNS}


def read_table(path: Path | str) -> dict[str, TaskCost]:
    """The cost table at `path`, by task name. A missing column or a bad number raises ValueError."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(OPTIONAL) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: cost table lacks columns {sorted(missing)}")
        out: dict[str, TaskCost] = {}
        for line, r in enumerate(reader, start=2):
            r = {**OPTIONAL, **{k: v for k, v in r.items() if v is not None}}
            try:
                out[r["task"]] = TaskCost(
                    task=r["task"],
                    task_type=r["task_type"],
                    score_cpu_s=float(r["score_cpu_s"]),
                    peak_memory_gb=float(r["peak_memory_gb"]),
                    unique_texts=int(r["unique_texts"]),
                    requested_texts=int(r["requested_texts"]),
                    mean_text_chars=float(r["mean_text_chars"]),
                    dim=int(r["dim"]),
                    scale=float(r["scale"]),
                    machine=r["machine"],
                    mteb_version=r["mteb_version"],
                    measured_on=r["measured_on"],
                    note=r["note"],
                    parts=int(r["parts"]),
                    load_cpu_s=float(r["load_cpu_s"]),
                    merge_cpu_s=float(r["merge_cpu_s"]),
                )
                if out[r["task"]].parts < 1:
                    raise ValueError(f"parts {r['parts']} < 1")
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
    return out


def write_table(rows: Sequence[TaskCost], path: Path | str = TABLE) -> None:
    """Write the cost table atomically (io.atomic_write: temp file + rename), rows in the given order."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(r.row() for r in rows)

    atomic_write(path, write)


@cache
def table() -> dict[str, TaskCost]:
    """The cost table the package ships (`layertime/task_costs.csv`)."""
    return read_table(TABLE)


def task_cost(task: str, rows: Mapping[str, TaskCost] | None = None) -> TaskCost | None:
    """`rows`' (default: the shipped table's) row for `task`, or None for a task it does not cover
    (the demo tasks)."""
    return (table() if rows is None else rows).get(task)


def score_parts(task: str) -> int:
    """Processes one layer of `task` is scored in (layertime/scoreparts.py): the table's `parts`."""
    row = task_cost(task)
    return 1 if row is None else row.parts


def scoring_memory_gb(task: str, dim: int = REFERENCE_DIM) -> int:
    """Whole GB (GiB, as SLURM's `--mem=64G`) of the Dask resource `MEM_GB` a process scoring `task` needs.

        MEM_GB = max(1, ceil(MEMORY_HEADROOM * peak * max(1, dim / 1024) + MEMORY_MARGIN_GB))

    `peak` is the measured peak resident memory of a one-thread process that scored the task (a part
    of it, for a task scored in parts) at d=1024.
    Widths above 1024 scale the whole peak (an upper bound: only embeddings and similarity matrices grow
    with d); narrower models keep the d=1024 figure. Tasks not in the table (e.g. the demo's `Demo*`
    tasks) get `DEFAULT_MEMORY_GB`.
    """
    row = task_cost(task)
    if row is None:
        return DEFAULT_MEMORY_GB
    peak = row.peak_memory_gb * max(1.0, dim / REFERENCE_DIM)
    return max(1, math.ceil(MEMORY_HEADROOM * peak + MEMORY_MARGIN_GB))


def score_cpu_seconds(
    task: str, dim: int = REFERENCE_DIM, rows: Mapping[str, TaskCost] | None = None
) -> float:
    """CPU-seconds to score one layer of `task`, warm (all its parts and its merge): the table's
    figures × dim/1024 (similarities and classifiers are linear in d); `DEFAULT_SCORE_CPU_S` for tasks
    not in the table."""
    row = task_cost(task, rows)
    if row is None:
        return DEFAULT_SCORE_CPU_S
    return (row.score_cpu_s + row.merge_cpu_s) * dim / REFERENCE_DIM


def score_runs(
    task: str, layers: int, dim: int = REFERENCE_DIM, rows: Mapping[str, TaskCost] | None = None
) -> list[ScoreBatch]:
    """The score task runs of one (checkpoint, task) with `layers` layers, as the flow submits them:
    batches of LAYERS_PER_SCORE_TASK layers scored one after another, each run paying the task's load
    once; a split task's batch is `parts` runs of its share, then the merge of its layers.

        part run  = load_cpu_s + L · score_cpu_s / parts     merge run = L · merge_cpu_s
    (× dim/1024 for the scoring terms; a task not in the table: one run of L · DEFAULT_SCORE_CPU_S)
    """
    row = task_cost(task, rows)
    scale = dim / REFERENCE_DIM
    out = []
    for start in range(0, layers, LAYERS_PER_SCORE_TASK):
        n = min(LAYERS_PER_SCORE_TASK, layers - start)
        if row is None:
            out.append(ScoreBatch((n * DEFAULT_SCORE_CPU_S,)))
            continue
        part = row.load_cpu_s + n * row.score_cpu_s * scale / row.parts
        out.append(ScoreBatch((part,) * row.parts, n * row.merge_cpu_s * scale if row.parts > 1 else 0.0))
    return out


# ---------------------------------------------------------------------------------------------- GPU model


def forward_params(num_blocks: int, hidden: int) -> int:
    """Non-embedding parameters of a GPT-NeoX-style model: 12 · L · d² (attention 4d², MLP 8d²).

    Pythia-410m: 12 · 24 · 1024² = 302M. The embedding lookup costs no FLOPs and the LM head is not run.
    """
    return 12 * num_blocks * hidden * hidden


def forward_gpu_seconds(tokens: float, params: int, flops: float = GPU_FLOPS) -> float:
    """GPU seconds of a forward pass over `tokens`: 2 · params FLOPs per token at `flops` achieved FLOP/s."""
    return tokens * 2 * params / flops


def embed_gpu_seconds(task: str, params: int, max_length: int = 2048, flops: float = GPU_FLOPS) -> float:
    """GPU seconds to embed one task's unique texts at one checkpoint (ASSUMED FLOP/s, see GPU_FLOPS).

    tokens = PADDING × unique_texts × min(max_length, mean_text_chars / CHARS_PER_TOKEN); tasks not in
    the table count 1,000 texts of 64 tokens.
    """
    row = task_cost(task)
    texts, chars = (1000, 64 * CHARS_PER_TOKEN) if row is None else (row.unique_texts, row.mean_text_chars)
    return forward_gpu_seconds(PADDING * texts * min(max_length, chars / CHARS_PER_TOKEN), params, flops)


def measured_gpu_flops(costs_csv: Path | str, params: int) -> tuple[float, str]:
    """Achieved FLOP/s of a finished run's embedding units, from its `tables/costs.csv`:

        FLOP/s = 2 · params · Σ padded_tokens / Σ seconds   (embed units that ran on a CUDA device)

    Padded tokens are what the GPU computes. `params` is the planned model's (the run is assumed to have
    embedded the same model). Returns the rate and a line saying where it comes from; a table without
    GPU embed units raises ValueError.
    """
    with open(costs_csv, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "embed" and r["device"].startswith("cuda")]
    seconds = sum(float(r["seconds"]) for r in rows)
    if not rows or seconds <= 0:
        raise ValueError(f"{costs_csv}: no embed units that ran on a GPU; cannot measure the GPU's rate")
    flops = 2 * params * sum(int(r["padded_tokens"]) for r in rows) / seconds
    devices = ", ".join(sorted({r["device"] for r in rows}))
    return (
        flops,
        f"{flops / 1e12:.1f} TFLOP/s measured over {len(rows)} embed units on {devices} ({costs_csv})",
    )


def measure_gpu_seconds(views: int, lidar_views: int, params: int, flops: float = GPU_FLOPS) -> float:
    """GPU seconds of one checkpoint's metrics pass: prompts × (1 + views + lidar_views) texts of
    MEASURE_TOKENS_PER_TEXT tokens, × MEASURE_OVERHEAD for the metrics (all ASSUMED)."""
    texts = MEASURE_PROMPTS * (1 + views + lidar_views)
    return MEASURE_OVERHEAD * forward_gpu_seconds(texts * MEASURE_TOKENS_PER_TEXT, params, flops)


# ---------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class ScoreBatch:
    """Score task runs of one batch of layers: `parts` run at once, then (after the last) the merge."""

    parts: tuple[float, ...]  # CPU-seconds of each run
    merge: float = 0.0  # CPU-seconds of the merge run; 0: none

    @property
    def seconds(self) -> float:
        return sum(self.parts) + self.merge


@dataclass(frozen=True)
class EmbedUnit:
    """GPU work that, once done, makes its scoring units available (`score_seconds`: independent runs,
    one per layer in a per-layer model; `batches`: the flow's score task runs, `ScoreBatch`).

    `group` is the model the unit runs (the checkpoint): a group's units run together on one GPU slot
    after one load of `setup_seconds` (its first unit's), as the flow's one GPU task per checkpoint
    does (tasks/units.py). A unit without a group is a group of its own.
    """

    name: str
    gpu_seconds: float  # GPU compute
    score_seconds: tuple[float, ...] = ()
    big_memory: bool = False  # its scoring units need a big-memory slot (when there are any)
    group: str | None = None
    setup_seconds: float = 0.0
    batches: tuple[ScoreBatch, ...] = ()

    def runs(self) -> list[ScoreBatch]:
        return [ScoreBatch((s,)) for s in self.score_seconds] + list(self.batches)


@dataclass(frozen=True)
class Schedule:
    """What `simulate` found. Times are seconds from the start."""

    makespan: float  # last unit done (GPU or CPU)
    gpu_makespan: float  # last GPU unit done
    gpu_held_seconds: float  # Σ_slot its last unit's end: adaptive scaling retires idle GPU jobs
    gpu_seconds: float  # GPU compute, without model loads
    setup_seconds: float  # model loads (most of them overlap another checkpoint's compute)
    cpu_seconds: float
    gpu_slots: int
    cpu_slots: int
    big_memory_slots: int

    @property
    def gpu_busy(self) -> float:
        """Computing fraction of the GPU slots while they are held: gpu_seconds / Σ_slot held."""
        return self.gpu_seconds / self.gpu_held_seconds if self.gpu_held_seconds else 0.0

    @property
    def gpu_busy_whole_run(self) -> float:
        """Computing fraction of the GPU slots if held for the whole run: gpu_seconds / (G · makespan)."""
        return self.gpu_seconds / (self.gpu_slots * self.makespan) if self.makespan else 0.0

    @property
    def cpu_busy(self) -> float:
        """Busy fraction of all scoring slots over the whole run."""
        slots = self.cpu_slots + self.big_memory_slots
        return self.cpu_seconds / (slots * self.makespan) if self.makespan else 0.0


def simulate(
    units: Sequence[EmbedUnit],
    gpu_slots: int,
    cpu_slots: int,
    big_memory_slots: int = 0,
    models_per_gpu: int = MODELS_PER_GPU,
) -> Schedule:
    """List-schedule `units` on `gpu_slots` GPU slots and `cpu_slots` one-thread scoring slots.

    GPU: each group (a checkpoint) is one job, taken in order by the slot where it can start computing
    first (ties: lowest slot). A slot holds `models_per_gpu` jobs at once: a job loads
    (`setup_seconds`) as soon as it has a place, then computes its units one after another once the
    slot's GPU is free, and gives its place back when done. A slot is held until its last unit ends.
    CPU: when a unit's GPU work ends, its score runs become ready (each batch's parts; a batch's merge
    when its last part ends); ready runs start in order of readiness (ties: submission order) on the
    scoring slot that frees first. With `big_memory_slots` > 0, runs of `big_memory` units run only on
    those slots and the others only on the `cpu_slots`; with none, every run uses the `cpu_slots`.
    GPU work never waits for scoring (embeddings go to storage), as in the flow.
    """
    if gpu_slots < 1 or cpu_slots < 1 or big_memory_slots < 0 or models_per_gpu < 1:
        raise ValueError(
            f"need >= 1 GPU and CPU slot and model per GPU, got {gpu_slots} GPU, {cpu_slots} CPU, "
            f"{big_memory_slots} big, {models_per_gpu} models per GPU"
        )
    done, held, setup = _gpu_phase(units, gpu_slots, models_per_gpu)
    ready: list[tuple[float, int, float, bool, int]] = []  # (ready, order, seconds, big, batch or -1)
    merges: list[tuple[float, bool, list[int]]] = []  # per split batch: merge seconds, big, [parts left]
    for unit, at in zip(units, done, strict=True):
        big = unit.big_memory and big_memory_slots > 0
        for batch in unit.runs():
            index = -1
            if batch.merge:
                index = len(merges)
                merges.append((batch.merge, big, [len(batch.parts)]))
            # each run its own submission order (ties in readiness: the flow's order, not the shortest)
            ready += [(at, len(ready) + i, seconds, big, index) for i, seconds in enumerate(batch.parts)]
    heapq.heapify(ready)
    pools = {False: [0.0] * cpu_slots, True: [0.0] * big_memory_slots}
    gpu_end = max(done, default=0.0)
    end, order = gpu_end, len(ready)
    last_part: dict[int, float] = {}
    while ready:
        at, _, seconds, big, batch = heapq.heappop(ready)
        pool = pools[big]
        start = max(heapq.heappop(pool), at)  # a min-heap of the slots' free times
        heapq.heappush(pool, start + seconds)
        end = max(end, start + seconds)
        if batch >= 0:  # a part: the merge is ready once every part has ended
            merge, merge_big, left = merges[batch]
            last_part[batch] = max(last_part.get(batch, 0.0), start + seconds)
            left[0] -= 1
            if not left[0]:
                heapq.heappush(ready, (last_part[batch], order, merge, merge_big, -1))
                order += 1
    return Schedule(
        makespan=end,
        gpu_makespan=gpu_end,
        gpu_held_seconds=sum(held),
        gpu_seconds=sum(u.gpu_seconds for u in units),
        setup_seconds=setup,
        cpu_seconds=sum(b.seconds for u in units for b in u.runs()),
        gpu_slots=gpu_slots,
        cpu_slots=cpu_slots,
        big_memory_slots=big_memory_slots,
    )


def _gpu_phase(
    units: Sequence[EmbedUnit], gpu_slots: int, models_per_gpu: int
) -> tuple[list[float], list[float], float]:
    """When each unit's GPU work ends, when each slot's last unit ends, and the seconds spent loading."""
    jobs: dict[object, list[int]] = defaultdict(list)  # group -> its units, in order
    for i, unit in enumerate(units):
        jobs[unit.group if unit.group is not None else ("unit", i)].append(i)
    places = [[0.0] * models_per_gpu for _ in range(gpu_slots)]  # when each place of a slot frees
    gpu_free = [0.0] * gpu_slots
    done = [0.0] * len(units)
    setup = 0.0
    for members in jobs.values():
        load = units[members[0]].setup_seconds
        starts = [max(min(places[s]) + load, gpu_free[s]) for s in range(gpu_slots)]
        slot = min(range(gpu_slots), key=lambda s: (starts[s], s))
        at = starts[slot]
        for i in members:
            at = done[i] = at + units[i].gpu_seconds
        place = places[slot].index(min(places[slot]))
        places[slot][place] = gpu_free[slot] = at
        setup += load
    return done, gpu_free, setup


# ---------------------------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Grid:
    """What an estimate needs to know about a plan (layertime.plan.Plan.cost_grid builds one)."""

    checkpoints: int  # distinct commits
    layers: int
    tasks: tuple[str, ...]
    num_blocks: int
    hidden: int
    max_length: int = 2048
    measure_views: tuple[int, int] | None = (2, 16)  # (views, lidar_views); None: no metrics


def grid_units(
    grid: Grid, flops: float = GPU_FLOPS, big_memory: bool = True, rows: Mapping[str, TaskCost] | None = None
) -> list[EmbedUnit]:
    """The grid's GPU units in the flow's order: per checkpoint (a group: one model load), its measure
    unit, then one embed unit per task, each with its score task runs (`score_runs`)."""
    params = forward_params(grid.num_blocks, grid.hidden)
    units: list[EmbedUnit] = []
    for c in range(grid.checkpoints):
        if grid.measure_views is not None:
            measure = measure_gpu_seconds(*grid.measure_views, params, flops)
            units.append(
                EmbedUnit(f"measure[{c}]", measure, group=f"checkpoint {c}", setup_seconds=CHECKPOINT_LOAD_S)
            )
        for task in grid.tasks:
            units.append(
                EmbedUnit(
                    f"embed[{c} · {task}]",
                    embed_gpu_seconds(task, params, grid.max_length, flops),
                    big_memory=big_memory and task in BIG_MEMORY_TASKS,
                    group=f"checkpoint {c}",
                    setup_seconds=CHECKPOINT_LOAD_S,
                    batches=tuple(score_runs(task, grid.layers, grid.hidden, rows)),
                )
            )
    return units


def estimate(  # noqa: PLR0913
    grid: Grid,
    gpu_jobs: int,
    cpu_jobs: int,
    big_memory_jobs: int = 0,
    flops: float = GPU_FLOPS,
    flops_source: str | None = None,
    models_per_gpu: int = MODELS_PER_GPU,
    rows: Mapping[str, TaskCost] | None = None,
    rows_source: str | None = None,
) -> dict:
    """Hours per phase, memory per worker class and the simulated wall-clock time of `grid`.

    - record (CPU, once per task): one mteb evaluation with cheap vectors ≈ one layer's scoring.
    - embed (GPU): checkpoints × Σ_task embed_gpu_seconds — at `flops`: ASSUMED, unless `flops_source`
      says where it was measured (`measured_gpu_flops`).
    - measure (GPU): checkpoints × measure_gpu_seconds — at `flops`, likewise.
    - loads (GPU slots held, GPU idle): CHECKPOINT_LOAD_S per checkpoint, read while the worker's
      other checkpoint computes (`models_per_gpu` 2, as the flow runs; 1: the GPU idles during every
      load); only the time the GPU waits for a model counts.
    - score (CPU): every score task run of the grid (`score_runs`: task loads, layers, parts, merges)
      — measured (the cost table, or `rows`: a run's own measurements, `rows_source` says which).

    Memory (whole GB): `gpu_worker` (host RAM of an embedding job), `scoring_worker` (the largest
    `scoring_memory_gb` of the tasks other than BIG_MEMORY_TASKS: for a split task, a part's),
    `big_memory_worker` (of BIG_MEMORY_TASKS; 0 when the grid has none).
    """
    params = forward_params(grid.num_blocks, grid.hidden)
    per_layer = sum(score_cpu_seconds(t, grid.hidden, rows) for t in grid.tasks)
    embed = grid.checkpoints * sum(embed_gpu_seconds(t, params, grid.max_length, flops) for t in grid.tasks)
    measure = 0.0 if grid.measure_views is None else measure_gpu_seconds(*grid.measure_views, params, flops)
    units = grid_units(grid, flops, big_memory_jobs > 0, rows)
    schedule = simulate(units, gpu_jobs, cpu_jobs, big_memory_jobs, models_per_gpu)
    big = [t for t in grid.tasks if t in BIG_MEMORY_TASKS]
    small = [t for t in grid.tasks if t not in BIG_MEMORY_TASKS]
    evaluations = grid.checkpoints * grid.layers
    return {
        "hours": {
            "record": {"cpu": per_layer / 3600, "gpu": 0.0},  # one recording pass per task
            "embed": {"cpu": 0.0, "gpu": embed / 3600},
            # the GPU waiting for a model: slots held but not computing
            "loads": {"cpu": 0.0, "gpu": (schedule.gpu_held_seconds - schedule.gpu_seconds) / 3600},
            "measure": {"cpu": 0.0, "gpu": grid.checkpoints * measure / 3600},
            "score": {"cpu": schedule.cpu_seconds / 3600, "gpu": 0.0},
        },
        "score_cpu_s_per_checkpoint_layer": per_layer,  # warm: no task loads
        "score_cpu_s_per_checkpoint_layer_with_loads": schedule.cpu_seconds / evaluations
        if evaluations
        else 0.0,
        "memory_gb": {
            "gpu_worker": gpu_worker_memory_gb(grid),
            "scoring_worker": max((scoring_memory_gb(t, grid.hidden) for t in small), default=0),
            "big_memory_worker": max((scoring_memory_gb(t, grid.hidden) for t in big), default=0),
        },
        "split": {t: score_parts(t) for t in grid.tasks if score_parts(t) > 1},
        "jobs": {"gpu": gpu_jobs, "cpu": cpu_jobs, "big_memory": big_memory_jobs},
        "wall_hours": schedule.makespan / 3600,
        "gpu_phase_hours": schedule.gpu_makespan / 3600,
        "gpu_held_hours": schedule.gpu_held_seconds / 3600,
        "gpu_busy": schedule.gpu_busy,
        "gpu_busy_whole_run": schedule.gpu_busy_whole_run,
        "assumptions": assumptions(flops, flops_source),
        "table": rows_source or table_provenance(grid.tasks),
    }


def gpu_worker_memory_gb(grid: Grid) -> int:
    """Host memory (whole GB) of an embedding worker: the fp32 weights of MODELS_PER_GPU checkpoints
    (the next loads while one computes) plus the largest task's float32 embeddings of every requested
    layer, × MEMORY_HEADROOM, + 2 GB (torch, tokenizer).

        GB = ceil(MEMORY_HEADROOM · (M · 4 · (params + vocab·d) + 4 · max_unique · layers · d) / 2³⁰ + 2)
    """
    vocab = 50_304  # GPT-NeoX's padded vocabulary: the input embedding lives in host memory too
    weights = MODELS_PER_GPU * 4 * (forward_params(grid.num_blocks, grid.hidden) + vocab * grid.hidden)
    unique = max((_unique_texts(t) for t in grid.tasks), default=0)
    embeddings = 4 * unique * grid.layers * grid.hidden
    return math.ceil(MEMORY_HEADROOM * (weights + embeddings) / 2**30 + 2)


def _unique_texts(task: str) -> int:
    row = task_cost(task)
    return 1000 if row is None else row.unique_texts


def assumptions(flops: float = GPU_FLOPS, flops_source: str | None = None) -> list[str]:
    """The assumptions behind the GPU figures, printed with them."""
    rate = f"an ASSUMED {flops / 1e12:g} TFLOP/s achieved" if flops_source is None else flops_source
    return [
        f"GPU time = FLOPs (2 × 12·L·d² per token, {CHARS_PER_TOKEN:g} chars/token, × {PADDING:g} padding) "
        f"at {rate}; "
        f"{CHECKPOINT_LOAD_S:g} s (ASSUMED) to load a checkpoint, while the GPU worker's previous one computes",
        f"metrics pass: {MEASURE_PROMPTS} prompts × (1 + views) × {MEASURE_TOKENS_PER_TEXT} tokens, "
        f"× {MEASURE_OVERHEAD:g} for the metrics (ASSUMED)",
        "CPU time is measured (task_costs.csv, one thread, d=1024, scaled linearly in d)",
    ]


def table_provenance(tasks: Sequence[str]) -> str:
    """Where the table's figures for `tasks` come from, in one line."""
    rows = [r for t in tasks if (r := task_cost(t)) is not None]
    if not rows:
        return f"no task of the plan is in the cost table: defaults ({DEFAULT_SCORE_CPU_S:g} CPU-s, {DEFAULT_MEMORY_GB} GB)"
    machines = sorted({f"{r.machine}, mteb {r.mteb_version}, {r.measured_on}" for r in rows})
    return f"{len(rows)}/{len(tasks)} tasks measured on " + "; ".join(machines)


def measured_score_costs(scores_table: Path | str, dim: int) -> tuple[dict[str, TaskCost], str]:
    """The cost table with each task's warm `score_cpu_s` replaced by a finished run's own measurement:
    the median `seconds` of its score rows for that task (mteb's evaluation time of one layer, in a
    one-thread scoring process; a split layer's is its parts' CPU-seconds), at `dim` (the run is
    assumed to have scored a model of that width), scaled to d=1024:

        score_cpu_s = median(seconds) · 1024 / dim          (and merge_cpu_s 0: the merge is in it)

    Loads, parts and memory stay the table's; tasks the run did not score keep the table's row.
    Returns the rows and a line saying where they come from; a table without score rows raises ValueError.
    """
    import statistics

    import polars as pl

    path = Path(scores_table)
    frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    if frame.is_empty() or not {"task", "seconds"} <= set(frame.columns):
        raise ValueError(f"{path}: no score rows with seconds")
    rows = dict(table())
    measured = []
    for task, seconds in frame.group_by("task").agg(pl.col("seconds")).iter_rows():
        base = rows.get(task) or TaskCost(task, "?", 0.0, DEFAULT_MEMORY_GB, 1000, 1000, 256.0, REFERENCE_DIM,
                                         1.0, "?", "?", "?")  # fmt: skip
        cpu = statistics.median(float(s) for s in seconds) * REFERENCE_DIM / dim
        rows[task] = dataclasses.replace(
            base, score_cpu_s=cpu, merge_cpu_s=0.0, note=f"measured by the run ({path})"
        )
        measured.append(task)
    return (
        rows,
        f"{len(measured)} tasks' scoring seconds measured by the run ({path}), the rest from the table",
    )
