"""The benchmark's baselines do what they say (layertime/search/baselines.py): LinUCB's picks match its
formula, successive halving halves and pays what it asked, the fixed rules pick the arms they name."""

from __future__ import annotations

import numpy as np
import pytest
from search_grids import smooth_grid  # tests/search_grids.py

from layertime.search import baselines
from layertime.search.replay import grid_from_arrays


def test_linucb_follows_its_formula() -> None:
    grid = smooth_grid(steps=[0, 4, 64, 600, 3500], blocks=4, tasks=2, seed=1)
    picks = list(baselines.linucb_arms(grid, alpha=1.0, ridge=1.0))
    # Recompute the first three picks by hand (float64, plain loops): A = I + Σ x xᵀ, b = Σ r x.
    x = np.column_stack([np.ones(grid.space.n_arms), grid.space.features()[:, 2:]])
    a, b, chosen = np.eye(x.shape[1]), np.zeros(x.shape[1]), []
    for _ in range(3):
        inv = np.linalg.inv(a)
        ucb = [
            x[i] @ inv @ b + np.sqrt(x[i] @ inv @ x[i]) if i not in chosen else -np.inf for i in range(len(x))
        ]
        arm = int(np.argmax(ucb))
        chosen.append(arm)
        a += np.outer(x[arm], x[arm])
        b += grid.values[arm] / 100 * x[arm]
    assert picks[:3] == chosen
    assert len(set(picks)) == grid.space.n_arms  # every arm once, none twice


def test_linucb_learns_a_reward_linear_in_a_metric() -> None:
    # The reward is the 'dime' metric's rank exactly: the linear model learns it, and the best arm comes
    # long before a random order would find it (expected position: half the arms).
    rng = np.random.default_rng(0)
    steps, blocks = list(range(0, 2000, 50)), 8
    dime = rng.permutation(len(steps) * blocks).reshape(len(steps), blocks).astype(float)
    scores = np.repeat((dime / dime.max())[:, None, :], 2, axis=1)
    grid = grid_from_arrays(
        "linear", steps, scores, metrics={"dime": dime, "noise": rng.normal(size=dime.shape)}
    )
    trace = baselines.linucb(grid)
    found = next(p.evaluations for p in trace if p.regret == 0) // 2
    assert found <= 20, f"LinUCB needed {found} of {grid.space.n_arms} arms"


def test_successive_halving_halves_over_tasks() -> None:
    grid = smooth_grid(steps=[0, 4, 64, 600, 3500], blocks=4, tasks=4, seed=2)
    final = baselines.successive_halving(grid, n=8, seed=0)
    # 8 arms × 1 task, the better 4 × 1 more, the better 2 × 2 more (all 4 tasks): 8 + 4 + 4 = 16.
    assert final.evaluations == 16
    tasks = np.random.default_rng(0).permutation(4)  # the order it draws, seeded
    costs = 1.0 + tasks  # task t costs 1 + t CPU-s in smooth_grid
    assert final.cpu_s == pytest.approx(8 * costs[0] + 4 * costs[1] + 2 * (costs[2] + costs[3]))
    assert final.regret == pytest.approx(grid.best - grid.values[final.arm])


def test_last_layer_and_dime_argmax_pick_their_arms() -> None:
    grid = smooth_grid(steps=[0, 4, 64, 600], blocks=3, tasks=2, seed=4)
    n_b = 3
    last = baselines.last_layer_arms(grid)
    assert last == [3 * n_b + 2, 2 * n_b + 2, 1 * n_b + 2, 0 * n_b + 2]  # latest checkpoint first
    dime = grid.space.metric_values[:, grid.space.metric_names.index("dime")].reshape(4, n_b)
    picks = baselines.metric_argmax_arms(grid, "dime")
    assert picks == [c * n_b + int(np.argmax(dime[c])) for c in (3, 2, 1, 0)]
    assert baselines.metric_argmax(grid, "lidar") is None  # a metric the grid lacks
    trace = baselines.last_layer(grid)  # the choice after each arm: the best evaluated so far
    assert [p.arm for p in trace[1:]] == [max(last[: i + 1], key=lambda a: grid.values[a]) for i in range(4)]


def test_random_search_is_a_seeded_permutation() -> None:
    grid = smooth_grid(steps=[0, 4, 64], blocks=3, tasks=2, seed=5)
    trace = baselines.random_search(grid, seed=7)
    assert trace[-1].evaluations == grid.space.n_arms * 2 and trace[-1].regret == 0.0
    assert [p.arm for p in trace] == [p.arm for p in baselines.random_search(grid, seed=7)]
