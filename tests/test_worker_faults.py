"""A lab's first week on the cluster (issue 23), at the level the user sees: the demo deployment run by a
real process worker against a real Prefect server, its tasks in SLURM jobs of the `slurm-cpu` profile
on the single-node SLURM of `.ci/slurm.sh`, states read from the API.

- a cancel stops the run in seconds, `scancel`s its jobs and ends Cancelled, with no traceback in the
  worker's log;
- a cancel after the server restarted (the worker's cancellation observer has given up) does the same;
- `kill -9` of the worker: the flow run ends Crashed within a minute, no process or job of it is left,
  and a new worker's re-run of the deployment computes only the missing units;
- Ctrl-C of `layertime run --cluster slurm-cpu`: its jobs are cancelled and its flow run is Cancelled.

One server and one `demo` deployment for the module; the smallest grid that proves each point. The
jobs' python is the venv's behind a `sitecustomize` that holds one step of the work (an embedding, or
one task's scoring) while a flag file exists, so each fault lands mid-run, deterministically.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import test_signals  # the process census of a run (its session, parents and environment marker)
import test_slurm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import orchestration as orch  # noqa: E402 -- benchmarks/ is not a package

pytestmark = [pytest.mark.slow, test_slurm.needs_slurm]
slurm = test_slurm.slurm  # the fixture, found by name in this module
PROFILE = "slurm-cpu"
CANCELLED_WITHIN_S = 30
CRASHED_WITHIN_S = 60
STARTED_WITHIN_S = 900  # a worker, a flow run and a SLURM job starting on a loaded 2-core machine

# The jobs' python: holds one step while LAYERTIME_TEST_HOLD (a file) exists, after writing its pid to
# LAYERTIME_TEST_HELD. LAYERTIME_TEST_HOLD_AT: "embed" (writing a unit's embeddings) or "score:<task>".
_HOLD = """
import os, time
from pathlib import Path

_at, _flag, _held = (os.environ.get(k) for k in ("LAYERTIME_TEST_HOLD_AT", "LAYERTIME_TEST_HOLD", "LAYERTIME_TEST_HELD"))

def _hold():
    if _flag and Path(_flag).exists():
        Path(_held).write_text(str(os.getpid()))
        while Path(_flag).exists():
            time.sleep(0.2)

if _at:
    from layertime.phases import embed, score
    if _at == "embed":
        _save = embed.save_array
        def save_array(path, array):
            _hold()
            _save(path, array)
        embed.save_array = save_array
    else:
        _score, _task = score.score_unit, _at.split(":", 1)[1]
        def score_unit(ctx, ckpt, task, *args, **kwargs):
            if task == _task:
                _hold()
            return _score(ctx, ckpt, task, *args, **kwargs)
        score.score_unit = score_unit
"""


class Api:
    """The module's Prefect server (on SQLite in its own home); `restart` keeps its port and database.

    Not the session's `prefect_server`: one test here restarts the server (the worker's cancellation
    observer must survive it), which would break every other test of the session that uses it."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, orch.free_port()
        self.server = orch.start_server(home, self.port, None)

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    def restart(self) -> None:
        orch.stop(self.server.proc)
        self.server = orch.start_server(self.home, self.port, None)

    def flow_run(self, flow_run: str) -> dict:
        return httpx.get(f"{self.server.api}/flow_runs/{flow_run}", timeout=60).json()

    def task_runs(self, flow_run: str) -> list[str]:
        return [r["name"] for r in orch.task_runs(self.server, flow_run)]

    def until_final(self, flow_run: str, within_s: float) -> tuple[dict, float]:
        """The flow run's final state and the seconds it took; fails after `within_s`."""
        started = time.monotonic()
        while time.monotonic() - started < within_s:
            state = self.flow_run(flow_run).get("state") or {}
            if state.get("type") in orch.FINAL:
                return state, time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"flow run {flow_run} not final after {within_s} s: {state}")


@pytest.fixture(scope="module")
def api(tmp_path_factory, slurm):
    api = Api(tmp_path_factory.mktemp("prefect-home"))
    try:
        orch.prefect(api.env, "work-pool", "create", orch.POOL, "--type", "process")
        orch.prefect(api.env, "--no-prompt", "deploy", "--name", "demo")
        yield api
    finally:
        orch.stop(api.server.proc)


