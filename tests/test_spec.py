from pathlib import Path

import pytest

from layertime.spec import SpecError, expand_checkpoints, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "model": "org/model", "layers": "1..2", "run_root": "runs/t"}


def test_deployment_specs_match_the_design():
    exp1 = load_spec(ROOT / "deployments/exp1.yaml")
    exp2 = load_spec(ROOT / "deployments/exp2.yaml")
    assert (exp1.model, exp1.checkpoints, exp1.blocks(24)) == (
        "EleutherAI/pythia-410m",
        ["main"],
        list(range(15, 24)),
    )
    assert (
        exp2.checkpoints[0] == "step94000"
        and exp2.checkpoints[-1] == "step143000"
        and len(exp2.checkpoints) == 50
    )
    assert exp2.blocks(24) == [20, 21, 22, 23]
    for spec in (exp1, exp2):
        assert len(spec.tasks) == 32
        assert (spec.final_norm, spec.pooling, spec.normalize, spec.max_length) == (
            "all",
            "mean",
            False,
            2048,
        )
    demo = load_spec(ROOT / "deployments/demo.yaml")
    assert demo.tasks == [
        "DemoClassification",
        "DemoClustering",
        "DemoPairClassification",
        "DemoReranking",
        "DemoSTS",
    ]


def test_checkpoint_ranges_include_both_ends_and_keep_order():
    assert expand_checkpoints(["step0..step3000/1000", "main", "step1000"]) == [
        "step0", "step1000", "step2000", "step3000", "main",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ({"tasks": ["STS12", "NotATask"]}, "tasks", "NotATask"),
        ({"tasks": "no-such-suite"}, "tasks", "no-such-suite"),
        ({"checkpoints": ["step 1000"]}, "checkpoints[0]", "step 1000"),
        ({"checkpoints": ["main", "step100..step50/10"]}, "checkpoints[1]", "step100..step50/10"),
        ({"checkpoints": ["step0..step100/30"]}, "checkpoints[0]", "step0..step100/30"),
        ({"checkpoints": ["step0..other100/10"]}, "checkpoints[0]", "step0..other100/10"),
        ({"checkpoints": []}, "checkpoints", "empty"),
        ({"tasks": []}, "tasks", "empty"),
        ({"layers": []}, "layers", "empty"),
        ({"layers": "5..2"}, "layers", "5..2"),
        ({"layers": [-1]}, "layers", "-1"),
        ({"layers": {"last": 0}}, "layers", "0"),
        ({"layers": "first three"}, "layers", "first three"),
        ({"layer": [1]}, "layer", "unknown key"),
        ({"pooling": "max"}, "pooling", "max"),
        ({"max_length": 0}, "max_length", "0"),
    ],
)
def test_bad_specs_name_the_field_and_the_value(override, field, value):
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, **override})
    message = str(err.value)
    assert field in message and value in message, message


def test_missing_required_field_is_named():
    with pytest.raises(SpecError, match="run_root: missing"):
        parse_spec({k: v for k, v in BASE.items() if k != "run_root"})


def test_layer_forms_resolve_against_the_model():
    spec = parse_spec({**BASE, "layers": {"last": 4}})
    assert spec.blocks(24) == [20, 21, 22, 23]
    assert parse_spec({**BASE, "layers": "all"}).blocks(4) == [0, 1, 2, 3]
    assert parse_spec({**BASE, "layers": [3, 1, 3]}).blocks(4) == [3, 1]
    with pytest.raises(SpecError, match="block 24 is outside the model's 24 blocks"):
        parse_spec({**BASE, "layers": "20..24"}).blocks(24)
    with pytest.raises(SpecError, match="last 30"):
        parse_spec({**BASE, "layers": {"last": 30}}).blocks(24)


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(bad)
