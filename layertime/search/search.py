"""The layer search: observations in, the next batch of embeddings and scorings out, a calibrated stop.

A `Search` holds what is known — every (checkpoint, task, layer) score observed, every (checkpoint,
task) embedded, what was spent — and from it, on demand: the next batch (`propose`), the model's view of
every arm (`posterior`), whether to stop (`should_stop`) and the chosen arm (`chosen`). It is plain
Python over a `SearchSpace`: a Prefect flow, the replay benchmark and a test drive it alike, and a
search rebuilt from the same observations with the same settings proposes the same batch (every random
draw is seeded by the settings' seed and the number of observations).

**The stop rule.** Let y* be the best *evaluated* arm (every task scored) — the chosen arm. From the
model's joint posterior over every arm not evaluated (roughness included, `layertime.search.model`),
draw S samples f^(s) and estimate

    P(best within ε) = (1/S) Σ_s [ max_{a not evaluated} f_a^(s) ≤ y* + ε ]

(evaluated arms are exact and ≤ y* by definition). Stop when it exceeds `confidence`, once the initial
design is evaluated (before, the model's length scales are guesses); stop also when no arm is left, or
when the next arm would overrun a budget. `benchmarks/search.py` measures how often the rule stops with
a regret above ε, against the ≤ 1 − confidence it promises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from layertime.search.acquisition import farthest_points, pick_batch
from layertime.search.model import ArmModel, arm_observations
from layertime.search.space import Arm, SearchSpace
from layertime.spec import SearchSpec

POSTERIOR_SAMPLES = 2000  # joint draws for the stop rule: P is estimated to ±0.005 near 0.95
POINTS = 100.0  # mteb's main scores are 0-1; the search works in points (0-100), as epsilon is given


class Embed(NamedTuple):
    """Embed `task` with checkpoint `checkpoint` (one GPU pass gives every block)."""

    checkpoint: str
    task: str


class Score(NamedTuple):
    """Score layer `block` of checkpoint `checkpoint` on `task` (needs the Embed of (checkpoint, task))."""

    checkpoint: str
    task: str
    block: int


Action = Embed | Score


@dataclass(frozen=True)
class Stop:
    """Whether to stop, why, and the stop rule's probability (None before the model can estimate it)."""

    stop: bool
    reason: str
    probability: float | None


@dataclass(frozen=True)
class Choice:
    """The chosen arm: the best evaluated one, its exact value, and what the model says of the best.

    `best_upper` is the 95% credible upper bound of the best arm's value (max over all arms): with
    posterior probability 0.95 no arm beats `value` by more than `best_upper - value`.
    """

    arm: Arm
    value: float
    best_upper: float
    probability: float  # P(best within epsilon of this arm)


@dataclass(frozen=True)
class Posterior:
    """Every arm: predicted mean and sd (points; exact for evaluated arms), tasks scored, and the
    probability of being the best arm (from the joint samples)."""

    arms: list[Arm]
    mean: np.ndarray
    sd: np.ndarray
    n_tasks: np.ndarray
    evaluated: np.ndarray
    p_best: np.ndarray

    def rows(self) -> list[dict]:
        """One dict per arm, for a table."""
        return [
            {
                "checkpoint": arm.checkpoint,
                "step": arm.step,
                "layer": arm.block,
                "mean": float(self.mean[i]),
                "sd": float(self.sd[i]),
                "n_tasks": int(self.n_tasks[i]),
                "evaluated": bool(self.evaluated[i]),
                "p_best": float(self.p_best[i]),
            }
            for i, arm in enumerate(self.arms)
        ]