class Lab:
    """One test's world: the worker's environment (the profile's fields are set where the worker
    starts, as docs/clusters.md says), its SLURM job name, its held step, its process marker."""

    def __init__(self, api: Api, tmp_path: Path, hub: Path, hold_at: str) -> None:
        self.api, self.tmp, self.hub = api, tmp_path, hub
        self.marker, self.job_name = uuid.uuid4().hex, f"lt-{uuid.uuid4().hex[:10]}"
        self.flag, self.held = tmp_path / "hold", tmp_path / "held"
        self.flag.write_text("")
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_HOLD)
        python = tmp_path / "python"
        python.write_text(
            f'#!/bin/sh\nexport PYTHONPATH={hook}${{PYTHONPATH:+:$PYTHONPATH}}\nexec {sys.executable} "$@"\n'
        )
        python.chmod(0o755)
        self.env = {
            **api.env,
            "LAYERTIME_TEST_RUN": self.marker,
            "LAYERTIME_TEST_HOLD_AT": hold_at,
            "LAYERTIME_TEST_HOLD": str(self.flag),
            "LAYERTIME_TEST_HELD": str(self.held),
            **{f"LAYERTIME_SLURM_{k}": v for k, v in {
                "PYTHON": str(python), "JOB_NAME": self.job_name, "LOG_DIRECTORY": str(tmp_path / "slurm-logs"),
                "INTERFACE": "lo", "MAX_JOBS": "1", "DEATH_TIMEOUT": "30", "WALLTIME": "00:20:00"}.items()},
        }  # fmt: skip
        self.workers: list[subprocess.Popen] = []

    def worker(self) -> subprocess.Popen:
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "w")  # noqa: SIM115 -- the worker holds it
        proc = subprocess.Popen([orch.PREFECT, "worker", "start", "--pool", orch.POOL, "--limit", "1"],
                                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.workers.append(proc)
        return proc

    def log(self, i: int = 0) -> str:
        return (self.tmp / f"worker-{i}.log").read_text(errors="replace")

    def grid(self, **fields) -> dict:
        return {"run_root": str(self.tmp / "run/demo"), "hf_cache": str(self.hub), "metrics": None,
                "checkpoints": ["step1000"], "layers": [3], "tasks": ["DemoSTS"], **fields}  # fmt: skip

    def deployment_run(self, grid: dict) -> str:
        out = orch.prefect(self.api.env, "deployment", "run", "layer-by-layer/demo", "--param", f"cluster={PROFILE}",
                           "--param", f"overrides={json.dumps(grid)}")  # fmt: skip
        return re.search(r"UUID:\s*([0-9a-f-]{36})", out)[1]

    def until_held(self, flow_run: str | None, process: subprocess.Popen | None = None) -> None:
        """Until a job's worker holds its step (the run is mid-work in a SLURM job)."""
        deadline = time.monotonic() + STARTED_WITHIN_S
        while not (self.held.exists() and self.held.read_text()):
            assert time.monotonic() < deadline, "no job reached the held step in time"
            if flow_run is not None:
                state = (self.api.flow_run(flow_run).get("state") or {}).get("type")
                assert state not in orch.FINAL, (state, self.log()[-3000:])
            if process is not None:
                assert process.poll() is None, (self.tmp / "run.err").read_text()[-3000:]
            time.sleep(0.5)
        assert self.jobs(), "the held step should run in a SLURM job of this test"

    def jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-n", self.job_name, "-o", "%i"], capture_output=True, text=True,
                             timeout=30, check=True)  # fmt: skip
        return out.stdout.split()

    def left(self, within_s: float, keep: tuple[int, ...] = ()) -> tuple[list[str], dict[int, str]]:
        """The run's SLURM jobs and processes (its marker), once none is left or after `within_s`. Not
        the run's: the workers in `keep`, and the process a worker starts after a cancel to look for the
        flow's on_cancellation hooks (it loads the flow's module; Prefect's, not the run's)."""
        deadline = time.monotonic() + within_s
        while True:
            jobs = self.jobs()
            procs = {p: c for p, c in test_signals._of_run(-1, self.marker).items()
                     if p not in keep and "_workspace_runtime_bootstrap.py hook" not in c}  # fmt: skip
            if (not jobs and not procs) or time.monotonic() > deadline:
                return jobs, procs
            time.sleep(0.5)

    def close(self) -> None:
        """Whatever a failed test left: the workers, the run's processes, its jobs."""
        self.flag.unlink(missing_ok=True)
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in test_signals._of_run(-1, self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["scancel", "--name", self.job_name], capture_output=True, timeout=30)


@pytest.fixture
def lab(api, exclusive, tmp_path, hub, request):
    with exclusive("slurm"):  # the single node's CPUs: another test's jobs would queue ours (conftest.py)
        lab = Lab(api, tmp_path, hub, request.param)
        yield lab
        lab.close()


def _records(store: Path) -> dict[Path, tuple[int, int]]:
    found = store.glob("scores/**/layer_*.json") if store.exists() else []
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in found}


@pytest.mark.parametrize("lab", ["embed"], indirect=True)
def test_a_cancel_stops_the_run_and_its_jobs_in_seconds_with_no_traceback_in_the_worker(lab):
    worker = lab.worker()
    flow_run = lab.deployment_run(lab.grid())
    lab.until_held(flow_run)
    orch.prefect(lab.api.env, "flow-run", "cancel", flow_run)
    state, seconds = lab.api.until_final(flow_run, CANCELLED_WITHIN_S)
    print(f"cancel -> {state['type']} in {seconds:.1f} s: {state.get('message')}")
    assert state["type"] == "CANCELLED", state
    jobs, procs = lab.left(CANCELLED_WITHIN_S, keep=(worker.pid,))
    assert jobs == [] and procs == {}, (jobs, procs)
    assert worker.poll() is None  # the worker goes on, ready for the next run
    log = lab.log()
    assert "Traceback" not in log and "signal only works in main thread" not in log, log[-5000:]
    assert "failed to retrieve flow" not in log, log[-5000:]


