"""A spec whose checkpoints are all in its cache never touches the network, whoever launches it
(issue 14.7): no HF_HUB_OFFLINE in the environment (a deployment run, a worker's shell), and the hub
at a counting server on loopback that must receive no request.

Before, every model load asked the hub (tokenizer templates, a revision name's commit) and, with the
hub unreachable, retried each file 5 times: ~2 min 20 s per checkpoint, 90% of the demo deployment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from hubserver import FakeHub  # tests/ is on sys.path (rootdir conftest, prepend import mode)

ROOT = Path(__file__).resolve().parents[1]
REVISIONS = ["step1000", "main"]


@pytest.fixture
def cache(hub: Path, demo_repo: str, tmp_path: Path) -> Path:
    """A copy of the demo model's cache: a load that went online could write into the shared one."""
    name = "models--" + demo_repo.replace("/", "--")
    shutil.copytree(hub / name, tmp_path / "hub" / name, symlinks=True)
    return tmp_path / "hub"


@pytest.fixture
def counter():
    """A hub on loopback that holds nothing and counts every request it receives."""
    with FakeHub() as fake:
        yield fake


def _online_env(counter: FakeHub, cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a launcher that never set HF_HUB_OFFLINE (conftest sets it for this process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_")}
    return {
        **env,
        "HF_ENDPOINT": counter.endpoint,
        "HF_HUB_CACHE": str(cache),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


_LOAD = """
import sys
from layertime import checkpoints
from layertime.encoder import MultiLayerEncoder

model, cache = sys.argv[1], sys.argv[2]
for revision in sys.argv[3:]:
    commit = checkpoints.resolve(model, revision, cache).commit
    config = checkpoints.load_config(model, revision, cache)
    for ref in (revision, commit):
        encoder = MultiLayerEncoder(model, ref, [1], cache_dir=cache)
        assert encoder.encode(["a text"])[1].shape == (1, config.hidden_size)
print("loaded", len(sys.argv[3:]))
"""


def test_cached_checkpoints_load_without_a_single_request_to_the_hub(cache, counter, demo_repo):
    out = subprocess.run([sys.executable, "-c", _LOAD, demo_repo, str(cache), *REVISIONS],
                         env=_online_env(counter, cache), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded 2" in out.stdout
    assert dict(counter.requests) == {}


@pytest.mark.slow
def test_a_run_of_a_cached_spec_without_hf_hub_offline_never_touches_the_hub(
    cache, counter, demo_repo, prefect_server, tmp_path
):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "online-launcher", "model": demo_repo, "checkpoints": REVISIONS, "layers": [1, 3],
        "tasks": ["DemoSTS", "DemoClassification"], "run_root": str(tmp_path / "run"), "hf_cache": str(cache),
        "metrics": None, "max_length": 64, "dtype": "float32",
    }))  # fmt: skip
    env = _online_env(
        counter, cache, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=prefect_server.api
    )
    with open(tmp_path / "run.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "flows.commands", "run", str(spec)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, timeout=1200).returncode  # fmt: skip
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    scores = pl.read_parquet(tmp_path / "run/tables/scores.parquet")
    units = set(scores.select("revision", "layer", "task").iter_rows())
    assert units == {(r, b, t) for r in REVISIONS for b in (1, 3) for t in ("DemoSTS", "DemoClassification")}
    assert dict(counter.requests) == {}
