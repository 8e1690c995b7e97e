import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layertime import costs, suite
from layertime.costs import EmbedUnit, simulate

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_table_covers_every_suite_task_with_plausible_figures():
    table = costs.read_table(costs.TABLE)
    assert set(suite.LAYER_BY_LAYER_32) <= set(table)
    for row in table.values():
        assert row.score_cpu_s > 0 and row.peak_memory_gb > 0 and row.dim == costs.REFERENCE_DIM
        assert 0 < row.unique_texts <= row.requested_texts and row.mean_text_chars > 0
        assert row.machine and row.mteb_version and row.measured_on
    # MindSmallReranking is the one that needs a big-memory worker (docs/design.md §10).
    mind = costs.scoring_memory_gb("MindSmallReranking")
    assert mind == max(costs.scoring_memory_gb(t) for t in suite.LAYER_BY_LAYER_32)


def test_read_table_names_a_missing_column(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("task,score_cpu_s\nSTS12,1.0\n")
    with pytest.raises(ValueError, match="lacks columns"):
        costs.read_table(bad)


def _row(task: str, peak: float) -> costs.TaskCost:
    return costs.TaskCost(task, "STS", 2.0, peak, 10, 20, 50.0, 1024, 1.0, "m", "2.26.24", "2026-11-27")


def test_scoring_memory_follows_the_documented_formula_and_defaults(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    costs.write_table([_row("Small", 0.1), _row("Big", 20.0)], path)
    monkeypatch.setattr(costs, "table", lambda: costs.read_table(path))
    assert costs.scoring_memory_gb("Small") == 1  # ceil(1.25 * 0.1 + 0.5) = 1, never 0
    assert costs.scoring_memory_gb("Big") == math.ceil(1.25 * 20.0 + 0.5) == 26
    assert costs.scoring_memory_gb("Big", dim=2048) == math.ceil(1.25 * 40.0 + 0.5)
    assert costs.scoring_memory_gb("Big", dim=512) == costs.scoring_memory_gb("Big")  # never below d=1024
    widths = [costs.scoring_memory_gb("Big", d) for d in (256, 1024, 1536, 2048, 4096)]
    assert widths == sorted(widths)
    assert costs.scoring_memory_gb("DemoSTS") == costs.DEFAULT_MEMORY_GB == 2
    assert costs.score_cpu_seconds("Big", 2048) == 4.0 and costs.score_cpu_seconds("DemoSTS") == 1.0


def test_simulate_matches_a_hand_computed_schedule():
    # GPU slots 2 (no loads), CPU slots 3. GPU: A (4 s) on g0 [0, 4]; B (2 s) starts first on g1 [0, 2];
    # C (3 s) then on g1 [2, 5]. Held: g0 4 s, g1 5 s. Ready scoring units: B's 2 × 3 s at 2, A's 5 s
    # at 4, C's 1 s at 5. CPU: B1 c0 [2, 5], B2 c1 [2, 5], A c2 [4, 9], C on c0 [5, 6] -> makespan 9.
    units = [EmbedUnit("A", 4, (5,)), EmbedUnit("B", 2, (3, 3)), EmbedUnit("C", 3, (1,))]
    s = simulate(units, gpu_slots=2, cpu_slots=3)
    assert (s.makespan, s.gpu_makespan, s.gpu_held_seconds, s.gpu_seconds, s.cpu_seconds) == (9, 5, 9, 9, 12)
    assert s.gpu_busy == 1.0 and s.gpu_busy_whole_run == pytest.approx(9 / 18)
    # One CPU slot: B1 [2, 5], B2 [5, 8], A [8, 13], C [13, 14].
    assert simulate(units, gpu_slots=2, cpu_slots=1).makespan == 14


def test_simulate_loads_each_checkpoint_once_and_the_next_while_the_current_computes():
    a1, a2 = (EmbedUnit(n, 2, group="a", setup_seconds=1) for n in ("A1", "A2"))
    b1 = EmbedUnit("B1", 2, group="b", setup_seconds=1)
    # One slot, order A1 B1 A2: checkpoint a is one job (A1 and A2 together), loaded once.
    # Two models per GPU: load a [0, 1], A1 [1, 3], A2 [3, 5]; b loads [0, 1] beside it, B1 [5, 7].
    s = simulate([a1, b1, a2], gpu_slots=1, cpu_slots=1)
    assert (s.gpu_makespan, s.setup_seconds, s.gpu_seconds, s.gpu_held_seconds) == (7, 2, 6, 7)
    assert s.gpu_busy == pytest.approx(6 / 7)  # only the first load idles the GPU
    # One model per GPU: b loads after a is done [5, 6], B1 [6, 8].
    s = simulate([a1, b1, a2], gpu_slots=1, cpu_slots=1, models_per_gpu=1)
    assert (s.gpu_makespan, s.setup_seconds, s.gpu_busy) == (8, 2, pytest.approx(6 / 8))
    # Two slots: each takes a checkpoint of its own: a on g0 [1, 5], b on g1 [1, 3]; held 5 + 3.
    s = simulate([a1, a2, b1], gpu_slots=2, cpu_slots=1)
    assert (s.gpu_makespan, s.setup_seconds, s.gpu_held_seconds) == (5, 2, 8)
    with pytest.raises(ValueError, match="model per GPU"):
        simulate([a1], gpu_slots=1, cpu_slots=1, models_per_gpu=0)


def test_simulate_keeps_big_memory_units_on_big_memory_slots():
    units = [EmbedUnit("M", 1, (10, 10), big_memory=True), EmbedUnit("S", 1, (1,))]
    # One GPU: M [0, 1], S [1, 2]. Big slot: M's two units in series [1, 11], [11, 21]; S on c0 [2, 3].
    assert simulate(units, gpu_slots=1, cpu_slots=4, big_memory_slots=1).makespan == 21
    # Without big-memory slots they share the CPU slots: [1, 11] on c0 and c1.
    assert simulate(units, gpu_slots=1, cpu_slots=4).makespan == 11
    with pytest.raises(ValueError, match="need >= 1"):
        simulate(units, gpu_slots=0, cpu_slots=1)


def test_estimate_of_exp2_adds_up_per_phase():
    grid = costs.Grid(checkpoints=50, layers=4, tasks=suite.LAYER_BY_LAYER_32, num_blocks=24, hidden=1024)
    est = costs.estimate(grid, gpu_jobs=8, cpu_jobs=64, big_memory_jobs=2)
    per_layer = sum(costs.score_cpu_seconds(t) for t in suite.LAYER_BY_LAYER_32)
    assert est["hours"]["score"]["cpu"] == pytest.approx(50 * 4 * per_layer / 3600)
    assert est["hours"]["record"]["cpu"] == pytest.approx(per_layer / 3600)
    assert est["hours"]["embed"]["gpu"] > 0 and est["hours"]["measure"]["gpu"] > 0
    mem = est["memory_gb"]
    assert mem["big_memory_worker"] == costs.scoring_memory_gb("MindSmallReranking") > mem["scoring_worker"]
    # More CPU slots never make the run longer, and the run is never shorter than its GPU phase.
    more = costs.estimate(grid, gpu_jobs=8, cpu_jobs=128, big_memory_jobs=2)
    assert more["wall_hours"] <= est["wall_hours"] and est["wall_hours"] >= est["gpu_phase_hours"]
    assert any("ASSUMED" in a for a in est["assumptions"])


def test_layertime_stays_free_of_prefect_and_dask():
    code = "import sys, layertime.costs, layertime.plan; print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'dask', 'distributed')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_plan_prints_the_estimates_for_the_given_jobs(hub):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    args = [
        sys.executable,
        "-m",
        "layertime.cli",
        "plan",
        "deployments/exp2.yaml",
        "--gpu-jobs",
        "8",
        "--cpu-jobs",
        "64",
    ]
    text = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert text.returncode == 0, text.stderr
    for part in (
        "CPU-hours   score",
        "GPU-hours   embed",
        "memory      GPU worker",
        "on 8 GPU + 64 CPU jobs",
        "ASSUMED",
    ):
        assert part in text.stdout
    js = subprocess.run(
        [*args, "--bigmem-jobs", "2", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert js.returncode == 0, js.stderr
    c = json.loads(js.stdout)["costs"]
    assert c["jobs"] == {"gpu": 8, "cpu": 64, "big_memory": 2}
    assert c["memory_gb"]["big_memory_worker"] == costs.scoring_memory_gb("MindSmallReranking")
    grid = costs.Grid(checkpoints=50, layers=4, tasks=suite.LAYER_BY_LAYER_32, num_blocks=24, hidden=1024)
    assert c["wall_hours"] == pytest.approx(costs.estimate(grid, 8, 64, 2)["wall_hours"])


def test_the_gpu_rate_can_come_from_a_finished_runs_costs_table(tmp_path):
    table = tmp_path / "costs.csv"
    table.write_text(
        "phase,task,device,seconds,padded_tokens\n"
        "embed,STS12,cuda:0,2.0,1000\n"
        "embed,SciDocsRR,cuda:0,3.0,4000\n"
        "measure,,cuda:0,9.0,99999\n"  # the metrics pass: not a pure forward
        "embed,STS13,cpu,50.0,1000\n"  # a CPU unit says nothing about the GPU
    )
    flops, source = costs.measured_gpu_flops(table, params=10)
    assert flops == pytest.approx(2 * 10 * 5000 / 5.0) and "2 embed units on cuda:0" in source
    grid = costs.Grid(checkpoints=1, layers=1, tasks=("STS12",), num_blocks=24, hidden=1024)
    assert source in costs.estimate(grid, 1, 1, flops=flops, flops_source=source)["assumptions"][0]
    table.write_text("phase,task,device,seconds,padded_tokens\nembed,STS13,cpu,50.0,1000\n")
    with pytest.raises(ValueError, match="no embed units that ran on a GPU"):
        costs.measured_gpu_flops(table, params=10)
