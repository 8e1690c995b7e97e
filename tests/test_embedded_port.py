"""Each `layertime run` on Prefect's embedded default draws its own temporary server port.

Creating an mteb task (every run loads its tasks; importing mteb creates some) seeds Python's global
`random` with 42, and Prefect draws the port from it: every run chose 8654, and of two runs at once
the second's health check could reach the first's server, so it ran on the first's database and
failed when the first run exited (CI, 2026-12-06). `flows.commands._embedded_prefect` reseeds the
generator from the OS. Proved here in this process, as each run would meet it: a task seeds the
generator, then the run's embedded settings are entered and the port drawn.
"""

from __future__ import annotations

import random

from prefect.server.api.server import SubprocessASGIServer

from flows.commands import _embedded_prefect
from layertime.demo.tasks import _TASK_CLASSES


def _seeded_by_a_task() -> None:
    _TASK_CLASSES["DemoSTS"]()  # an mteb task: seeds the global `random` with 42 when created


def _draw() -> int:
    return SubprocessASGIServer().find_available_port()


def test_runs_started_after_importing_mteb_draw_different_server_ports():
    random.seed(42)
    seeded = random.getstate()
    _seeded_by_a_task()
    assert random.getstate() == seeded  # the cause: what a run does before it starts its server...
    port = _draw()
    _seeded_by_a_task()
    assert _draw() == port  # ...fixes the port it draws: every run would take this one

    runs = []
    for _ in range(3):  # three runs, each after its tasks seeded the generator
        _seeded_by_a_task()
        with _embedded_prefect():
            runs.append((random.getstate(), _draw()))
    states = [state for state, _ in runs]
    # Each run draws from a generator of its own, seeded by the OS: not the tasks' 42, not another run's.
    assert seeded not in states and len({hash(state) for state in states}) == 3, [p for _, p in runs]
