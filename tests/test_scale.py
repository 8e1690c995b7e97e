"""exp2's shape at reduced size through a real Prefect server on PostgreSQL (issue 15).

The scale world (`deployments/scale.yaml`: the demo model with exp2's revisions, 32 tiny local tasks)
at 4 checkpoints × 4 layers × 32 tasks = 512 evaluations (165 task runs: 32 record, 4 gpu, 128 score
of 4 layers each, 1 merge), the way users run exp2:
`prefect server start` on PostgreSQL (`.ci/postgres.sh`, PREFECT_API_DATABASE_CONNECTION_URL), a
process work pool, `prefect deploy`, a worker, `prefect deployment run 'layer-by-layer/scale'`. The
plan must hold exactly in the tables and in the API, the server log must be clean, and the run's log
readable. The same functions drive `benchmarks/orchestration.py` at full size.
"""

import collections
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import orchestration as orch  # noqa: E402 -- benchmarks/ is not a package

from layertime.plan import make_plan  # noqa: E402
from layertime.spec import load_spec  # noqa: E402

pytestmark = pytest.mark.slow
CHECKPOINTS = 4  # 512 evaluations: minutes, where exp2's 50 take the benchmark's hour


@pytest.fixture(scope="module")
def scale_run(postgres_url, tmp_path_factory) -> dict:
    """One deployment run of the reduced scale world on a fresh PostgreSQL database; what was seen."""
    from layertime.demo.scale_model import ensure_scale_model

    ensure_scale_model(ROOT / ".cache" / "scale-hub")
    work = tmp_path_factory.mktemp("scale")
    overrides = orch.scale_overrides(CHECKPOINTS, work)
    database = orch.fresh_postgres_database(postgres_url, f"layertime_test_scale_{os.getpid()}")
    server = orch.start_server(work / "prefect-home", orch.free_port(), database)
    worker = None
    try:
        orch.deploy(server)
        worker = orch.start_worker(server, work / "worker.log")
        flow_run = orch.run_deployment(server, overrides, {"scoring_processes": 2})
        seen = orch.watch(server, flow_run, worker, timeout=1500, every=10)
        runs = orch.task_runs(server, flow_run)
        logs = orch.flow_run_logs(server, flow_run)
    finally:
        if worker is not None:
            orch.stop(worker)
        orch.stop(server.proc)
    return {"seen": seen, "runs": runs, "logs": logs, "server": server, "work": work, "overrides": overrides,
            "plan": make_plan(load_spec(orch.SPEC, **overrides))}  # fmt: skip


def test_layertime_plan_prints_exp2s_exact_shape_for_the_scale_world():
    """`layertime plan deployments/scale.yaml`: 6,400 evaluations, 1,600 embed and 50 metrics units."""
    import subprocess

    from layertime.demo.scale_model import ensure_scale_model

    ensure_scale_model(ROOT / ".cache" / "scale-hub")  # the spec's hf_cache; `plan` reads the config
    out = subprocess.run([str(Path(sys.executable).parent / "layertime"), "plan", "deployments/scale.yaml"],
                         cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines() if line.strip()}
    assert lines["checkpoints"].startswith("50 (50 distinct commits)")
    assert lines["layers"].startswith("4 (blocks 0..3")
    assert lines["tasks"] == "32"
    assert lines["evaluations"] == "6,400"
    assert lines["units"] == "score 6,400, embed 1,600, measure 50"


def test_every_unit_once_through_a_real_server_on_postgresql(scale_run):
    seen, plan = scale_run["seen"], scale_run["plan"]
    assert seen.state == "COMPLETED", seen.message
    tables = orch.table_check(Path(scale_run["overrides"]["run_root"]), plan)
    assert tables["distinct units"] == tables["score rows"] == plan.evaluations == CHECKPOINTS * 4 * 32
    states = orch.state_check(scale_run["runs"], plan)
    assert states["task runs"] == states["expected"], states
    assert states["lost"] == {} and states["duplicated"] == [] and states["not final"] == 0, states
    assert states["by state"] == {"COMPLETED": states["expected"]}, states


def test_the_server_and_the_flow_log_no_errors(scale_run):
    assert orch.log_errors(scale_run["server"].log) == dict.fromkeys(orch.LOG_PATTERNS, 0), scale_run[
        "server"
    ].log.read_text()[-3000:]
    assert orch.log_errors(scale_run["work"] / "worker.log") == dict.fromkeys(orch.LOG_PATTERNS, 0)
    assert scale_run["seen"].ui_errors == []


def test_the_runs_log_stays_readable_at_hundreds_of_task_runs(scale_run):
    """No "Finished in state Completed()" line per task run: the Logs tab shows the flow's own lines."""
    logs, runs, plan = scale_run["logs"], scale_run["runs"], scale_run["plan"]
    finished = [m for m in logs if m["task_run_id"] and m["message"].startswith("Finished in state")]
    assert len(runs) == 32 + CHECKPOINTS + CHECKPOINTS * 32 + 1  # record, gpu, score, merge
    assert finished == [], f"{len(finished)} task runs' 'Finished in state' lines of {len(logs)} lines"
    # A score task run (one per (checkpoint, task), its 4 layers) logs one line, the 4 layers' scores;
    # a gpu task what it does (loading, measuring, one line per task it embeds); a recording pass one
    # line; the flow a few of its own.
    score = {r["id"]: r["name"] for r in runs if r["name"].startswith("score[")}
    revisions = [c.revision for c in plan.distinct_checkpoints()]
    assert sorted(score.values()) == sorted(f"score[{r} · {t} · L0-3]" for r in revisions for t in plan.tasks)
    per_score = collections.Counter(m["task_run_id"] for m in logs if m["task_run_id"] in score)
    assert set(per_score.values()) <= {1}, per_score.most_common(3)
    for m in logs:
        if m["task_run_id"] in score:
            revision, task = score[m["task_run_id"]].removeprefix("score[").split(" · ")[:2]
            assert m["message"].startswith(f"scored {revision} · {task} layer 0: main score ") and all(
                f"layer {b}: main score " in m["message"] for b in range(4)
            ), m["message"]
    gpu, record = (sum(r["name"].startswith(kind) for r in runs) for kind in ("gpu[", "record["))
    assert len(logs) <= 50 + gpu * (3 + record) + record + len(score), [m["message"] for m in logs[:20]]
