"""Replaying a search on a grid whose every cell is known: the grid, an oracle that counts, the loop.

A `Grid` is a finished full grid — every (checkpoint, task, layer) score, what each scoring and each
embedding cost, and the label-free metrics of every arm — read from a run root's tables
(`grid_from_run`: `tables/scores.parquet`, `metrics.parquet`, `costs.parquet`) or built in code (tests).
An `Oracle` answers only what it is asked (an embedding, then scorings of what was embedded) and counts
it: evaluations, scoring CPU-seconds and embedding GPU-seconds, as measured in the run. `replay`
drives a `Search` against an oracle and records, after every batch, what the search would answer if
it stopped there (its chosen arm and that arm's true regret).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layertime.search.search import POINTS, Embed, Score, Search
from layertime.search.space import METRIC_NORMALIZATION, SearchSpace
from layertime.spec import SearchSpec


@dataclass(frozen=True, eq=False)
class Grid:
    """A full grid: `scores[c, t, b]` (mteb's 0-1), `score_cpu_s[c, t, b]`, `embed_gpu_s[c, t]`, in the
    order of `space` (whose expected costs are the per-task medians of the measured ones)."""

    name: str
    space: SearchSpace
    scores: np.ndarray
    score_cpu_s: np.ndarray
    embed_gpu_s: np.ndarray

    @property
    def values(self) -> np.ndarray:
        """Every arm's rule-(a) average in points, in arm order (checkpoint-major)."""
        return POINTS * self.scores.mean(axis=1).reshape(-1)

    @property
    def best(self) -> float:
        return float(self.values.max())

    def regret(self, arm: int) -> float:
        return self.best - float(self.values[arm])

    def cost(self) -> tuple[float, float]:
        """(scoring CPU-s, embedding GPU-s) of the whole grid, as measured."""
        return float(self.score_cpu_s.sum()), float(self.embed_gpu_s.sum())


def grid_from_arrays(
    name: str,
    steps: list[int],
    scores: np.ndarray,
    score_cpu_s: np.ndarray | float = 1.0,
    embed_gpu_s: np.ndarray | float = 1.0,
    metrics: dict[str, np.ndarray] | None = None,
    tasks: list[str] | None = None,
) -> Grid:
    """A grid from arrays: `scores[c, t, b]` (0-1) for checkpoints at `steps`, costs as arrays of the same
    shapes or constants, and `metrics[name][c, b]`. Checkpoints are named ``step{N}``, tasks ``t{i}``."""
    n_c, n_t, n_b = scores.shape
    tasks = tasks or [f"t{i}" for i in range(n_t)]
    score_cpu = np.broadcast_to(np.asarray(score_cpu_s, dtype=float), scores.shape).copy()
    embed_gpu = np.broadcast_to(np.asarray(embed_gpu_s, dtype=float), (n_c, n_t)).copy()
    names = [f"step{s}" for s in steps]
    per_arm = None
    if metrics:
        per_arm = {
            (names[c], b): {m: float(v[c, b]) for m, v in metrics.items()}
            for c in range(n_c)
            for b in range(n_b)
        }
    space = SearchSpace.build(
        list(zip(names, steps, strict=True)),
        range(n_b),
        n_b,
        tasks,
        dict(zip(tasks, np.median(score_cpu, axis=(0, 2)), strict=True)),
        dict(zip(tasks, np.median(embed_gpu, axis=0), strict=True)),
        per_arm,
    )
    order = np.argsort(np.asarray(steps), kind="stable")  # the space orders checkpoints by step
    return Grid(name, space, scores[order], score_cpu[order], embed_gpu[order])


def grid_from_run(run_root: Path | str, name: str | None = None) -> Grid:
    """The full grid of a finished run root, from its tables. Raises ValueError naming what is missing
    when some (checkpoint, task, layer) has no score: a replay needs every cell."""
    import polars as pl

    from layertime import tables

    root = Path(run_root)
    scores = pl.read_parquet(root / "tables" / "scores.parquet")
    if scores.height == 0:
        raise ValueError(f"{root}: tables/scores.parquet is empty")
    per_task = tables.task_scores(scores).join(
        # A commit's rows appear once per revision naming it (main and step143000): count them once.
        scores.unique(["commit", "layer", "task", "split", "subset"])
        .group_by(["commit", "layer", "task"])
        .agg(pl.col("seconds").sum().alias("cpu_s")),
        on=["commit", "layer", "task"],
    )
    # Revisions sharing a commit (main and its step) are one checkpoint, named by its step revision.
    commits = per_task.group_by("commit").agg(
        pl.col("step").min(),
        pl.col("revision").sort_by([pl.col("step"), pl.col("revision") == "main"]).first(),
    )
    commits = commits.sort("step")
    tasks = sorted(per_task["task"].unique().to_list())
    blocks = sorted(per_task["layer"].unique().to_list())
    key = {c: i for i, c in enumerate(commits["commit"].to_list())}
    n_c, n_t, n_b = len(key), len(tasks), len(blocks)
    cells = np.full((n_c, n_t, n_b), np.nan)
    cpu = np.full((n_c, n_t, n_b), np.nan)
    for row in per_task.unique(["commit", "task", "layer"]).iter_rows(named=True):
        c, t, b = key[row["commit"]], tasks.index(row["task"]), blocks.index(row["layer"])
        cells[c, t, b], cpu[c, t, b] = row["score"], row["cpu_s"]
    if np.isnan(cells).any():
        c, t, b = np.argwhere(np.isnan(cells))[0]
        raise ValueError(
            f"{root}: the grid is not full ({int(np.isnan(cells).sum())} cells missing, e.g. "
            f"{commits['revision'][int(c)]} · {tasks[t]} · layer {blocks[b]}); replay needs every cell"
        )
    embed = _embed_seconds(root, key, tasks)
    metrics = _metrics(root, key, blocks)
    steps = commits["step"].to_list()
    num_blocks = int(round((blocks[0] + 1) / per_task.filter(pl.col("layer") == blocks[0])["depth"][0]))
    names = commits["revision"].to_list()
    space = SearchSpace.build(
        list(zip(names, steps, strict=True)),
        blocks,
        num_blocks,
        tasks,
        dict(zip(tasks, np.median(cpu, axis=(0, 2)), strict=True)),
        dict(zip(tasks, np.median(embed, axis=0), strict=True)),
        {(names[c], blocks[b]): m for (c, b), m in metrics.items()},
    )
    return Grid(name or root.name, space, cells, cpu, embed)


def _embed_seconds(root: Path, key: dict[str, int], tasks: list[str]) -> np.ndarray:
    """(checkpoints, tasks) measured seconds of each embedding unit; 0 where the run has no cost row."""
    import polars as pl

    out = np.zeros((len(key), len(tasks)))
    path = root / "tables" / "costs.parquet"
    if not path.is_file():
        return out
    for row in pl.read_parquet(path).filter(pl.col("phase") == "embed").iter_rows(named=True):
        if row["commit"] in key and row["task"] in tasks:
            out[key[row["commit"]], tasks.index(row["task"])] = row["seconds"]
    return out


def _metrics(root: Path, key: dict[str, int], blocks: list[int]) -> dict[tuple[int, int], dict[str, float]]:
    """{(checkpoint index, block index): {metric: value}} from tables/metrics.parquet (empty without)."""
    import polars as pl

    path = root / "tables" / "metrics.parquet"
    out: dict[tuple[int, int], dict[str, float]] = {}
    if not path.is_file():
        return out
    for row in pl.read_parquet(path).iter_rows(named=True):
        if METRIC_NORMALIZATION.get(row["metric"]) != row["normalization"] or row["commit"] not in key:
            continue
        if row["layer"] in blocks and row["value"] is not None:
            out.setdefault((key[row["commit"]], blocks.index(row["layer"])), {})[row["metric"]] = row["value"]
    return out


@dataclass
class Oracle:
    """Answers a search's actions from a `Grid`, and counts exactly what it was asked.

    An embedding is charged every time it is asked (asking twice is the search's waste); a scoring
    whose (checkpoint, task) was never embedded is refused (ValueError), as the store would.
    """

    grid: Grid
    evaluations: int = 0
    embeddings: int = 0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    asked: list = field(default_factory=list)
    _embedded: set = field(default_factory=set)

    def _c(self, checkpoint: str) -> int:
        return self.grid.space.checkpoints.index(checkpoint)

    def embedded(self, checkpoint: str, task: str) -> bool:
        return (self._c(checkpoint), self.grid.space.tasks.index(task)) in self._embedded

    def embed(self, checkpoint: str, task: str) -> float:
        """Embed (checkpoint, task); returns its GPU-seconds."""
        c, t = self._c(checkpoint), self.grid.space.tasks.index(task)
        seconds = float(self.grid.embed_gpu_s[c, t])
        self.asked.append(Embed(checkpoint, task))
        self._embedded.add((c, t))
        self.embeddings += 1
        self.gpu_s += seconds
        return seconds

    def score(self, checkpoint: str, task: str, block: int) -> tuple[float, float]:
        """Score (checkpoint, task, block): (its 0-1 score, its CPU-seconds)."""
        c, t = self._c(checkpoint), self.grid.space.tasks.index(task)
        b = self.grid.space.blocks.index(block)
        if (c, t) not in self._embedded:
            raise ValueError(f"scoring {checkpoint} · {task} · layer {block} before it was embedded")
        seconds = float(self.grid.score_cpu_s[c, t, b])
        self.asked.append(Score(checkpoint, task, block))
        self.evaluations += 1
        self.cpu_s += seconds
        return float(self.grid.scores[c, t, b]), seconds


@dataclass(frozen=True)
class Point:
    """The state of a replay after a batch: what was spent, the arm the search would choose, its true
    regret (points), and the stop rule's verdict there."""

    evaluations: int
    cpu_s: float
    gpu_s: float
    arm: int | None
    regret: float
    probability: float | None
    stop: bool
    reason: str


def replay(
    grid: Grid,
    settings: SearchSpec,
    cpu_cap: float,
    past_stop: float = 0.0,
    use_metrics: bool = True,
    on_batch: Callable[[Search], None] | None = None,
) -> list[Point]:
    """Drive a `Search` against an oracle of `grid` until its stop rule fires, or its scoring CPU-s reach
    `cpu_cap`. A search that stopped goes on until `past_stop` CPU-s are spent, so that its regret at
    larger budgets is known too (the trace marks every state where the rule says stop)."""
    search = Search(grid.space, settings, use_metrics=use_metrics)
    oracle = Oracle(grid)
    trace: list[Point] = []
    stopped = False
    while True:
        stop = search.should_stop()
        stopped = stopped or stop.stop
        chosen = search.incumbent()
        arm = None if chosen is None else chosen[0]
        regret = float("inf") if arm is None else grid.regret(arm)
        trace.append(
            Point(
                oracle.evaluations,
                oracle.cpu_s,
                oracle.gpu_s,
                arm,
                regret,
                stop.probability,
                stop.stop,
                stop.reason,
            )
        )
        if (stopped and oracle.cpu_s >= past_stop) or oracle.cpu_s >= cpu_cap:
            return trace
        actions = search.propose()
        if not actions:
            return trace
        for action in actions:
            if isinstance(action, Embed):
                search.observe_embedding(action.checkpoint, action.task, oracle.embed(*action))
            else:
                score, seconds = oracle.score(*action)
                search.observe(action.checkpoint, action.task, action.block, score, seconds)
        if on_batch:
            on_batch(search)