@pytest.mark.parametrize("lab", ["embed"], indirect=True)
def test_a_cancel_after_the_server_restarted_still_stops_the_run_and_its_jobs(lab):
    worker = lab.worker()
    flow_run = lab.deployment_run(lab.grid())
    lab.until_held(flow_run)
    lab.api.restart()  # the worker's cancellation observer may give up (Prefect 3.9: for good)
    orch.prefect(lab.api.env, "flow-run", "cancel", flow_run)
    state, seconds = lab.api.until_final(flow_run, CANCELLED_WITHIN_S)
    print(f"cancel after a restart -> {state['type']} in {seconds:.1f} s: {state.get('message')}")
    print("the worker's observer:", [line for line in lab.log().splitlines() if "ancellation" in line][-3:])
    assert state["type"] == "CANCELLED", state
    jobs, procs = lab.left(CANCELLED_WITHIN_S, keep=(worker.pid,))
    assert jobs == [] and procs == {}, (jobs, procs)


@pytest.mark.parametrize("lab", ["score:DemoClassification"], indirect=True)
def test_a_killed_worker_crashes_its_run_in_seconds_and_a_new_workers_rerun_computes_only_the_rest(lab):
    """kill -9 of the worker (an OOM kill, a closed tmux) while a job scores DemoClassification, after
    DemoSTS was scored: Crashed within a minute, nothing of the run left, the run root free; a new
    worker's re-run of the deployment on the `slurm-cpu` profile (as docs/clusters.md runs the demo)
    scores DemoClassification from its kept embeddings and nothing else."""
    grid = lab.grid(tasks=["DemoSTS", "DemoClassification"])
    store = lab.tmp / "run/store"
    worker = lab.worker()
    flow_run = lab.deployment_run(grid)
    lab.until_held(flow_run)
    deadline = time.monotonic() + STARTED_WITHIN_S
    while len(_records(store)) < 1:  # DemoSTS scored beside the held unit
        assert time.monotonic() < deadline, "DemoSTS was never scored"
        time.sleep(0.5)
    before = _records(store)

    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    state, seconds = lab.api.until_final(flow_run, CRASHED_WITHIN_S)
    print(f"worker killed -> {state['type']} in {seconds:.1f} s: {state.get('message')}")
    assert state["type"] == "CRASHED", state
    assert "the Prefect worker" in state["message"] and "is gone" in state["message"]
    assert "1 of 2 (checkpoint, task, layer) units are scored" in state["message"]
    jobs, procs = lab.left(CRASHED_WITHIN_S)
    assert jobs == [] and procs == {}, (jobs, procs)

    lab.flag.unlink()  # the next run's job scores normally
    lab.worker()
    again = lab.deployment_run(grid)
    state, _ = lab.api.until_final(again, STARTED_WITHIN_S)
    assert state["type"] == "COMPLETED", (state, lab.log(1)[-5000:])
    after = _records(store)
    assert len(after) == 2 and {p: after[p] for p in before} == before  # DemoSTS untouched
    assert sorted(lab.api.task_runs(again)) == ["merge[demo]", "record[DemoClassification]", "record[DemoSTS]",
                                                "score[step1000 · DemoClassification · L3]"]  # fmt: skip


@pytest.mark.parametrize("lab", ["embed"], indirect=True)
def test_ctrl_c_of_a_run_on_slurm_cancels_its_jobs_and_marks_its_flow_run(lab):
    spec = lab.tmp / "spec.yaml"
    import yaml

    demo = yaml.safe_load((ROOT / "deployments/demo.yaml").read_text())
    spec.write_text(yaml.safe_dump({**demo, **lab.grid()}))
    with open(lab.tmp / "run.out", "w") as out, open(lab.tmp / "run.err", "w") as err:
        run = subprocess.Popen([sys.executable, "-m", "flows.commands", "run", str(spec), "--cluster", PROFILE],
                               env=lab.env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)  # fmt: skip
    try:
        lab.until_held(None, run)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=60) == 130, (lab.tmp / "run.err").read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    jobs, procs = lab.left(CANCELLED_WITHIN_S)
    assert jobs == [] and procs == {}, (jobs, procs)
    runs = httpx.post(f"{lab.api.server.api}/flow_runs/filter", timeout=60, json={
        "flow_runs": {"deployment_id": {"is_null_": True}}, "sort": "START_TIME_DESC", "limit": 1}).json()  # fmt: skip
    (flow_run,) = runs
    assert flow_run["parameters"]["cluster"] == PROFILE
    assert flow_run["state"]["type"] == "CANCELLED", flow_run["state"]
    assert (
        "stopped by SIGINT" in flow_run["state"]["message"]
        and "SLURM jobs cancelled" in flow_run["state"]["message"]
    )
