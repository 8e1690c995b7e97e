"""The Prefect server's PostgreSQL sessions run without JIT compilation (issue 15, the UI's graph).

The UI's flow-run graph (`GET /flow_runs/{id}/graph-v2`) is one SQL query whose planner estimate is
billions of rows (`jsonb_each` × `jsonb_array_elements` over every task run's inputs, guessed at
100 rows each), far above `jit_above_cost`: PostgreSQL then JIT-compiles it with inlining and
optimisation, ~3 s on the shared 2-core machine, for a query that runs in ~15 ms at 900 task runs
(EXPLAIN ANALYZE, benchmarks/RESULTS.md). `.ci/postgres.sh start` turns JIT off for the `prefect`
role, so every database that role connects to (the benchmark's and the tests' fresh ones too) is
planned without it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import orchestration as orch  # noqa: E402 -- benchmarks/ is not a package


def _show_jit(url: str) -> str:
    m = re.fullmatch(r"postgresql\+asyncpg://([^:]+):([^@]+)@([^:/]+):(\d+)/(\w+)", url)
    assert m is not None, url
    user, password, host, port, db = m.groups()
    out = subprocess.run(["psql", "-X", "-At", "-h", host, "-p", port, "-U", user, "-d", db, "-c", "SHOW jit"],
                         env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    return out.stdout.strip()


def test_the_prefect_roles_sessions_plan_without_jit_in_every_database(postgres_url):
    assert _show_jit(postgres_url) == "off"
    fresh = orch.fresh_postgres_database(postgres_url, f"layertime_test_jit_{os.getpid()}")
    assert _show_jit(fresh) == "off"  # a benchmark's or test's fresh database too
