"""The layer search's deployments in prefect.yaml (issue 21): `search-410m` is Pythia-410m's whole grid
(154 checkpoints x 24 blocks, the 32 tasks, rule a) and `search-demo` the trained toy trajectory, both
runs of the `layer-search` flow."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from layertime.plan import make_plan
from layertime.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


@pytest.mark.parametrize("name", ["search-410m", "search-demo"])
def test_search_deployments_run_the_layer_search_flow_on_their_spec(name):
    deployment = DEPLOYMENTS[name]
    path, function = deployment["entrypoint"].split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert getattr(module, function).name == "layer-search"
    assert deployment["parameters"]["spec"] == f"deployments/{name}.yaml"


def test_search_410m_is_pythias_whole_grid_on_the_32_tasks_rule_a():
    spec = load_spec(ROOT / "deployments/search-410m.yaml")
    plan = make_plan(spec, resolve=False)
    steps = [c.step for c in plan.checkpoints]
    assert steps == [0] + [2**i for i in range(10)] + list(range(1000, 143001, 1000))
    assert len(plan.checkpoints) == 154 and plan.blocks == list(range(24))
    assert len(plan.tasks) == 32 and spec.aggregation == "rule-a"
    assert spec.metrics is not None and spec.metrics.all_layers and spec.search is not None
