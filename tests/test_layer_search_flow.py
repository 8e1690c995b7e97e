"""The `layer-search` flow (flows/layer_search.py, issue 21) through the session's real Prefect server on
the demo world: it completes offline and publishes the chosen arm; its evaluations are grid units a grid
run reuses; a search killed with SIGKILL resumes from the records (`layertime search`) and repeats no
evaluation.

The world is small: 4 demo checkpoints x layers 1 and 3 = 8 arms, 2 tasks (16 evaluations). With
epsilon 100 points the stop rule holds as soon as the model can say so, after the initial design of
3 arms: the search evaluates 3 of the 8 arms (6 of 16 evaluations), one arm per batch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from prefect_runs import artifact, client_env, orch, states  # tests/prefect_runs.py
from specs import DEMO, demo_fields  # tests/specs.py

from flows.layer_by_layer import layer_by_layer
from flows.layer_search import layer_search

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WORLD = {"checkpoints": ["step0", "step1000", "step2000", "step3000"], "layers": [1, 3],
         "tasks": ["DemoSTS", "DemoClassification"]}  # fmt: skip
SEARCH = {"epsilon": 100, "initial_arms": 3, "batch": 2}


def _spec(tmp_path: Path, hub: Path, **fields) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(
        yaml.safe_dump(demo_fields(tmp_path, hub, **WORLD, search=SEARCH, **fields), sort_keys=False)
    )
    return path


def _records(store: Path) -> dict[tuple[str, str, int], float]:
    """(commit directory, task, layer) -> mtime of every score record."""
    return {
        (p.parent.parent.name, p.parent.name, int(p.stem.split("_")[1])): p.stat().st_mtime_ns
        for p in store.glob("scores/**/layer_*.json")
    }


def _scored(flow_run_id) -> set[tuple[str, str, int]]:
    """(revision, task, layer) of every score task run of a flow run, from their names in the API."""
    out = set()
    for name in states(flow_run_id):
        if m := re.fullmatch(r"score\[(\S+) · (\S+) · L([\d,-]+)\]", name):
            revision, task, label = m.groups()
            if "-" in label:
                a, b = map(int, label.split("-"))
                layers = range(a, b + 1)
            else:
                layers = map(int, label.split(","))
            out |= {(revision, task, layer) for layer in layers}
    return out


def test_search_completes_offline_publishes_its_choice_and_a_grid_run_after_it_computes_only_the_rest(
    prefect_api, hub, tmp_path
):
    spec = _spec(tmp_path, hub, metrics=DEMO["metrics"])  # stage 1: the metrics of every arm
    state = layer_search(str(spec), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    run_id = state.state_details.flow_run_id
    searched = _scored(run_id)
    assert len(searched) == 6 and len({(r, b) for r, _, b in searched}) == 3  # 3 whole arms
    assert len(_records(tmp_path / "run/store")) == 6
    # Stage 1 measured every arm, before any scoring: the metrics table covers the 8 arms.
    metrics = pl.read_parquet(tmp_path / "run/demo/tables/metrics.parquet")
    assert metrics.select("revision", "layer").unique().height == 8
    # The chosen arm is the best evaluated arm by the rule-(a) average of the tables, computed here.
    scores = pl.read_parquet(tmp_path / "run/demo/tables/scores.parquet")
    arms = (
        scores.group_by("revision", "layer", "task").agg(pl.col("main_score").mean())
        .group_by("revision", "layer").agg(pl.col("main_score").mean().alias("avg"), pl.len().alias("n"))
    )  # fmt: skip
    assert set(arms["n"]) == {2} and arms.height == 3
    best = arms.sort("avg", descending=True).row(0, named=True)
    chosen = result["chosen"]
    assert (chosen["checkpoint"], chosen["layer"]) == (best["revision"], best["layer"])
    assert chosen["value"] == pytest.approx(100 * best["avg"])
    # The same choice is in the run root's tables/search.json, and the report shows it (docs/report.md).
    written = json.loads((tmp_path / "run/demo/tables/search.json").read_text())["chosen"]
    assert (written["checkpoint"], written["layer"]) == (chosen["checkpoint"], chosen["layer"])
    page = (tmp_path / "run/demo/report/summary.md").read_text()
    assert f"**Chosen: {chosen['checkpoint']}, layer {chosen['layer']}**" in page
    markdown = artifact(run_id, "layer-search-choice").data
    assert (
        f"Chosen: {best['revision']}, layer {best['layer']}" in markdown and "credible interval" in markdown
    )
    table = artifact(run_id, "layer-search-arms").data
    assert "evaluated" in table and table.count('"checkpoint"') == 8
    heatmap = artifact(run_id, "layer-search-heatmap").data
    assert heatmap.count("*") >= 3 * 1 + 2 and "| step0 |" in heatmap
    path = artifact(run_id, "layer-search-path").data
    assert path.count('"checkpoint"') == 4  # one row per checkpoint
    cost = artifact(run_id, "layer-search-cost").data
    assert '"evaluations"' in cost
    progress = artifact(run_id, "layer-search-progress")
    assert progress.description.startswith("6/16 evaluations") and "best so far" in progress.description

    # A grid run of the same spec afterwards scores only the 10 units the search did not.
    before = _records(tmp_path / "run/store")
    grid = layer_by_layer(str(spec), return_state=True)
    assert grid.is_completed(), grid.message
    rest = _scored(grid.state_details.flow_run_id)
    everything = {(r, t, b) for r in WORLD["checkpoints"] for t in WORLD["tasks"] for b in WORLD["layers"]}
    assert rest == everything - searched
    after = _records(tmp_path / "run/store")
    assert len(after) == 16 and all(after[k] == v for k, v in before.items())  # none rewritten


def test_a_search_killed_mid_search_resumes_from_the_records_and_repeats_no_evaluation(
    prefect_api, hub, tmp_path
):
    spec = _spec(tmp_path, hub)
    store = tmp_path / "run/store"
    env = client_env(prefect_api, HF_HUB_OFFLINE="1")
    run = subprocess.Popen([sys.executable, "-m", "flows.commands", "search", str(spec)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not _records(store) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run.poll() is None, "the search ended before its first record"
        os.killpg(run.pid, signal.SIGKILL)  # the search's own process group: no handler, no cleanup
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    killed = _records(store)
    assert 1 <= len(killed) < 6, killed
    # `layertime search` again, in a process of its own on the session's server
    out = subprocess.run([sys.executable, "-m", "flows.commands", "search", str(spec)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^chosen: step\d+ layer [13]: \d+\.\d\d points", out.stdout, re.MULTILINE), out.stdout
    again = _scored(_completed_search(prefect_api, spec))
    after = _records(store)
    # Nothing recorded before the kill is scored again, or rewritten; every task run's units are new.
    assert all(after[k] == v for k, v in killed.items())
    assert len(after) == len(killed) + len(again)
    assert len(after) >= 6 and f"{len(after)} of 16 evaluations" in out.stdout
    # The budget counts what the records cost, those written before the kill included.
    scores = pl.read_parquet(tmp_path / "run/demo/tables/scores.parquet")
    assert f"{scores['seconds'].sum() / 3600:.3g} of " in out.stdout.split("evaluations, ")[1]


def _completed_search(server, spec: Path) -> str:
    """The id of the completed layer-search flow run of `spec` on `server` (the killed one stays Running)."""
    body = {
        "flows": {"name": {"any_": ["layer-search"]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    runs = [
        r
        for r in orch.read_all(server.api, "/flow_runs/filter", body)
        if r["parameters"]["spec"] == str(spec)
    ]
    assert len(runs) == 1, runs
    return runs[0]["id"]
