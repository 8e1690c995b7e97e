"""The user's whole path on a real Prefect server on loopback (the session's): work pool, `prefect
deploy --all`, a process worker, `prefect deployment run 'layer-by-layer/demo'`, tables on disk; `layertime submit`.

The shell is a user's who never set HF_HUB_OFFLINE, with the hub at a counting server on loopback:
a deployment of a spec whose checkpoints are cached must not send it one request (issue 14.7)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import polars as pl
import prefect_runs  # tests/prefect_runs.py
import pytest
from hubserver import FakeHub  # tests/ is on sys.path (rootdir conftest, prepend import mode)

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def counter():
    """The hub, as far as the deployment knows: a server on loopback that counts every request."""
    with FakeHub() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(prefect_server, tmp_path_factory, counter):
    """The session's Prefect server, and the shell of a user who never set HF_HUB_OFFLINE (issue 14.7)."""
    env = prefect_runs.client_env(
        prefect_server,
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_ENDPOINT=counter.endpoint,
    )
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _prefect(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def deployed(server):
    """The work pool and the three deployments of prefect.yaml, as the README's path creates them."""
    _prefect(server, "work-pool", "create", "layertime", "--type", "process")
    _prefect(server, "--no-prompt", "deploy", "--all")
    return server


def _submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.commands", "submit", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _flow_runs(env: dict) -> int:
    return httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/count", json={}, timeout=30).json()


def test_deployment_run_through_a_worker_completes_without_asking_the_hub(deployed, counter, hub, tmp_path):
    server = deployed
    listed = _prefect(server, "deployment", "ls").stdout
    for name in ("exp1", "exp2", "demo"):
        assert name in listed
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "layertime", "--limit", "1"], env=server,
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        overrides = {"run_root": str(tmp_path / "demo"), "hf_cache": str(hub), "checkpoints": ["step1000", "main"],
                     "layers": [3], "tasks": ["DemoSTS", "DemoReranking"]}  # fmt: skip
        run = _prefect(server, "deployment", "run", "layer-by-layer/demo", "--param",
                       f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "500", timeout=600)  # fmt: skip
        assert "Completed" in run.stdout
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except (
            subprocess.TimeoutExpired
        ):  # a loaded machine: the worker's own shutdown is not this test's point
            worker.kill()
            worker.wait()
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    assert sorted(set(scores["revision"])) == ["main", "step1000"] and scores.height == 2 * 2
    assert dict(counter.requests) == {}  # every checkpoint is in the cache: not one request to the hub


def test_submit_an_unknown_deployment_names_it_and_what_exists_exit_2(deployed):
    before = _flow_runs(deployed)
    out = _submit(deployed, "exp3")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no layer-by-layer/exp3 on " + deployed["PREFECT_API_URL"] in out.stderr
    assert "it has: demo, exp1, exp2" in out.stderr and "None" not in out.stdout + out.stderr
    assert _flow_runs(deployed) == before


def test_submit_passes_overrides_to_the_run_and_prints_its_ui_link(deployed, tmp_path):
    fields = {"layers": [1, 2], "run_root": str(tmp_path / "demo-12")}
    out = _submit(deployed, "demo", "--overrides", json.dumps(fields))
    assert out.returncode == 0, out.stdout + out.stderr
    ui = deployed["PREFECT_API_URL"].removesuffix("/api")
    link = next(line for line in out.stdout.splitlines() if line.startswith("http"))
    assert link.startswith(f"{ui}/runs/flow-run/")
    run_id = link.rsplit("/", 1)[1]
    flow_run = httpx.get(f"{deployed['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).json()
    try:
        assert flow_run["parameters"]["overrides"] == fields
        assert flow_run["parameters"]["spec"] == "deployments/demo.yaml"  # the deployment's own
    finally:  # never picked up by the worker of another test
        httpx.delete(f"{deployed['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).raise_for_status()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [("{layers: 1}", "--overrides: not JSON"), ("[1, 2]", "--overrides: expected a JSON object"),
     ('{"layerz": [1]}', "layerz"), ('{"layers": "3..1"}', "layers")],
)  # fmt: skip
def test_submit_refuses_bad_overrides_before_submitting(deployed, overrides, named):
    before = _flow_runs(deployed)
    out = _submit(deployed, "demo", "--overrides", overrides)
    assert out.returncode == 2, out.stdout + out.stderr
    assert named in out.stderr and "--overrides" in out.stderr
    assert _flow_runs(deployed) == before


def test_submit_passes_checked_cluster_overrides_and_refuses_bad_ones(deployed, tmp_path):
    """`layertime submit --cluster-overrides`: the profile's fields for one run, checked here first (the
    worker's LAYERTIME_SLURM_* variables are the place for standing ones; docs/clusters.md)."""
    before = _flow_runs(deployed)
    for args, named in [(["--cluster", "slurm-cpu", "--cluster-overrides", '{"partiton": "cpu"}'], "partiton"),
                        (["--cluster-overrides", '{"partition": "cpu"}'], "cluster profile local: partition"),
                        (["--cluster", "slurm-cpu", "--cluster-overrides", "[1]"], "expected a JSON object")]:  # fmt: skip
        out = _submit(deployed, "demo", *args)
        assert out.returncode == 2 and named in out.stderr and "--cluster-overrides" in out.stderr, out.stderr
    assert _flow_runs(deployed) == before
    fields = {"partition": "cpu", "max_jobs": 1}
    out = _submit(deployed, "demo", "--cluster", "slurm-cpu", "--cluster-overrides", json.dumps(fields))
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = out.stdout.split("(", 1)[1].split(")", 1)[0]
    flow_run = httpx.get(f"{deployed['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).json()
    try:
        assert flow_run["parameters"]["cluster"] == "slurm-cpu"
        assert flow_run["parameters"]["cluster_overrides"] == fields
    finally:  # never picked up by the worker of another test
        httpx.delete(f"{deployed['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).raise_for_status()


def test_submit_without_a_server_prints_no_link_but_how_to_follow_the_run(tmp_path):
    """Without PREFECT_API_URL, Prefect uses a local database (PREFECT_HOME) and there is no UI to link to."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "PREFECT_HOME": str(tmp_path),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}  # fmt: skip
    # Each command starts a temporary server of its own: minutes on a loaded machine.
    _prefect(env, "work-pool", "create", "layertime", "--type", "process", timeout=600)
    _prefect(env, "--no-prompt", "deploy", "--name", "demo", timeout=600)
    out = _submit(env, "demo")
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = out.stdout.split("(", 1)[1].split(")", 1)[0]
    assert "/runs/flow-run/" not in out.stdout and "http" not in out.stdout
    assert f"prefect flow-run inspect {run_id}" in out.stdout
    assert "Scheduled" in _prefect(env, "flow-run", "inspect", run_id, timeout=600).stdout  # the run named
