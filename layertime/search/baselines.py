"""What the search is measured against (benchmarks/search.py), each replayed on a `Grid` through an
`Oracle` that counts what it asks.

- **random**: arms in a seeded random order, each evaluated on every task; the choice is the best
  evaluated arm.
- **LinUCB** (Li et al. 2010, the shared-parameter form), what the scripts layertime replaced tried:
  arms are (checkpoint, layer), an arm's features x = [1, its seven metrics' ranks in [0, 1]], its
  reward the rule-(a) average in mteb's 0-1 units. With A = λI + Σ x xᵀ and b = Σ r x over the arms
  evaluated, the next arm maximises x·θ + α √(xᵀ A⁻¹ x), θ = A⁻¹ b, among arms not yet evaluated
  (a reward is deterministic: pulling an arm twice teaches nothing). λ = 1, α = 1.
- **last layer**: the last block of each checkpoint, latest checkpoint first — what one does without
  a search.
- **DiME argmax**: per checkpoint the block of largest DiME (the paper's label-free choice), latest
  checkpoint first.
- **successive halving over tasks** (Jamieson & Talwalkar 2016, with tasks as the resource): n arms
  drawn at random are scored on 1 task, the better half on 2, the better half of those on 4, ... and
  the survivors on all; the choice is the best arm scored on every task. Its cost grows with n; the
  benchmark runs it for every n and reports the cost of the smallest n that reaches a regret.

Each sequential baseline returns its trace: after every arm, (evaluations, scoring CPU-s, embedding
GPU-s, chosen arm, its regret).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from layertime.search.replay import Grid, Oracle, Point


def evaluate_arm(oracle: Oracle, arm: int, tasks: list[int] | None = None) -> float:
    """Score `arm` on `tasks` (default all) through `oracle`, embedding what it has not embedded;
    the sum of the scores it got."""
    space = oracle.grid.space
    a = space.arm(arm)
    total = 0.0
    for t in range(len(space.tasks)) if tasks is None else tasks:
        task = space.tasks[t]
        if not oracle.embedded(a.checkpoint, task):
            oracle.embed(a.checkpoint, task)
        total += oracle.score(a.checkpoint, task, a.block)[0]
    return total


def sequential(grid: Grid, arms: Iterator[int]) -> list[Point]:
    """Evaluate arms in the order `arms` yields them (it may look at the trace so far), fully, one by one."""
    oracle = Oracle(grid)
    values = grid.values
    best: int | None = None
    trace = [Point(0, 0.0, 0.0, None, float("inf"), None, False, "")]
    for arm in arms:
        evaluate_arm(oracle, arm)
        if best is None or values[arm] > values[best]:
            best = arm
        trace.append(
            Point(oracle.evaluations, oracle.cpu_s, oracle.gpu_s, best, grid.regret(best), None, False, "")
        )
    return trace


def random_search(grid: Grid, seed: int) -> list[Point]:
    return sequential(grid, iter(np.random.default_rng(seed).permutation(grid.space.n_arms).tolist()))


def linucb_arms(grid: Grid, alpha: float = 1.0, ridge: float = 1.0) -> Iterator[int]:
    """LinUCB's picks, in order, over (checkpoint, layer) arms with [1, metric ranks] as features
    (module docstring); each pick's reward is read after it is picked."""
    space = grid.space
    x = np.column_stack([np.ones(space.n_arms), space.features(use_metrics=True)[:, 2:]])
    a = ridge * np.eye(x.shape[1])
    b = np.zeros(x.shape[1])
    open_arms = np.ones(space.n_arms, dtype=bool)
    while open_arms.any():
        inverse = np.linalg.inv(a)
        ucb = x @ (inverse @ b) + alpha * np.sqrt(np.einsum("ij,jk,ik->i", x, inverse, x))
        ucb[~open_arms] = -np.inf
        arm = int(np.argmax(ucb))
        yield arm
        open_arms[arm] = False
        a += np.outer(x[arm], x[arm])
        b += grid.values[arm] / 100.0 * x[arm]  # its reward, in mteb's 0-1 units


def linucb(grid: Grid, alpha: float = 1.0, ridge: float = 1.0) -> list[Point]:
    return sequential(grid, linucb_arms(grid, alpha, ridge))


def last_layer_arms(grid: Grid) -> list[int]:
    """The last block of each checkpoint, latest checkpoint first."""
    n_b = len(grid.space.blocks)
    return [c * n_b + n_b - 1 for c in reversed(range(len(grid.space.checkpoints)))]


def last_layer(grid: Grid) -> list[Point]:
    return sequential(grid, iter(last_layer_arms(grid)))


def metric_argmax_arms(grid: Grid, metric: str = "dime") -> list[int] | None:
    """Per checkpoint the block where `metric` is largest, latest checkpoint first; None without it."""
    space = grid.space
    if metric not in space.metric_names:
        return None
    n_b = len(space.blocks)
    values = space.metric_values[:, space.metric_names.index(metric)].reshape(len(space.checkpoints), n_b)
    return [c * n_b + int(np.argmax(values[c])) for c in reversed(range(len(space.checkpoints)))]


def metric_argmax(grid: Grid, metric: str = "dime") -> list[Point] | None:
    arms = metric_argmax_arms(grid, metric)
    return None if arms is None else sequential(grid, iter(arms))


def successive_halving(grid: Grid, n: int, seed: int) -> Point:
    """Successive halving over tasks from `n` random arms (module docstring); its final state."""
    space = grid.space
    rng = np.random.default_rng(seed)
    tasks = rng.permutation(len(space.tasks)).tolist()
    alive = rng.choice(space.n_arms, size=min(n, space.n_arms), replace=False).tolist()
    oracle = Oracle(grid)
    sums = np.zeros(space.n_arms)
    done = 0  # tasks scored so far by every live arm
    width = 1
    while True:
        upto = min(width, len(tasks))
        for arm in alive:
            sums[arm] += evaluate_arm(oracle, arm, tasks[done:upto])
        done = upto
        if done == len(tasks):
            break
        # Every live arm has the same tasks, so their sums rank them fairly; keep the better half.
        alive = sorted(alive, key=lambda a: (-sums[a], a))[: max(1, len(alive) // 2)]
        width *= 2
    best = max(alive, key=lambda a: (grid.values[a], -a))
    return Point(oracle.evaluations, oracle.cpu_s, oracle.gpu_s, best, grid.regret(best), None, False, "")
