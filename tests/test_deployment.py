"""The user's whole path on a real Prefect server on loopback: work pool, `prefect deploy --all`,
a process worker, `prefect deployment run 'layer-by-layer/demo'`, tables on disk."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 -- closed at teardown
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)  # fmt: skip
    try:
        _wait_healthy(env["PREFECT_API_URL"], proc, home / "server.log")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _wait_healthy(api: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {timeout} s")


def _prefect(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_deployment_run_through_a_worker_completes(server, hub, tmp_path):
    _prefect(server, "work-pool", "create", "layertime", "--type", "process")
    _prefect(server, "--no-prompt", "deploy", "--all")
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
        worker.wait(timeout=60)
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    assert sorted(set(scores["revision"])) == ["main", "step1000"] and scores.height == 2 * 2
