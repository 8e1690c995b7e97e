"""What a layer search searches: its arms, their label-free features, and what evaluating them costs.

An **arm** is a (checkpoint, block): one layer of one checkpoint as an embedding. Its value is the
rule-(a) average of its tasks' scores, in points (mteb's 0-1 main score × 100), which is what the
search maximises. Evaluating an arm is one **embedding** per (checkpoint, task) — a GPU pass that
gives every block of the checkpoint at once — and one **scoring** per (checkpoint, task, block), on a
CPU. Both are the units and completion records of the grid flow (docs/design.md §7), so a search's
evaluations are grid units and a grid's records are the search's observations.

Features, each mapped to [0, 1] over all arms of the space (all arms are known before any scoring):

- the training step, log-scaled: ``log1p(step) / log1p(max step)`` (Pythia's checkpoints are
  log-spaced early, where a model changes fastest);
- the depth ``(block + 1) / L`` (docs/design.md §3);
- each label-free metric (docs/design.md §5) by its rank among the arms (ties share their mean rank):
  a monotone transform that keeps step0's extreme values from squeezing every other arm together.

A space is a small frozen dataclass of tuples and arrays: it pickles to a worker or a flow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

# One value per metric for the features (the others are the same metric rescaled by a constant or
# mirrored, which a rank transform ignores); docs/design.md §5 names them. The replay and the flow's
# search from the records read the same ones.
METRIC_NORMALIZATION = {
    "prompt_entropy": "max_entropy",
    "dataset_entropy": "max_entropy",
    "curvature": "raw",
    "effective_rank": "raw",
    "infonce": "raw",
    "dime": "raw",
    "lidar": "raw",
}


@dataclass(frozen=True)
class Arm:
    """One (checkpoint, block) of the space; `index` is its row in the space's arrays."""

    index: int
    checkpoint: str
    step: int
    block: int