class Search:
    """A layer search over `space` with `settings` (a `SearchSpec`; defaults if None)."""

    def __init__(
        self, space: SearchSpace, settings: SearchSpec | None = None, use_metrics: bool = True
    ) -> None:
        self.space = space
        self.settings = settings or SearchSpec()
        self.features = space.features(use_metrics)
        self.scores = np.full((space.n_arms, len(space.tasks)), np.nan)  # points
        self.embedded = np.zeros((len(space.checkpoints), len(space.tasks)), dtype=bool)
        self.pending: set[int] = set()  # arms proposed and not yet complete
        self.spent_cpu_s = 0.0
        self.spent_gpu_s = 0.0
        self._model: ArmModel | None = None
        self._samples: tuple[np.ndarray, np.ndarray] | None = None

    # --- what is known ------------------------------------------------------------------------------

    def observe(self, checkpoint: str, task: str, block: int, score: float, cpu_s: float = 0.0) -> None:
        """A (checkpoint, task, layer) score, as mteb gives it (0-1, the rule-(a) task score), and the
        CPU-seconds it cost this search (0 for a record found from an earlier run)."""
        if not math.isfinite(score):
            raise ValueError(f"score of ({checkpoint}, {task}, block {block}) is {score!r}, not a number")
        arm = self.space.index(checkpoint, block)
        t = self._task(task)
        self.scores[arm, t] = POINTS * score
        self.embedded[self.space.checkpoint_of(arm), t] = True  # a score implies its embedding
        self.spent_cpu_s += cpu_s
        if not np.isnan(self.scores[arm]).any():
            self.pending.discard(arm)
        self._model = self._samples = None

    def observe_embedding(self, checkpoint: str, task: str, gpu_s: float = 0.0) -> None:
        """(checkpoint, task) was embedded, at `gpu_s` GPU-seconds to this search."""
        self.embedded[self.space.checkpoints.index(checkpoint), self._task(task)] = True
        self.spent_gpu_s += gpu_s

    def _task(self, task: str) -> int:
        try:
            return self.space.tasks.index(task)
        except ValueError:
            raise KeyError(
                f"task {task!r} is not one of the search's tasks {list(self.space.tasks)}"
            ) from None

    @property
    def complete(self) -> np.ndarray:
        """Indices of the evaluated arms (every task scored)."""
        return np.flatnonzero(~np.isnan(self.scores).any(axis=1))

    @property
    def evaluations(self) -> int:
        """(checkpoint, task, layer) scores known."""
        return int((~np.isnan(self.scores)).sum())

    # --- the model ----------------------------------------------------------------------------------

    def _rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.settings.seed, self.evaluations, purpose])

    def model(self) -> ArmModel | None:
        """The GP fitted on what is known, or None before two arms are evaluated."""
        if self._model is None and len(self.complete) >= 2:
            obs = arm_observations(self.scores)
            self._model = ArmModel(self.features, obs, seed=self.settings.seed + self.evaluations)
        return self._model

    def _joint_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(arms not evaluated, samples × those arms): joint posterior draws of their values."""
        if self._samples is None:
            model = self.model()
            assert model is not None
            others = np.setdiff1d(np.arange(self.space.n_arms), self.complete)
            if len(others) == 0:
                self._samples = (others, np.zeros((POSTERIOR_SAMPLES, 0)))
            else:
                self._samples = (others, model.sample(others, POSTERIOR_SAMPLES, self._rng(1)))
        return self._samples

    def incumbent(self) -> tuple[int, float] | None:
        """(arm, value) of the best evaluated arm; ties go to the earliest arm."""
        done = self.complete
        if len(done) == 0:
            return None
        values = self.scores[done].mean(axis=1)
        i = int(np.argmax(values))
        return int(done[i]), float(values[i])

    def probability_within(self) -> float | None:
        """P(no arm beats the incumbent by more than epsilon), or None without a model."""
        if self.model() is None:
            return None
        _, samples = self._joint_samples()
        _, best = self.incumbent()
        if samples.shape[1] == 0:
            return 1.0
        return float(np.mean(samples.max(axis=1) <= best + self.settings.epsilon))

    def posterior(self) -> Posterior:
        """Every arm's predicted mean and sd (exact for evaluated arms) and P(it is the best arm)."""
        n = self.space.n_arms
        mean, sd, p_best = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
        done = self.complete
        mean[done], sd[done] = self.scores[done].mean(axis=1), 0.0
        model = self.model()
        if model is not None:
            others, samples = self._joint_samples()
            if len(others):
                mean[others], sd[others] = model.predict(others)
                exact = self.scores[done].mean(axis=1)
                # Per draw: the best arm among the draws of the others and the exact evaluated values.
                draws = np.concatenate([samples, np.broadcast_to(exact, (len(samples), len(done)))], axis=1)
                winners = np.concatenate([others, done])[np.argmax(draws, axis=1)]
                p_best = np.bincount(winners, minlength=n) / len(samples)
            else:
                p_best[self.incumbent()[0]] = 1.0
        evaluated = np.zeros(n, dtype=bool)
        evaluated[done] = True
        return Posterior(self.space.arms(), mean, sd, (~np.isnan(self.scores)).sum(axis=1), evaluated, p_best)

    def chosen(self) -> Choice | None:
        """The best evaluated arm with the model's credible bound on the best value; None before any."""
        found = self.incumbent()
        if found is None:
            return None
        arm, value = found
        upper, probability = value, 1.0
        if self.model() is not None:
            _, samples = self._joint_samples()
            if samples.shape[1]:
                upper = max(value, float(np.quantile(samples.max(axis=1), 0.95)))
            probability = self.probability_within()
        return Choice(self.space.arm(arm), value, upper, probability)

    # --- deciding -----------------------------------------------------------------------------------

    def should_stop(self) -> Stop:
        """Stop when P(best within epsilon) > confidence (after the initial design), when every arm is
        evaluated, or when no arm left fits the budgets."""
        if len(self.complete) == self.space.n_arms:
            return Stop(True, "every arm is evaluated", 1.0)
        probability = self.probability_within()
        if (
            probability is not None
            and len(self.complete) >= self.settings.initial_arms
            and probability > self.settings.confidence
        ):
            return Stop(
                True,
                f"P(best within {self.settings.epsilon:g} points) = {probability:.3f} > {self.settings.confidence:g}",
                probability,
            )
        if not self._affordable():
            return Stop(True, "budget spent: no arm left fits the budget", probability)
        return Stop(False, "", probability)

    def _cost(self, arm: int, embedded: np.ndarray) -> tuple[float, float]:
        """(CPU-s, GPU-s) of completing `arm` given the (checkpoint, task) pairs `embedded`."""
        missing = np.isnan(self.scores[arm])
        c = self.space.checkpoint_of(arm)
        cpu = float(np.dot(missing, self.space.score_cpu_s))
        gpu = float(np.dot(missing & ~embedded[c], self.space.embed_gpu_s))
        return cpu, gpu

    def _fits(self, cpu: float, gpu: float, planned: tuple[float, float] = (0.0, 0.0)) -> bool:
        budget_cpu, budget_gpu = self.settings.budget_cpu_h, self.settings.budget_gpu_h
        if budget_cpu is not None and self.spent_cpu_s + planned[0] + cpu > budget_cpu * 3600 + 1e-9:
            return False
        return budget_gpu is None or self.spent_gpu_s + planned[1] + gpu <= budget_gpu * 3600 + 1e-9

    def _open_arms(self) -> np.ndarray:
        """Arms neither evaluated nor pending."""
        done = np.zeros(self.space.n_arms, dtype=bool)
        done[self.complete] = True
        done[list(self.pending)] = True
        return np.flatnonzero(~done)

    def _affordable(self) -> bool:
        return any(self._fits(*self._cost(a, self.embedded)) for a in self._open_arms())

    def propose(self) -> list[Action]:
        """The next batch: whole arms, at least `settings.batch` scorings unless fewer are left or
        affordable, each arm's missing embeddings first, then its scorings. The arms become pending
        until every task of theirs is observed; nothing is proposed twice while pending."""
        open_arms = self._open_arms()
        if len(open_arms) == 0:
            return []
        embedded = self.embedded.copy()
        planned = [0.0, 0.0]
        arms: list[int] = []

        def take(arm: int) -> bool:
            cpu, gpu = self._cost(arm, embedded)
            if not self._fits(cpu, gpu, tuple(planned)):
                return False
            planned[0] += cpu
            planned[1] += gpu
            embedded[self.space.checkpoint_of(arm)] |= np.isnan(self.scores[arm])
            arms.append(arm)
            return True

        def scorings() -> int:
            return int(sum(np.isnan(self.scores[a]).sum() for a in arms))

        n_done = len(self.complete)
        if n_done < self.settings.initial_arms or self.model() is None:
            start = farthest_points(
                self.space.design_points(), list(self.complete), self.settings.initial_arms, self._rng(2)
            )
            for arm in start:
                if arm in open_arms and scorings() < self.settings.batch:
                    take(arm)
        model = self.model()
        if scorings() < self.settings.batch and model is not None:
            _, best = self.incumbent()
            # Arms proposed earlier and still running count as done at their predicted means.
            for arm in sorted(self.pending):
                mean, _ = model.predict(np.array([arm]))
                best = max(best, float(mean[0]))
                model = model.with_fantasy(arm, float(mean[0]))
            ratio = self.settings.gpu_cpu_ratio

            def cost(arm: int) -> float:
                cpu, gpu = self._cost(arm, embedded)
                return cpu + ratio * gpu

            candidates = np.setdiff1d(open_arms, arms)
            pick_batch(model, candidates, best, cost, take, lambda: scorings() >= self.settings.batch)
        if not arms and self.model() is None:
            # Fewer than two arms evaluated and the design exhausted: take any open affordable arm.
            for arm in open_arms:
                if take(arm):
                    break
        self.pending.update(arms)
        return self._actions(arms)

    def _actions(self, arms: list[int]) -> list[Action]:
        embeds: list[Action] = []
        scores: list[Action] = []
        seen: set[tuple[int, int]] = set()
        for arm in arms:
            c = self.space.checkpoint_of(arm)
            a = self.space.arm(arm)
            for t, task in enumerate(self.space.tasks):
                if not np.isnan(self.scores[arm, t]):
                    continue
                if not self.embedded[c, t] and (c, t) not in seen:
                    seen.add((c, t))
                    embeds.append(Embed(a.checkpoint, task))
                scores.append(Score(a.checkpoint, task, a.block))
        return embeds + scores
