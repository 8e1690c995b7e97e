"""The orchestration benchmark's SLURM variant (issue 15): `benchmarks/orchestration.py --cluster slurm`.

The scale world at 1 checkpoint × 4 layers × 32 tasks (128 evaluations) through a real `prefect server
start` on PostgreSQL, a process work pool, `prefect deployment run 'layer-by-layer/scale'` with
cluster="slurm", and worker jobs on the real single-node SLURM (`bash .ci/slurm.sh start`), driven by
the benchmark's own `run_backend`. The flow run must complete with every task run once and Completed,
every unit once in the tables, and the units scored inside this run's SLURM jobs (their completion
records name the job), which SLURM's job-completion log must list.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import orchestration as orch  # noqa: E402 -- benchmarks/ is not a package

from layertime.plan import make_plan  # noqa: E402
from layertime.spec import load_spec  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sinfo") is None, reason="no SLURM here (sinfo is not on PATH)"),
]
CHECKPOINTS = 1
JOBS = 2


@pytest.fixture(scope="module")
def slurm(exclusive):
    """SLURM answers, or the test says how to start it; its node to this module alone (across
    pytest-xdist workers)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and " up " in f" {out.stdout} ", (
        f"SLURM is installed but not answering ({out.stderr.strip()}): run `bash .ci/slurm.sh start`"
    )
    with exclusive("slurm"):
        yield


def test_the_benchmark_runs_the_scale_world_in_slurm_jobs(slurm, postgres_url, tmp_path, monkeypatch):
    from layertime.demo.scale_model import ensure_scale_model

    for key in [k for k in os.environ if k.startswith("LAYERTIME_SLURM_")]:  # the benchmark's sizes only
        monkeypatch.delenv(key)
    ensure_scale_model(ROOT / ".cache" / "scale-hub")
    work = tmp_path / "postgres"
    slurm_jobs = orch.SlurmJobs(JOBS, work, timeout=1500)
    result = orch.run_backend(
        "postgres", CHECKPOINTS, 2, work, orch.free_port(), postgres_url, 1500, slurm_jobs
    )
    print(json.dumps(result, indent=1))

    assert result["state"] == "COMPLETED", result["message"]
    plan = make_plan(load_spec(orch.SPEC, **orch.scale_overrides(CHECKPOINTS, work)))
    states = result["states"]
    assert states["task runs"] == states["expected"] == sum(orch.expected_task_runs(plan).values()), states
    assert states["lost"] == {} and states["duplicated"] == [] and states["not final"] == 0, states
    assert states["by state"] == {"COMPLETED": states["expected"]}, states
    tables = result["tables"]
    assert plan.evaluations == CHECKPOINTS * 4 * 32
    assert tables["distinct units"] == tables["score rows"] == plan.evaluations, tables
    assert tables["units twice"] == 0

    # The work ran in this run's SLURM jobs: SLURM recorded them, and every unit's record names one.
    assert result["cluster"] == "slurm"
    jobs = result["slurm"]
    assert jobs["jobs ran"] >= 1 and jobs["jobs submitted"] >= jobs["jobs ran"], jobs
    assert jobs["jobs left in the queue"] == [] and sum(jobs["job states"].values()) == jobs["jobs submitted"]
    records = list((work / "store" / "scores").rglob("layer_*.json"))
    scored_in = {json.loads(p.read_text())["provenance"]["slurm_job_id"] for p in records}
    assert len(records) == plan.evaluations and scored_in <= set(jobs["job ids"]), (scored_in, jobs)
    assert 1 <= jobs["jobs at once"] <= JOBS and 1 <= jobs["scoring slots"] <= jobs["node cpus"], jobs
    assert result["jobs peak rss GB"] > 0  # the jobs' processes were found and sampled
    assert result["server log"]["database is locked"] == 0 and result["server log"]["HTTP 5xx"] == 0
