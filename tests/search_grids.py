"""Synthetic full grids for the layer search's tests, built in code (tests/test_search*.py).

A grid is checkpoints × tasks × blocks of 0-1 scores whose arm values (the task mean, in points) follow
a smooth landscape like a real training run's: better with training, the best layer moving deeper.
"""

from __future__ import annotations

import numpy as np

from layertime.search.replay import Grid, grid_from_arrays

PYTHIA_LIKE_STEPS = [0] + [2**k for k in range(10)] + list(range(600, 3501, 100))  # 41 checkpoints


def landscape(steps: list[int], blocks: int) -> np.ndarray:
    """(checkpoints, blocks) smooth values in points: 40 + 20 u - 30 (d - 0.3 - 0.4 u)², u the log-scaled
    step in [0, 1], d the depth (b + 1) / blocks; the best layer moves from 0.3 to 0.7 of the depth."""
    u = np.log1p(np.asarray(steps, dtype=float)) / np.log1p(max(steps))
    d = (np.arange(blocks) + 1) / blocks
    return 40 + 20 * u[:, None] - 30 * (d[None, :] - 0.3 - 0.4 * u[:, None]) ** 2


def smooth_grid(
    steps: list[int] = PYTHIA_LIKE_STEPS,
    blocks: int = 8,
    tasks: int = 5,
    roughness: float = 0.2,
    seed: int = 0,
    spike: tuple[int, int, float] | None = None,
) -> Grid:
    """A grid over `landscape`: each task a fixed offset from the arm value plus iid noise of `roughness`
    points per cell (exactly centred per arm, so the arm value is the landscape plus the mean noise);
    `spike` = (checkpoint index, block, points) adds a bump to one arm. Scoring costs 1 CPU-s per
    cell with task t costing 1 + t; embeddings 2 s each. Metrics: 'dime' follows the landscape with
    noise, 'noise' is pure noise."""
    rng = np.random.default_rng(seed)
    values = landscape(steps, blocks)
    if spike is not None:
        c, b, bump = spike
        values[c, b] += bump
    offsets = np.linspace(-10, 10, tasks)
    noise = roughness * rng.standard_normal((len(steps), tasks, blocks))
    cells = values[:, None, :] + offsets[None, :, None] + noise
    cpu = np.broadcast_to((1.0 + np.arange(tasks))[None, :, None], cells.shape)
    metrics = {
        "dime": values + rng.standard_normal(values.shape),
        "noise": rng.standard_normal(values.shape),
    }
    return grid_from_arrays("synthetic", steps, cells / 100.0, cpu, 2.0, metrics)
