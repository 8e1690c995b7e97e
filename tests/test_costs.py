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
    # MindSmallReranking is scored in parts: no scoring process needs more than 8 GB, no task a
    # big-memory job (docs/design.md §10).
    assert table["MindSmallReranking"].parts > 1 and table["MindSmallReranking"].merge_cpu_s > 0
    assert max(costs.scoring_memory_gb(t) for t in suite.LAYER_BY_LAYER_32) <= 8
    assert costs.BIG_MEMORY_TASKS == frozenset()


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


def test_simulate_runs_a_split_batchs_merge_after_its_last_part():
    # One GPU unit [0, 1] with a whole run of 1 s, then a split batch (parts 4 s, 2 s, 3 s; merge 5 s),
    # in submission order. Two CPU slots: whole c0 [1, 2], p1 c1 [1, 5], p2 c0 [2, 4], p3 c0 [4, 7];
    # the merge after the last part (7), not after the first slot frees (5): [7, 12].
    unit = EmbedUnit("M", 1, (1,), batches=(costs.ScoreBatch((4, 2, 3), merge=5),))
    s = simulate([unit], gpu_slots=1, cpu_slots=2)
    assert (s.makespan, s.cpu_seconds) == (12, 15)
    # Without a merge the parts are independent runs.
    assert simulate([EmbedUnit("W", 1, batches=(costs.ScoreBatch((4, 2, 3)),))], 1, 2).makespan == 6


def _split_row(task: str) -> costs.TaskCost:
    return costs.TaskCost(task, "Reranking", 80.0, 3.0, 10, 20, 50.0, 1024, 1.0, "m", "2.26.24", "d",
                          parts=8, load_cpu_s=6.0, merge_cpu_s=2.0)  # fmt: skip


def test_score_runs_are_the_flows_task_runs_with_one_load_each(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    costs.write_table([_split_row("Split"), _row("Small", 0.5)], path)
    rows = costs.read_table(path)
    assert rows["Split"] == _split_row("Split")  # the new columns round-trip
    runs = costs.score_runs("Split", layers=6, rows=rows)  # batches of 4 and 2 layers
    assert runs == [
        costs.ScoreBatch((6.0 + 4 * 80 / 8,) * 8, 4 * 2.0),
        costs.ScoreBatch((6.0 + 2 * 80 / 8,) * 8, 2 * 2.0),
    ]
    assert costs.score_runs("Small", 5, dim=2048, rows=rows) == [
        costs.ScoreBatch((8 * 2.0,)),
        costs.ScoreBatch((2 * 2.0,)),
    ]
    assert costs.score_cpu_seconds("Split", rows=rows) == 82.0
    old = tmp_path / "old.csv"  # a table from before parts: whole tasks, no loads
    old.write_text("\n".join(line.rsplit(",", 3)[0] for line in path.read_text().splitlines()) + "\n")
    assert costs.read_table(old)["Split"].parts == 1


def test_a_runs_measured_seconds_replace_the_tables_scoring_costs(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text(
        "task,layer,seconds\nSTS12,0,3.0\nSTS12,1,5.0\nSTS12,2,4.0\nMindSmallReranking,0,90.0\n"
    )
    rows, source = costs.measured_score_costs(scores, dim=2048)
    assert rows["STS12"].score_cpu_s == 4.0 * 1024 / 2048 and rows["MindSmallReranking"].merge_cpu_s == 0.0
    assert (
        rows["MindSmallReranking"].parts == costs.table()["MindSmallReranking"].parts
    )  # loads, parts: the table's
    assert rows["BIOSSES"] == costs.table()["BIOSSES"] and "2 tasks" in source
    scores.write_text("task,layer,seconds\n")
    with pytest.raises(ValueError, match="no score rows"):
        costs.measured_score_costs(scores, 1024)


def test_estimate_of_exp2_adds_up_per_phase():
    grid = costs.Grid(checkpoints=50, layers=4, tasks=suite.LAYER_BY_LAYER_32, num_blocks=24, hidden=1024)
    est = costs.estimate(grid, gpu_jobs=8, cpu_jobs=64)
    per_layer = sum(costs.score_cpu_seconds(t) for t in suite.LAYER_BY_LAYER_32)
    runs = sum(b.seconds for t in suite.LAYER_BY_LAYER_32 for b in costs.score_runs(t, 4))
    assert est["hours"]["score"]["cpu"] == pytest.approx(
        50 * runs / 3600
    )  # every task run, its load included
    assert est["score_cpu_s_per_checkpoint_layer"] == pytest.approx(per_layer)
    assert per_layer < runs / 4  # a task run's load on top of its warm layers
    assert est["hours"]["record"]["cpu"] == pytest.approx(per_layer / 3600)
    assert est["hours"]["embed"]["gpu"] > 0 and est["hours"]["measure"]["gpu"] > 0
    mem = est["memory_gb"]
    assert mem["big_memory_worker"] == 0 and mem["scoring_worker"] <= 8
    assert est["split"] == {"MindSmallReranking": costs.score_parts("MindSmallReranking")}
    # More CPU slots never make the run longer, and the run is never shorter than its GPU phase.
    more = costs.estimate(grid, gpu_jobs=8, cpu_jobs=128)
    assert more["wall_hours"] <= est["wall_hours"] and est["wall_hours"] >= est["gpu_phase_hours"]
    assert any("ASSUMED" in a for a in est["assumptions"])


def test_layertime_stays_free_of_prefect_and_dask():
    code = "import sys, layertime.costs, layertime.plan; print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'dask', 'distributed')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_plan_prints_the_estimates_for_the_given_jobs(hub, tmp_path):
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
    assert c["memory_gb"]["big_memory_worker"] == 0  # no task needs one
    grid = costs.Grid(checkpoints=50, layers=4, tasks=suite.LAYER_BY_LAYER_32, num_blocks=24, hidden=1024)
    assert c["wall_hours"] == pytest.approx(costs.estimate(grid, 8, 64, 2)["wall_hours"])
    # A finished run's own scoring seconds: its tables/scores.csv, for the tasks it scored.
    run = tmp_path / "run"
    (run / "tables").mkdir(parents=True)
    (run / "tables" / "scores.csv").write_text("task,layer,seconds\nMindSmallReranking,20,500.0\n")
    measured = subprocess.run([*args, "--costs-from", str(run), "--json"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert measured.returncode == 0, measured.stderr
    m = json.loads(measured.stdout)["costs"]
    assert m["score_cpu_s_per_checkpoint_layer"] == pytest.approx(
        c["score_cpu_s_per_checkpoint_layer"] - costs.score_cpu_seconds("MindSmallReranking") + 500.0
    )
    assert "1 tasks' scoring seconds measured by the run" in m["table"]
    bad = subprocess.run([*args, "--costs-from", str(tmp_path / "none")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--costs-from" in bad.stderr


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
