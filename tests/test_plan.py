import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layertime.plan import combined, make_plan
from layertime.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]


def _spec(name: str, hub: Path, **overrides):
    return load_spec(ROOT / f"deployments/{name}.yaml", hf_cache=str(hub), **overrides)


def test_exp1_and_exp2_grids_and_their_overlap(hub):
    exp1, exp2 = make_plan(_spec("exp1", hub)), make_plan(_spec("exp2", hub))
    assert exp1.resolved and exp2.resolved and exp1.num_blocks == 24
    assert exp1.evaluations == 288 and exp2.evaluations == 6400
    assert exp2.summary()["units"] == {"score": 6400, "embed": 1600, "measure": 50}
    # main and step143000 are one commit: exp1's blocks 20..23 at main are exp2's last checkpoint.
    assert exp1.checkpoints[0].commit == exp2.checkpoints[-1].commit
    both = combined([exp1, exp2])
    assert both == {
        "evaluations": 6688,
        "score_units": 6688,
        "distinct_score_units": 6560,
        "shared_score_units": 128,
    }


def test_revisions_sharing_a_commit_are_one_unit(hub):
    plan = make_plan(_spec("demo", hub))
    assert [c.revision for c in plan.checkpoints] == ["step0", "step1000", "step2000", "step3000", "main"]
    assert plan.evaluations == 5 * 4 * 5
    assert len(plan.distinct_checkpoints()) == 4 and len(plan.units()) == 4 * 4 * 5


def test_block_outside_the_model_is_rejected_against_its_config(hub):
    with pytest.raises(SpecError, match="layers: block 24 is outside the model's 24 blocks"):
        make_plan(_spec("exp2", hub, layers="20..24"))


def test_offline_without_a_cache_still_counts_and_says_so(tmp_path):
    plan = make_plan(_spec("exp2", tmp_path / "empty-hub"))
    assert plan.evaluations == 6400 and not plan.resolved and plan.num_blocks is None
    assert any("commit resolution skipped" in n for n in plan.notes)
    assert any("block range not checked" in n for n in plan.notes)


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "layertime.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)  # fmt: skip


def test_cli_plan_json_prints_the_grids(hub):
    out = _cli("plan", "deployments/exp1.yaml", "deployments/exp2.yaml", "--json",
               env_extra={"HF_HUB_CACHE": str(hub)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [p["evaluations"] for p in data["plans"]] == [288, 6400]
    assert data["combined"]["shared_score_units"] == 128


def test_cli_rejects_a_bad_spec_with_one_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: a/b\nlayers: '1..2'\nrun_root: r\ntasks: [STS12, Nope]\n")
    out = _cli("plan", str(bad), "--json")
    assert out.returncode != 0
    assert "tasks: unknown task 'Nope'" in out.stderr and "Traceback" not in out.stderr


def test_the_plan_gives_the_cost_model_its_grid_and_model_shape(hub, tmp_path):
    grid = make_plan(_spec("exp2", hub)).cost_grid()
    assert (grid.checkpoints, grid.layers, len(grid.tasks), grid.num_blocks, grid.hidden) == (
        50,
        4,
        32,
        24,
        1024,
    )
    assert grid.measure_views == (2, 16) and grid.max_length == 2048
    offline = make_plan(_spec("exp2", tmp_path / "empty-hub"))
    assert offline.cost_grid().hidden == 1024
    assert any("cost estimates assume Pythia-410m" in n for n in offline.notes)
