"""The layer search (layertime/search/search.py) on synthetic grids built in code: it finds the best arm
within epsilon under budget, its stop rule is calibrated, and it is resumable and plain (picklable)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from search_grids import smooth_grid  # tests/search_grids.py

from layertime.search import Embed, Score, Search
from layertime.search.replay import Oracle, grid_from_arrays, replay
from layertime.spec import SearchSpec

STEPS = [0, 1, 4, 16, 64, 256, 600, 1000, 1500, 2000, 2500, 3000, 3500]


def drive(search: Search, oracle: Oracle, batches: int) -> list[list]:
    """Run `batches` proposals of `search` against `oracle`; the proposals."""
    proposals = []
    for _ in range(batches):
        actions = search.propose()
        proposals.append(actions)
        for action in actions:
            if isinstance(action, Embed):
                search.observe_embedding(*action, oracle.embed(*action))
            else:
                score, seconds = oracle.score(*action)
                search.observe(*action, score, seconds)
    return proposals


def observed(search: Search) -> list[tuple[str, str, int, float]]:
    space = search.space
    return [
        (space.arm(a).checkpoint, space.tasks[t], space.arm(a).block, search.scores[a, t] / 100)
        for a, t in zip(*np.nonzero(~np.isnan(search.scores)), strict=True)
    ]


def test_a_search_rebuilt_from_the_same_observations_proposes_the_same_batch() -> None:
    grid = smooth_grid(STEPS, blocks=6, tasks=3, seed=0)
    first = Search(grid.space, SearchSpec(seed=3, batch=6))
    drive(first, Oracle(grid), batches=5)
    rebuilt = Search(grid.space, SearchSpec(seed=3, batch=6))
    for checkpoint, task, block, score in reversed(observed(first)):  # any order
        rebuilt.observe(checkpoint, task, block, score)
    rebuilt.embedded[:] = first.embedded  # the store's embeddings, as a flow would find them
    copy = pickle.loads(pickle.dumps(first))  # a search pickles to a worker or a flow and back
    batch = first.propose()
    assert batch and rebuilt.propose() == batch and copy.propose() == batch


def test_proposals_are_whole_arms_embeddings_first_and_never_repeated_while_pending() -> None:
    grid = smooth_grid(STEPS, blocks=6, tasks=3, seed=1)
    search = Search(grid.space, SearchSpec(seed=0, batch=5))
    first = search.propose()
    second = search.propose()  # nothing observed yet: the first batch is pending
    scores = [a for a in first + second if isinstance(a, Score)]
    assert len(set(scores)) == len(scores)
    arms = {(a.checkpoint, a.block) for a in scores}
    assert len(scores) == 3 * len(arms)  # every task of each arm
    assert sum(isinstance(a, Score) for a in first) >= 5  # at least the batch, in whole arms
    for batch in (first, second):
        embeds = [i for i, a in enumerate(batch) if isinstance(a, Embed)]
        assert embeds == list(range(len(embeds)))  # embeddings before any scoring
        assert {(a.checkpoint, a.task) for a in batch if isinstance(a, Score)} <= {
            (a.checkpoint, a.task) for a in batch if isinstance(a, Embed)
        }


def test_evaluated_arms_are_exact_and_the_choice_is_the_best_evaluated() -> None:
    grid = smooth_grid(STEPS, blocks=6, tasks=3, seed=2)
    search = Search(grid.space, SearchSpec(seed=0, batch=6))
    drive(search, Oracle(grid), batches=6)
    post = search.posterior()
    done = np.flatnonzero(post.evaluated)
    assert len(done) == len(search.complete) >= 6
    assert np.allclose(post.mean[done], grid.values[done]) and np.all(post.sd[done] == 0)
    assert np.all(post.sd[~post.evaluated] > 0)
    choice = search.chosen()
    assert choice.value == pytest.approx(grid.values[done].max())
    assert choice.arm.index == done[np.argmax(grid.values[done])]
    assert choice.best_upper >= choice.value and 0 <= choice.probability <= 1
    assert post.p_best.sum() == pytest.approx(1.0)


def test_bad_observations_are_refused_naming_them() -> None:
    grid = smooth_grid([0, 10], blocks=2, tasks=2)
    search = Search(grid.space)
    with pytest.raises(KeyError, match="task 'nope' is not one of the search's tasks"):
        search.observe("step0", "nope", 0, 0.5)
    with pytest.raises(KeyError, match=r"\(step7, block 0\) is not an arm"):
        search.observe("step7", "t0", 0, 0.5)
    with pytest.raises(ValueError, match="score of \\(step0, t0, block 1\\) is nan"):
        search.observe("step0", "t0", 1, float("nan"))


def test_the_budget_is_never_overrun_and_stops_the_search() -> None:
    grid = smooth_grid(STEPS, blocks=6, tasks=3, seed=3)
    # An arm costs 1 + 2 + 3 = 6 scoring CPU-s: 10 arms fit in 60 s.
    settings = SearchSpec(seed=0, batch=3, budget_cpu_h=60 / 3600, epsilon=0.01, confidence=0.99)
    trace = replay(grid, settings, cpu_cap=float("inf"))
    assert trace[-1].cpu_s <= 60 + 1e-9
    assert trace[-1].stop and trace[-1].reason.startswith("budget spent")
    gpu = replay(
        grid, settings.model_copy(update={"budget_cpu_h": None, "budget_gpu_h": 20 / 3600}), float("inf")
    )
    assert gpu[-1].gpu_s <= 20 + 1e-9 and gpu[-1].reason.startswith("budget spent")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_finds_the_planted_best_with_a_fraction_of_the_cost(seed: int) -> None:
    # The landscape plants its best at the last checkpoint, depth ~0.7 (search_grids.landscape); the
    # grid's values (the task means of its cells) say which arm that is, independently of the search.
    grid = smooth_grid(STEPS, blocks=6, tasks=3, seed=seed, roughness=0.2)
    trace = replay(grid, SearchSpec(seed=seed, batch=6), cpu_cap=grid.cost()[0])
    stop = next(p for p in trace if p.stop)
    assert stop.reason.startswith("P(best within 0.5 points)")
    assert stop.regret <= 0.5
    assert stop.cpu_s <= 0.3 * grid.cost()[0]  # 78 arms: the whole grid is never needed


def test_the_stop_rule_waits_for_the_initial_design() -> None:
    # A flat landscape: every arm is worth the same, so once the model exists it is sure at once that
    # no arm beats the incumbent by 0.5 points; the rule still waits for `initial_arms` arms.
    scores = np.full((len(STEPS), 2, 4), 0.5)
    grid = grid_from_arrays("flat", STEPS, scores)
    search = Search(grid.space, SearchSpec(seed=0, batch=2, initial_arms=5))
    oracle = Oracle(grid)
    verdicts = []
    while not (stop := search.should_stop()).stop:
        verdicts.append((len(search.complete), stop.probability))
        drive(search, oracle, batches=1)
    assert [n for n, _ in verdicts] == [0, 1, 2, 3, 4]
    assert verdicts[2][1] is not None and verdicts[2][1] > 0.95  # sure already at two arms, yet waits
    assert len(search.complete) == 5 and stop.reason.startswith("P(best within")
