"""The search block of a spec: bad epsilon, confidence, budgets and batch sizes are refused before any
work, each with one message naming the field and the value (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from layertime.spec import SearchSpec, SpecError, load_spec, parse_spec

BASE = {
    "name": "s",
    "model": "layertime/tiny-neox",
    "layers": "all",
    "run_root": "/tmp/layertime-search-spec",
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon", 0),
        ("epsilon", -0.5),
        ("epsilon", 101),
        ("epsilon", "nan"),
        ("confidence", 1.0),
        ("confidence", 0.3),
        ("confidence", 1.5),
        ("budget_cpu_h", 0),
        ("budget_cpu_h", -3),
        ("budget_cpu_h", "inf"),
        ("budget_gpu_h", 0),
        ("budget_gpu_h", "many"),
        ("batch", 0),
        ("initial_arms", 1),
        ("gpu_cpu_ratio", 0),
        ("seed", -1),
    ],
)
def test_bad_values_are_refused_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({**BASE, "search": {field: value}})
    message = str(caught.value)
    assert f"search.{field}" in message
    assert str(value) in message


def test_unknown_key_in_the_search_block_is_named() -> None:
    with pytest.raises(SpecError, match=r"unknown key 'search\.epsilom' \(allowed: epsilon, confidence"):
        parse_spec({**BASE, "search": {"epsilom": 0.5}})


def test_defaults_are_the_issues() -> None:
    spec = parse_spec({**BASE, "search": {}})
    assert spec.search == SearchSpec(epsilon=0.5, confidence=0.95)
    assert spec.search.budget_cpu_h is None and spec.search.budget_gpu_h is None
    assert parse_spec(BASE).search is None  # a grid spec without the block runs no search


def test_the_search_block_changes_the_digest_and_only_when_present() -> None:
    plain = parse_spec(BASE)
    searched = parse_spec({**BASE, "search": {"epsilon": 1.0}})
    assert plain.digest != searched.digest
    assert plain.digest == parse_spec({**BASE, "search": None}).digest


def test_a_spec_file_with_a_search_block_loads(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "search": {"epsilon": 0.25, "budget_cpu_h": 2.5, "batch": 64}}))
    spec = load_spec(path)
    assert (spec.search.epsilon, spec.search.budget_cpu_h, spec.search.batch) == (0.25, 2.5, 64)


def test_the_search_demo_deployment_is_the_trajectory_grid() -> None:
    spec = load_spec(Path(__file__).parent.parent / "deployments" / "search-demo.yaml")
    from layertime.demo.trajectory import TRAJECTORY_REPO, TRAJECTORY_STEPS

    assert spec.model == TRAJECTORY_REPO
    assert spec.checkpoints == [f"step{s}" for s in TRAJECTORY_STEPS]
    assert spec.metrics is not None and spec.metrics.all_layers
