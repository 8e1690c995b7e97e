"""`layertime run` on Prefect's embedded default, on a busy machine (issue 14.9).

Before: every run's temporary server used `~/.prefect/prefect.db`, so two runs at once on one machine
met `sqlite3.OperationalError: database is locked`, and a server slower than Prefect's 20 s to start
(a loaded 2-core machine) failed the run with "Timed out while attempting to connect to ephemeral
Prefect API server". Here both happen for real: two runs start at once with one PREFECT_HOME (as
`~/.prefect` is shared), and each temporary server starts 30 s late (a `sitecustomize` that sleeps in
the server process only, as a machine too loaded to start it in 20 s would).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

_SLOW_SERVER = """
import os, time
if os.environ.get("PREFECT__SERVER_EPHEMERAL") == "1":  # set by Prefect for its temporary server only
    time.sleep(30)
"""


def _spec(directory: Path, hub: Path, demo_repo: str) -> Path:
    directory.mkdir()
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": directory.name, "model": demo_repo, "checkpoints": ["step1000"], "layers": [1, 3],
        "tasks": ["DemoSTS", "DemoClassification"], "run_root": str(directory / "run"), "hf_cache": str(hub),
        "metrics": None, "max_length": 64, "dtype": "float32",
    }))  # fmt: skip
    return path


def test_two_runs_at_once_with_a_slow_embedded_server_both_complete(hub, demo_repo, tmp_path):
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(_SLOW_SERVER)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MTEB_CACHE"}
    (tmp_path / "tmp").mkdir()
    env = {**clean, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "shared-home"), "TMPDIR": str(tmp_path / "tmp"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(slow)])}  # fmt: skip
    specs = [_spec(tmp_path / name, hub, demo_repo) for name in ("one", "two")]
    runs = []
    for spec in specs:
        log = open(spec.parent / "run.log", "w")  # noqa: SIM115 -- closed below
        runs.append((subprocess.Popen([sys.executable, "-m", "flows.commands", "run", str(spec)], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    for (proc, log), spec in zip(runs, specs, strict=True):
        try:
            rc = proc.wait(timeout=1500)
        finally:
            proc.kill()
            log.close()
        assert rc == 0, f"{spec.parent.name}:\n{(spec.parent / 'run.log').read_text()[-4000:]}"
    for spec in specs:
        scores = pl.read_parquet(spec.parent / "run/tables/scores.parquet")
        units = set(scores.select("revision", "layer", "task").iter_rows())
        assert units == {("step1000", b, t) for b in (1, 3) for t in ("DemoSTS", "DemoClassification")}
    assert list((tmp_path / "tmp").glob("layertime-prefect-*")) == []  # each run's database removed at exit
