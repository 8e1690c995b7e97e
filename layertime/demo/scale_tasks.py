"""The scale world's 32 tasks: exp2's task list, each a tiny local task of the same type (issue 15).

`Scale<Name>` stands for the suite task `<Name>` (`ScaleSTS12` for STS12, `ScaleMindSmallReranking`
for MindSmallReranking): 10 classification, 6 clustering, 3 pair classification, 4 reranking and 9
STS tasks, as in the paper's 32. Each is the demo task of its type (`layertime.demo.tasks`: the same
generated data, the same mteb evaluator), made cheaper still so that 6,400 evaluations take minutes of
CPU, not hours: classification runs one experiment instead of ten, clustering one set of 75 instead
of two. Every unit is real: recorded, embedded by the model, scored by mteb, merged.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from layertime.demo import tasks as demo

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask

SCALE_DATA_REVISION = "scale-v1"

# The demo task each type is built from.
_BASES: dict[str, type] = {
    "Classification": demo.DemoClassification,
    "Clustering": demo.DemoClustering,
    "PairClassification": demo.DemoPairClassification,
    "Reranking": demo.DemoReranking,
    "STS": demo.DemoSTS,
}


class _OneExperiment:
    """Classification: one logistic-regression experiment (mteb's default is 10)."""

    n_experiments = 1


class _OneSet:
    """Legacy clustering: the first of the demo's two sets only."""

    def _build(self) -> Any:
        data = super()._build()  # type: ignore[misc]
        data[demo.SPLIT] = data[demo.SPLIT].select([0])
        return data


_CHEAPER: dict[str, tuple[type, ...]] = {"Classification": (_OneExperiment,), "Clustering": (_OneSet,)}


@functools.cache
def _task_class(name: str, kind: str) -> type:
    """The class of scale task `name` of type `kind`: that type's demo task under the new name and
    dataset revision. The suite (layertime/suite.py) names the tasks and their types."""
    base = _BASES[kind]
    slug = name.removeprefix("Scale").lower()
    metadata = base.metadata.model_copy(
        update={
            "name": name,
            "description": f"The scale world's stand-in for {name.removeprefix('Scale')}: {base.metadata.description}",
            "dataset": {"path": f"layertime/scale-{slug}", "revision": SCALE_DATA_REVISION},
        }
    )
    return type(name.replace("-", "_"), (*_CHEAPER.get(kind, ()), base), {"metadata": metadata})


def scale_task(name: str, kind: str) -> AbsTask:
    """A fresh instance of scale task `name` of type `kind` (fresh: mteb tasks keep state between
    evaluations)."""
    if not name.startswith("Scale") or kind not in _BASES:
        raise KeyError(f"unknown scale task {name!r} of type {kind!r}")
    return _task_class(name, kind)()
