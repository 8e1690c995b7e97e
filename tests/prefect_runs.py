"""The tests' Prefect server and what a test reads back from it (the fixtures are in tests/conftest.py).

One real `prefect server start` on loopback per test session (under pytest-xdist, per worker), started
on first use, SQLite in a home of its own: a test that runs flows never starts a server of its own
(each cost 14-18 s, and a `layertime run` subprocess's embedded one 37 s). Flow runs of many tests
share its database; a test reads back only its own flow run's rows, by id.

- `client_env(server, **env)`: the environment of a subprocess (`layertime run`, the `prefect` CLI, a
  worker) that talks to `server`: ours without any PREFECT_* variable, PREFECT_API_URL set.
- `task_runs(flow_run_id)`, `states(flow_run_id)`: every task run of a flow run, by name, from the
  API this process's Prefect talks to (the `prefect_api` fixture's), every page of it;
  `artifact(flow_run_id)`: its progress artifact; `logs(flow_run_id)`: its log lines.

The server itself is `benchmarks/orchestration.py`'s `start_server` (the benchmark and the scale tests
start theirs the same way), and the paging is its `read_all`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
import orchestration as orch  # noqa: E402 -- benchmarks/ is not a package

Server = orch.Server


def start(home: Path, attempts: int = 3) -> Server:
    """A `prefect server start` on a free loopback port with SQLite under `home`; a port another
    process took between the draw and the bind is drawn again."""
    for attempt in range(attempts):
        try:
            return orch.start_server(home / f"try-{attempt}", orch.free_port(), None)
        except RuntimeError:  # exited at once: the port was taken meanwhile
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def client_env(server: Server, **env: str) -> dict[str, str]:
    """This process's environment for a client of `server`: no PREFECT_* variable of ours (a
    PREFECT_HOME of the caller's choosing, in `env`), PREFECT_API_URL pointing at `server`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**clean, "PREFECT_API_URL": server.api, **env}


def task_runs(flow_run_id: Any) -> dict[str, Any]:
    """Task run name -> task run (`prefect.client.schemas.objects.TaskRun`: state, run count, start
    and end times) of one flow run, from the API this process's Prefect is pointed at."""
    from prefect.client.schemas.objects import TaskRun
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    assert api, "no Prefect API: use the prefect_api fixture"
    body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "sort": "ID_DESC"}
    runs = [TaskRun.model_validate(r) for r in orch.read_all(api, "/task_runs/filter", body)]
    return {r.name: r for r in runs}


def states(flow_run_id: Any) -> dict[str, str]:
    """Task run name -> its state's name ('Completed', 'Failed', ...) of one flow run."""
    return {name: run.state.name for name, run in task_runs(flow_run_id).items()}


def artifact(flow_run_id: Any, key: str = "layer-by-layer-progress") -> Any:
    """The newest artifact `key` of one flow run (`prefect.client.schemas.objects.Artifact`: data,
    description); by default the flow's progress."""
    from prefect.client.schemas.objects import Artifact
    from prefect.settings import PREFECT_API_URL

    body = {
        "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [str(flow_run_id)]}},
        "sort": "CREATED_DESC",
    }
    found = orch.read_all(PREFECT_API_URL.value(), "/artifacts/filter", body)
    assert found, f"flow run {flow_run_id} has no artifact {key}"
    return Artifact.model_validate(found[0])


def logs(flow_run_id: Any) -> list[Any]:
    """Every log line of one flow run stored by the server, oldest first (`prefect.client.schemas.objects.Log`:
    message, task_run_id; None for the flow's own lines)."""
    from prefect.client.schemas.objects import Log
    from prefect.settings import PREFECT_API_URL

    body = {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "TIMESTAMP_ASC"}
    return [Log.model_validate(r) for r in orch.read_all(PREFECT_API_URL.value(), "/logs/filter", body)]
