"""Two runs on one store at the same time lose nothing (issue 17.2).

The store is shared by design (exp1 and exp2 share one). Spec A (every layer) and spec B (three
layers) of the same checkpoints run as two real processes on one store (A `--plain` or the flow, B
`--plain`), with run roots of their own, B started while A embeds, so each meets units the other is
embedding or scoring. Each run claims a unit's embeddings
while it needs them, an embed adds the layers it lacks beside the ones another run may be reading, and
a run deletes embeddings only when no other run holds a claim on them (layertime/claims.py).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from specs import demo_spec_file  # tests/specs.py

from layertime import claims, records
from layertime.checkpoints import Checkpoint
from layertime.encoder import MultiLayerEncoder
from layertime.phases.context import Context
from layertime.phases.embed import embed_unit
from layertime.plan import make_plan
from layertime.rundir import RunDir
from layertime.settings import Settings
from layertime.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
KEY = ["revision", "task", "layer", "subset", "split"]
TASKS = ["DemoSTS", "DemoClassification", "DemoPairClassification"]


def _spec(tmp_path: Path, hub: Path, name: str, **fields) -> Path:
    return demo_spec_file(tmp_path, hub, f"{name}.yaml", name=name, run_root=str(tmp_path / name),
                          store=str(tmp_path / "store"), tasks=TASKS, **fields)  # fmt: skip


def _start(spec: Path, log: Path, executor: str = "--plain", server=None) -> subprocess.Popen:
    """`layertime run --plain SPEC`, or the flow (`executor` "flow") on the Prefect `server`."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_HOME": str(log.with_suffix(".prefect")),
        **({"PREFECT_API_URL": server.api} if server is not None else {}),
    }
    args = ["--plain"] if executor == "--plain" else []
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.commands", "run", *args, str(spec)],
                                cwd=spec.parent, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _wait_for_embeddings(store: Path, run: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while not list(store.glob("embeddings/**/*.npy")):
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "run A never embedded"
        time.sleep(0.1)


def _rows(root: Path) -> pl.DataFrame:
    path = root / "tables/scores.parquet"
    return pl.read_parquet(path).select(*KEY, "main_score") if path.exists() else pl.DataFrame()


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["--plain", "flow"])
def test_two_runs_sharing_a_store_at_once_lose_no_unit(executor, hub, prefect_server, tmp_path):
    checkpoints = ["step1000", "step2000", "step3000"]
    a = _spec(tmp_path, hub, "a", checkpoints=checkpoints, layers="all")
    b = _spec(tmp_path, hub, "b", checkpoints=checkpoints, layers=[1, 2, 3])
    runs = {"a": _start(a, tmp_path / "a.log", executor, prefect_server)}
    try:
        if executor == "flow":  # the flow embeds a checkpoint's tasks at once, then scores them for minutes
            _wait_for_embeddings(tmp_path / "store", runs["a"], tmp_path / "a.log")
        else:  # --plain: a few seconds apart, both walk the same units, one embeds as the other scores
            time.sleep(2)
        runs["b"] = _start(b, tmp_path / "b.log")
        codes = {name: proc.wait(timeout=1200) for name, proc in runs.items()}
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
    expected = {"a": 3 * 4 * len(TASKS), "b": 3 * 3 * len(TASKS)}  # checkpoints x layers x tasks
    rows = {name: _rows(tmp_path / name) for name in expected}
    lost = {name: expected[name] - rows[name].height for name in expected}
    logs = {name: (tmp_path / f"{name}.log").read_text()[-3000:] for name in expected}
    assert codes == {"a": 0, "b": 0} and lost == {"a": 0, "b": 0}, (codes, lost, logs)
    for name in expected:
        assert rows[name].select(KEY).is_unique().all()  # every row once
    shared = rows["a"].join(rows["b"], on=KEY, suffix="_b")
    assert shared.height == expected["b"]
    # The same numbers for shared units, bit for bit (mteb's own rounded result cache is never read).
    assert (shared["main_score"] == shared["main_score_b"]).all(), shared
    # The last run to need a unit's embeddings deleted them: nothing is left behind either.
    assert list((tmp_path / "store").glob("embeddings/**/*.npy")) == []


HOLD_A_CLAIM = """
import sys
from pathlib import Path
from layertime import claims

with claims.claim(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_claimed_unit_is_deleted_only_by_the_last_run_that_needs_it(tmp_path):
    unit = tmp_path / "embeddings" / "DemoSTS"
    unit.mkdir(parents=True)
    (unit / "layer_2.npy").write_bytes(b"vectors")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = subprocess.Popen([sys.executable, "-c", HOLD_A_CLAIM, str(unit)], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "held"
        with claims.claim(unit):  # this run needs them too, then is done with them
            pass
        assert claims.delete_unclaimed(unit) is False  # another process still claims them
        assert (unit / "layer_2.npy").read_bytes() == b"vectors"
    finally:
        other.stdin.close()
        assert other.wait(timeout=60) == 0
    assert claims.delete_unclaimed(unit) is True and not unit.exists()  # the last one deletes them
    assert claims.delete_unclaimed(unit) is False  # nothing left to delete


def test_an_embed_adds_the_layers_it_lacks_beside_the_files_another_run_reads(hub, demo_repo, tmp_path):
    run = RunDir.of(tmp_path / "run", tmp_path / "store")
    settings = Settings("all", "mean", False, 128, "float32", 16384, "cpu", "rule-a", "test")
    ctx = Context(make_plan(load_spec(_spec(tmp_path, hub, "demo"))), run, settings)
    ckpt = Checkpoint(demo_repo, "step1000", None)
    texts = ["The team won the match last week.", "Rain.", "", "A short one."]

    def embed(blocks: list[int]) -> Path:
        encoder = MultiLayerEncoder(demo_repo, "step1000", blocks, max_length=128, dtype="float32",
                                    device="cpu", cache_dir=str(hub))  # fmt: skip
        return embed_unit(encoder, ctx, ckpt, "DemoSTS", texts, blocks)

    unit = embed([2, 3])  # run B
    kept = {name: (unit / name).stat().st_ino for name in ("texts.json", "layer_2.npy", "layer_3.npy")}
    with open(unit / "layer_2.npy", "rb") as reading:  # run B is scoring layer 2
        assert embed([0, 1, 2, 3]) == unit  # run A needs every layer
        assert {name: (unit / name).stat().st_ino for name in kept} == kept  # never replaced
        vectors = np.load(reading)
    assert np.array_equal(vectors, np.load(unit / "layer_2.npy"))
    found = records.check_embeddings(unit, records.EmbeddingsAsk.of(demo_repo, None, "DemoSTS", texts))
    assert found.holds([0, 1, 2, 3]) and not found.rejected
    assert sorted(found.good) == ["layer_0.npy", "layer_1.npy", "layer_2.npy", "layer_3.npy", "texts.json"]


MANY_CLAIMS = """
import resource, sys
from pathlib import Path
from layertime import claims

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # a login node's usual soft limit is 1,024
with claims.Claims() as held:
    for i in range(1600):  # exp2: 50 checkpoints x 32 tasks, claimed up front by the flow
        held.take(Path(sys.argv[1]) / f"unit{i}")
    print(len(held.held()))
"""


def test_a_run_can_claim_every_unit_of_exp2_at_once(tmp_path):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        pytest.skip("this machine's hard limit on open files is below 2,048")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", MANY_CLAIMS, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "1600", out.stderr[-2000:]
