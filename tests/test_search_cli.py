"""`layertime search SPEC` refuses a bad `search:` block before any work: one message naming the field
and the value, exit 2, nothing written (issue 21). The flow itself: tests/test_layer_search_flow.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from specs import demo_spec_file  # tests/specs.py
from typer.testing import CliRunner

from flows.commands import app


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon", 0), ("epsilon", 250), ("confidence", 1.0), ("confidence", 0.2),
     ("budget_cpu_h", 0), ("budget_cpu_h", -2), ("budget_gpu_h", "lots"), ("batch", 0)],
)  # fmt: skip
def test_search_refuses_a_bad_search_setting_before_any_work_naming_it(hub, tmp_path: Path, field, value):
    spec = demo_spec_file(tmp_path, hub, search={field: value})
    out = CliRunner().invoke(app, ["search", str(spec)])
    assert out.exit_code == 2, out.output
    assert f"search.{field}" in out.stderr and str(value) in out.stderr, out.stderr
    assert "Traceback" not in out.output and out.stderr.count("error:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no run root, no store


def test_search_refuses_an_unknown_search_field_naming_it(hub, tmp_path: Path):
    spec = demo_spec_file(tmp_path, hub, search={"budget_cpu_hours": 3})
    out = CliRunner().invoke(app, ["search", str(spec)])
    assert out.exit_code == 2 and "budget_cpu_hours" in out.stderr, out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