@dataclass(frozen=True, eq=False)
class SearchSpace:
    """Arms = checkpoints × blocks, their features, and the expected cost of each action.

    `checkpoints` are distinct checkpoints (by commit: revisions sharing a commit are one arm each
    block), in training order, with their `steps`. Arm `i` is checkpoint `i // len(blocks)`, block
    `blocks[i % len(blocks)]`. `score_cpu_s[t]` is the expected CPU-seconds of scoring one layer of task
    `t`, `embed_gpu_s[t]` the expected GPU-seconds of embedding task `t` for one checkpoint.
    """

    checkpoints: tuple[str, ...]
    steps: tuple[int, ...]
    blocks: tuple[int, ...]
    num_blocks: int
    tasks: tuple[str, ...]
    score_cpu_s: tuple[float, ...]
    embed_gpu_s: tuple[float, ...]
    metric_names: tuple[str, ...] = ()
    metric_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (arms, metrics)

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.checkpoints) or len(set(self.checkpoints)) != len(self.checkpoints):
            raise ValueError("checkpoints must be distinct, one step each")
        if not self.blocks or not self.tasks:
            raise ValueError("a search space needs at least one block and one task")
        if len(self.score_cpu_s) != len(self.tasks) or len(self.embed_gpu_s) != len(self.tasks):
            raise ValueError("score_cpu_s and embed_gpu_s need one cost per task")
        if any(not (c >= 0 and math.isfinite(c)) for c in (*self.score_cpu_s, *self.embed_gpu_s)):
            raise ValueError("costs must be finite and non-negative")
        if self.metric_names and self.metric_values.shape != (self.n_arms, len(self.metric_names)):
            raise ValueError(
                f"metric_values must be (arms, metrics) = ({self.n_arms}, {len(self.metric_names)})"
            )

    @classmethod
    def build(
        cls,
        checkpoints: Sequence[tuple[str, int]],
        blocks: Sequence[int],
        num_blocks: int,
        tasks: Sequence[str],
        score_cpu_s: Mapping[str, float],
        embed_gpu_s: Mapping[str, float],
        metrics: Mapping[tuple[str, int], Mapping[str, float]] | None = None,
    ) -> SearchSpace:
        """A space from plain data: (checkpoint, step) pairs, blocks, tasks, per-task costs, and
        optionally the label-free metrics per (checkpoint, block) as {metric: value}. A metric missing
        for some arm, or not finite, is dropped for all (a feature must be known everywhere)."""
        order = sorted(checkpoints, key=lambda c: (c[1], c[0]))
        names: tuple[str, ...] = ()
        values = np.zeros((0, 0))
        if metrics:
            keys = [(c, b) for c, _ in order for b in blocks]
            common = set.intersection(*(set(metrics.get(k, {})) for k in keys))
            names = tuple(sorted(m for m in common if all(math.isfinite(float(metrics[k][m])) for k in keys)))
            values = np.array([[float(metrics[k][m]) for m in names] for k in keys]).reshape(
                len(keys), len(names)
            )
        return cls(
            checkpoints=tuple(c for c, _ in order),
            steps=tuple(int(s) for _, s in order),
            blocks=tuple(int(b) for b in blocks),
            num_blocks=int(num_blocks),
            tasks=tuple(tasks),
            score_cpu_s=tuple(float(score_cpu_s[t]) for t in tasks),
            embed_gpu_s=tuple(float(embed_gpu_s[t]) for t in tasks),
            metric_names=names,
            metric_values=values,
        )

    @property
    def n_arms(self) -> int:
        return len(self.checkpoints) * len(self.blocks)

    def arm(self, index: int) -> Arm:
        c, b = divmod(index, len(self.blocks))
        return Arm(index, self.checkpoints[c], self.steps[c], self.blocks[b])

    def arms(self) -> list[Arm]:
        return [self.arm(i) for i in range(self.n_arms)]

    def index(self, checkpoint: str, block: int) -> int:
        """The arm index of (checkpoint, block); KeyError naming it when it is not in the space."""
        try:
            return self.checkpoints.index(checkpoint) * len(self.blocks) + self.blocks.index(block)
        except ValueError:
            raise KeyError(f"({checkpoint}, block {block}) is not an arm of this search space") from None

    def checkpoint_of(self, index: int) -> int:
        return index // len(self.blocks)

    def features(self, use_metrics: bool = True) -> np.ndarray:
        """(arms, 2 [+ metrics]) in [0, 1]: log-scaled step, depth, then each metric's rank."""
        steps = np.log1p(np.asarray(self.steps, dtype=float))
        step = np.repeat(steps / steps.max() if steps.max() > 0 else steps, len(self.blocks))
        depth = np.tile((np.asarray(self.blocks, dtype=float) + 1) / self.num_blocks, len(self.checkpoints))
        columns = [step, depth]
        if use_metrics and self.metric_names and self.n_arms > 1:
            ranks = rankdata(self.metric_values, axis=0)  # ties share their mean rank
            columns += list(((ranks - 1) / (self.n_arms - 1)).T)
        return np.column_stack(columns)

    def design_points(self) -> np.ndarray:
        """(arms, 2) in [0, 1]: each arm's checkpoint by its rank among the checkpoints, and its depth —
        where the initial design spreads its arms. By rank, not log step: Pythia's checkpoints are
        mostly evenly spaced late in training (143 of 154), which the log scale squeezes into its last
        tenth, and a design spread in log step would spend most of its arms on the first few hundred steps."""
        n_c = len(self.checkpoints)
        rank = np.repeat(np.arange(n_c) / max(1, n_c - 1), len(self.blocks))
        depth = np.tile((np.asarray(self.blocks, dtype=float) + 1) / self.num_blocks, n_c)
        return np.column_stack([rank, depth])

    def arm_score_cpu_s(self) -> float:
        """CPU-seconds of scoring one arm on every task."""
        return float(sum(self.score_cpu_s))

    def grid_cost(self) -> tuple[float, float]:
        """(scoring CPU-s, embedding GPU-s) of the full grid: every arm, every task."""
        return self.n_arms * self.arm_score_cpu_s(), len(self.checkpoints) * float(sum(self.embed_gpu_s))
