"""The task suites: which MTEB tasks a spec names, with their types, subsets and splits (docs/design.md §4).

The 32 tasks of the paper's Table 1 are kept here as plain names so that planning and spec
validation never import mteb; mteb task objects are built only when a task is scored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from layertime.errors import Permanent

SUITE_32 = "layer-by-layer-32"
SUITE_DEMO = "demo-5"
SUITE_SCALE = "scale-32"

TASK_TYPES: dict[str, list[str]] = {
    "Classification": [
        "AmazonCounterfactualClassification",
        "AmazonReviewsClassification",
        "Banking77Classification",
        "EmotionClassification",
        "MassiveIntentClassification",
        "MassiveScenarioClassification",
        "MTOPDomainClassification",
        "MTOPIntentClassification",
        "ToxicConversationsClassification",
        "TweetSentimentExtractionClassification",
    ],
    "Clustering": [
        "ArxivClusteringS2S",
        "BiorxivClusteringS2S",
        "MedrxivClusteringS2S",
        "RedditClustering",
        "StackExchangeClustering",
        "TwentyNewsgroupsClustering",
    ],
    "PairClassification": ["SprintDuplicateQuestions", "TwitterSemEval2015", "TwitterURLCorpus"],
    "Reranking": ["AskUbuntuDupQuestions", "MindSmallReranking", "SciDocsRR", "StackOverflowDupQuestions"],
    "STS": ["BIOSSES", "SICK-R", "STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STSBenchmark"],
}
LAYER_BY_LAYER_32: tuple[str, ...] = tuple(name for names in TASK_TYPES.values() for name in names)

DEMO_TASK_TYPES: dict[str, str] = {
    "DemoClassification": "Classification",
    "DemoClustering": "Clustering",
    "DemoPairClassification": "PairClassification",
    "DemoReranking": "Reranking",
    "DemoSTS": "STS",
}

# The scale world (layertime/demo/scale_tasks.py): one tiny local task per suite task, of its type.
SCALE_TASK_TYPES: dict[str, str] = {
    f"Scale{name}": kind for kind, names in TASK_TYPES.items() for name in names
}

SUITES: dict[str, tuple[str, ...]] = {
    SUITE_32: LAYER_BY_LAYER_32,
    SUITE_DEMO: tuple(DEMO_TASK_TYPES),
    SUITE_SCALE: tuple(SCALE_TASK_TYPES),
}

# Rule (a) of the paper: these tasks are scored on other subsets than MTEB(eng, v1) pins.
RULE_A_SUBSETS: dict[str, tuple[str, ...]] = {
    "AmazonCounterfactualClassification": ("en", "en-ext"),
    "STS17": ("en-en",),
}
BENCHMARK = "MTEB(eng, v1)"
SPLIT = "test"

# The range of each main score the suites' tasks report (mteb 2.26: `task.metadata.main_score`).
# Accuracy, V-measure, max AP and MAP@1000 (MindSmallReranking: its max over sub-queries) are
# fractions; cosine Spearman is a rank correlation. A score outside its range is no score.
MAIN_SCORE_RANGE: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "v_measure": (0.0, 1.0),
    "max_ap": (0.0, 1.0),
    "map_at_1000": (0.0, 1.0),
    "max_over_subqueries_map_at_1000": (0.0, 1.0),
    "cosine_spearman": (-1.0, 1.0),
}


class UnknownTask(Permanent, KeyError):
    """A task name that no layertime suite (or mteb's benchmark) holds."""


def task_type(name: str) -> str:
    """The MTEB task type of a suite task ('Classification', 'STS', ...)."""
    if name in DEMO_TASK_TYPES or name in SCALE_TASK_TYPES:
        return {**DEMO_TASK_TYPES, **SCALE_TASK_TYPES}[name]
    for kind, names in TASK_TYPES.items():
        if name in names:
            return kind
    raise UnknownTask(f"task {name!r} is not in any layertime suite")


def known_tasks() -> set[str]:
    """Every task name a spec may list without importing mteb."""
    return set(LAYER_BY_LAYER_32) | set(DEMO_TASK_TYPES) | set(SCALE_TASK_TYPES)


def is_demo_task(name: str) -> bool:
    """A task built in memory (the demo's or the scale world's): no dataset to fetch."""
    return name in DEMO_TASK_TYPES or name in SCALE_TASK_TYPES


def build_task(name: str, aggregation: str = "rule-a") -> Any:
    """A fresh mteb task object for `name`, restricted to the test split and the suite's subsets.

    Fresh on every call: `.v2` clustering tasks advance an RNG per evaluation (docs/design.md §4), so
    one instance must never be evaluated twice.
    """
    if name in SCALE_TASK_TYPES:
        from layertime.demo.scale_tasks import scale_task

        return scale_task(name, SCALE_TASK_TYPES[name]).filter_eval_splits([SPLIT])
    if is_demo_task(name):
        from layertime.demo.tasks import demo_task

        return demo_task(name).filter_eval_splits([SPLIT])
    import mteb

    tasks = {t.metadata.name: t for t in mteb.get_benchmark(BENCHMARK).tasks}
    if name not in tasks:
        raise UnknownTask(f"task {name!r} is not in mteb's {BENCHMARK}")
    task = type(tasks[name])()  # a fresh instance, then apply the benchmark's filters again
    task.filter_eval_splits([SPLIT])
    subsets = list(tasks[name].hf_subsets)
    if aggregation == "rule-a" and name in RULE_A_SUBSETS:
        subsets = list(RULE_A_SUBSETS[name])
    task.filter_languages(None, hf_subsets=subsets)
    return task


@dataclass(frozen=True)
class Requested:
    """What one evaluation of a task yields: a main score (`metric`, inside `bounds`) for each of
    exactly these (split, subset) pairs."""

    scores: frozenset[tuple[str, str]]
    metric: str
    bounds: tuple[float, float]


@functools.cache
def requested(name: str, aggregation: str = "rule-a") -> Requested:
    """The (split, subset) pairs `name` is evaluated on under `aggregation` (the test split, the
    suite's subsets: `build_task`) and its main score's range. Builds the task (imports mteb)."""
    task = build_task(name, aggregation)
    metric = task.metadata.main_score
    if metric not in MAIN_SCORE_RANGE:
        raise UnknownTask(f"task {name!r}: main score {metric!r} has no range in suite.MAIN_SCORE_RANGE")
    pairs = frozenset((split, subset) for split in task.eval_splits for subset in task.hf_subsets)
    return Requested(pairs, metric, MAIN_SCORE_RANGE[metric])
