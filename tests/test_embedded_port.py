"""Each `layertime run` on Prefect's embedded default draws its own temporary server port.

Importing mteb seeds Python's global `random` with 42, and Prefect draws the port from it: every run
chose 8654, and of two runs at once the second's health check could reach the first's server, so it
ran on the first's database and failed when the first run exited (CI, 2026-12-06).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_DRAW = """
import mteb  # seeds the global random, as every run's task loading does
from flows.commands import _embedded_prefect
from prefect.server.api.server import SubprocessASGIServer
with _embedded_prefect():
    print(SubprocessASGIServer().find_available_port())
"""


def _port() -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # the embedded default
    out = subprocess.run([sys.executable, "-c", _DRAW], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


def test_runs_started_after_importing_mteb_draw_different_server_ports():
    ports = [_port() for _ in range(3)]
    assert len(set(ports)) > 1, f"every run would start its temporary server on port {ports[0]}"
