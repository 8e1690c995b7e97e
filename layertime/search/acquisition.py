"""Which arms to evaluate next: expected improvement per unit cost, batched by kriging believer.

**Why expected improvement (EI).** The search must end on an arm it has *evaluated* (every task
scored): a predicted arm is a guess, and the stop rule's guarantee is about the chosen arm's true value.
With exact observations and that restriction, the one-step Bayes-optimal value of evaluating arm a is
the expected rise of the best evaluated value y*,

    EI(a) = E[max(f_a - y*, 0)] = (μ_a - y*) Φ(z) + σ_a φ(z),   z = (μ_a - y*) / σ_a,

which is the knowledge gradient when only evaluated arms may be chosen. σ_a includes the model's rough
term (`layertime.search.model`), so rough, unexplored regions keep some value.

**Cost.** Completing arm a costs its missing scorings on the CPU plus the embeddings of its
checkpoint's tasks that are neither done nor already in the batch, in GPU-seconds weighed by
`gpu_cpu_ratio` (CPU-seconds per GPU-second):

    cost(a) = Σ_{t missing} score_cpu_s[t] + ratio · Σ_{t missing, (c, t) not embedded} embed_gpu_s[t]

and the search picks the arm of largest EI(a) / cost(a) (EI per unit cost, Snoek et al. 2012). One
embedding gives every block of a checkpoint, so once a checkpoint is embedded its other layers are
cheap: the rule spends GPU time only where a new checkpoint is worth more than the layers at hand.

**Batches.** Workers should never wait for the model, so a proposal holds several arms. After each pick
the model is conditioned on the picked arm taking its predicted mean (the "kriging believer",
Ginsbourger et al. 2010: hyperparameters unchanged, the picked arm's uncertainty gone), and its
embeddings count as done; the next pick then goes where the first one left value, not beside it.

**Start.** Before `initial_arms` arms are evaluated the model has too little to fit its length scales;
the first arms are spread over (log step, depth) by a seeded farthest-point design.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from layertime.search.model import ArmModel


def farthest_points(points: np.ndarray, chosen: list[int], n: int, rng: np.random.Generator) -> list[int]:
    """Extend `chosen` to `n` rows of `points` by farthest-point sampling (each new row the one
    farthest from every chosen row; the first, if none is chosen, drawn with `rng`)."""
    chosen = list(chosen)
    if not chosen and n > 0:
        chosen.append(int(rng.integers(len(points))))
    while len(chosen) < min(n, len(points)):
        distance = np.min(np.linalg.norm(points[:, None, :] - points[None, chosen, :], axis=2), axis=1)
        distance[chosen] = -1.0
        chosen.append(int(np.argmax(distance)))
    return chosen


def pick_batch(
    model: ArmModel,
    candidates: np.ndarray,
    best: float,
    cost: Callable[[int], float],
    take: Callable[[int], bool],
    full: Callable[[], bool],
) -> list[int]:
    """Arms from `candidates` by EI per unit cost, conditioning the model on each pick, until `full()`.

    `cost(arm)` is the arm's current cost (it falls once a pick embedded its checkpoint); `take(arm)`
    records a pick (its embeddings then count as done) and returns False when the budget forbids it,
    in which case the next best arm is tried.
    """
    picked: list[int] = []
    remaining = list(candidates)
    while remaining and not full():
        mean, _ = model.predict(np.asarray(remaining))
        costs = np.array([cost(a) for a in remaining])
        value = model.expected_improvement(np.asarray(remaining), best) / np.maximum(costs, 1e-9)
        for i in np.argsort(-value, kind="stable"):
            arm = remaining[i]
            if take(arm):
                picked.append(arm)
                best = max(best, float(mean[i]))  # believed: the pick scores its mean
                model = model.with_fantasy(arm, float(mean[i]))
                remaining.pop(i)
                break
        else:
            break  # nothing left is affordable
    return picked
