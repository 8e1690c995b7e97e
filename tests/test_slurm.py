"""The `slurm` cluster profile against a real single-node SLURM (`bash .ci/slurm.sh start`, docs/design.md §6).

The demo spec runs through real `sbatch` jobs whose Dask workers run the tasks; the tables must equal
a local run's. A bad request fails the flow fast with SLURM's own words, a worker job cancelled
mid-run is replaced without losing or repeating a unit, and task logs from the jobs reach the API.
The profile's settings and job script are checked without SLURM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import prefect_runs  # tests/prefect_runs.py
import pytest
import yaml

from flows.clusters import ClusterError, SlurmSettings, job_script, load_slurm_settings, profile
from flows.slurm import JOBS_IN_A_ROW

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "deployments/demo.yaml")
needs_slurm = pytest.mark.skipif(shutil.which("sinfo") is None, reason="no SLURM here (sinfo is not on PATH)")
GRID = {"checkpoints": ["step1000", "main"], "layers": [3], "tasks": ["DemoSTS", "DemoClassification"]}
UNITS = 2 * 1 * 2  # checkpoints x layers x tasks
# One score task run per (checkpoint, task), scoring its layers (up to 4) in turn; GRID's one layer
# names each `score[<revision> · <task> · L3]`.
SCORE_TASK_RUNS = sorted(f"score[{c} · {t} · L3]" for c in GRID["checkpoints"] for t in GRID["tasks"])


@pytest.fixture(autouse=True)
def _no_profile_from_the_environment(monkeypatch):
    """Each test starts from deployments/clusters/slurm.yaml alone, whatever this shell exports."""
    for key in [k for k in os.environ if k.startswith("LAYERTIME_SLURM_")]:
        monkeypatch.delenv(key)


# --- the profile, without SLURM ----------------------------------------------------------------


def test_exp2_job_script_asks_for_what_the_profile_says():
    script = job_script(
        ROOT / "deployments/exp2.yaml",
        {"account": "lab-42", "partition": "gpu", "cpus": 8, "memory": "64G", "walltime": "12:00:00",
         "gpu_type": "a100", "job_script_prologue": ["module load cuda/12.4"]},
    )  # fmt: skip
    directives = set(re.findall(r"^#SBATCH (.+)$", script, re.M))
    assert {
        "-A lab-42",
        "-p gpu",
        "--cpus-per-task=8",
        "--mem=64G",
        "-t 12:00:00",
        "--gres=gpu:a100:1",
    } <= directives
    lines = script.splitlines()
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker.split()[:3] == [sys.executable, "-m", "distributed.cli.dask_worker"]
    assert "--resources GPU=1" in worker and "--nthreads 8" in worker and "--lifetime" in worker
    assert "export HF_HUB_OFFLINE=1" in lines and "module load cuda/12.4" in lines
    assert lines.index("module load cuda/12.4") < lines.index(worker)


def test_the_default_profile_is_one_gpu_eight_cpus():
    defaults = load_slurm_settings(path=ROOT / "deployments/clusters/slurm.yaml")
    assert (defaults.gpus, defaults.cpus, defaults.device) == (1, 8, "cuda")
    exp2 = ["SciDocsRR", "MindSmallReranking"]  # the file's profile can score every task of the suite
    assert profile("slurm").check_fits(exp2, 1024)["MindSmallReranking"] <= _gib_of(defaults.memory) * 3 // 4
    assert defaults.bigmem_jobs == 0 and defaults.gpu_job_scoring == 0  # MindSmall is scored in parts
    assert profile("slurm").device == "cuda" and profile("slurm", {"device": "cpu"}).device == "cpu"


def _gib_of(memory: str) -> int:
    return int(memory.rstrip("G"))


def test_settings_come_from_file_then_environment_then_overrides(tmp_path, monkeypatch):
    conf = tmp_path / "slurm.yaml"
    conf.write_text(yaml.safe_dump({"partition": "a", "account": "x", "cpus": 4, "walltime": 3600}))
    monkeypatch.setenv("LAYERTIME_SLURM_CONFIG", str(conf))
    monkeypatch.setenv("LAYERTIME_SLURM_PARTITION", "b")
    monkeypatch.setenv("LAYERTIME_SLURM_JOB_EXTRA_DIRECTIVES", '["--qos=long"]')
    monkeypatch.setenv("LAYERTIME_SLURM_ACCOUNT", "")
    s = load_slurm_settings({"cpus": 2})
    assert (s.partition, s.account, s.cpus, s.walltime) == ("b", None, 2, "01:00:00")
    assert s.job_extra_directives == ["--qos=long"] and s.walltime_seconds == 3600
    seconds = {
        "90": 5400,
        "90:30": 5430,
        "12:00:00": 43200,
        "2-12": 216000,
        "2-00:30": 174600,
        "1-0:0:5": 86405,
    }
    assert {w: SlurmSettings(walltime=w).walltime_seconds for w in seconds} == seconds


def test_a_bad_field_names_itself_and_where_it_came_from(monkeypatch):
    monkeypatch.setenv("LAYERTIME_SLURM_MAX_JOBS", "many")
    with pytest.raises(ClusterError, match=r"max_jobs \(LAYERTIME_SLURM_MAX_JOBS, value 'many'\)"):
        profile("slurm")
    monkeypatch.delenv("LAYERTIME_SLURM_MAX_JOBS")
    with pytest.raises(ClusterError, match=r"partiton \(cluster overrides.*Extra inputs are not permitted"):
        profile("slurm", {"partiton": "gpu"})
    with pytest.raises(ClusterError, match="device 'cuda' needs gpus: 1"):
        profile("slurm", {"gpus": 0})
    with pytest.raises(ClusterError, match="memory.*not a memory size"):
        profile("slurm", {"memory": "lots"})
    with pytest.raises(ValueError, match="unknown profile 'pbs' \\(known: local, slurm, slurm-cpu\\)"):
        profile("pbs")


def _scripts(script: str) -> dict[str, str]:
    """`layertime slurm-script` output split by kind of job ('# gpu jobs: 8' headers)."""
    parts = re.split(r"^# (\w+) jobs: \d+$", script, flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2], strict=True))


def test_scoring_jobs_ask_for_cpus_and_memory_and_never_a_gpu():
    scripts = _scripts(job_script(
        ROOT / "deployments/exp2.yaml",
        {"partition": "gpu", "score_partition": "cpu", "score_jobs": 64, "score_cpus": 8, "score_memory": "32G",
         "bigmem_jobs": 2, "bigmem_memory": "64G"},
    ))  # fmt: skip
    assert set(scripts) == {"gpu", "score", "bigmem"}
    gpu, score, bigmem = (scripts[k] for k in ("gpu", "score", "bigmem"))
    assert "--gres=gpu:1" in gpu and "-p gpu" in gpu
    assert "--resources GPU=1 " in gpu and "MEM_GB" not in gpu  # scoring has jobs of its own
    for text in (score, bigmem):
        assert "--gres" not in text and "-p cpu" in text and "export CUDA_VISIBLE_DEVICES=''" in text
        assert "--resources GPU" not in text
    # eight one-thread processes sharing 32 GiB; one process with all of 64 GiB
    assert {"--cpus-per-task=8", "--mem=32G"} <= set(re.findall(r"^#SBATCH (.+)$", score, re.M))
    assert "--nworkers 8" in score and "--nthreads 1" in score and "--resources MEM_GB=4 " in score
    assert {"--cpus-per-task=1", "--mem=64G"} <= set(re.findall(r"^#SBATCH (.+)$", bigmem, re.M))
    assert "--nthreads 1" in bigmem and "--resources MEM_GB=64 " in bigmem
    only_gpu = _scripts(job_script(None, {"memory": "64G", "bigmem_jobs": 0}))
    assert list(only_gpu) == ["gpu"] and "--resources GPU=1,MEM_GB=48 " in only_gpu["gpu"]  # 3/4 scores


def test_gpu_jobs_can_score_on_their_idle_cores_in_one_thread_processes():
    """`gpu_job_scoring`: each GPU job starts one-thread scoring workers (GPU hidden, MEM_GB each) beside
    its GPU worker, which then offers no scoring memory; the job asks SLURM for all of it once."""
    fields = {
        "cpus": 16,
        "threads": 4,
        "memory": "128G",
        "gpu_job_scoring": 12,
        "gpu_job_scoring_memory": "96G",
    }
    scripts = _scripts(job_script(None, fields))
    assert list(scripts) == ["gpu"]
    gpu = scripts["gpu"]
    assert {"--cpus-per-task=16", "--mem=128G", "--gres=gpu:1"} <= set(
        re.findall(r"^#SBATCH (.+)$", gpu, re.M)
    )
    workers = [line for line in gpu.splitlines() if "distributed.cli.dask_worker" in line]
    assert len(workers) == 2
    scoring, main = workers
    assert scoring.startswith("CUDA_VISIBLE_DEVICES= ") and scoring.endswith(" &")
    assert "--nworkers 12" in scoring and "--nthreads 1" in scoring and "--resources MEM_GB=8 " in scoring
    assert "--memory-limit 8.00GiB" in scoring and "GPU" not in scoring.split("--resources")[1]
    assert "--resources GPU=1 " in main and "MEM_GB" not in main and "--nthreads 4" in main
    assert "--memory-limit 32.00GiB" in main  # what the scoring processes leave
    assert profile("slurm", fields).settings.scoring_workers() == {"gpu-node": 8}
    with pytest.raises(ClusterError, match="gpu_job_scoring 12 \\+ threads 8 > cpus 16"):
        load_slurm_settings({**fields, "threads": 8})
    with pytest.raises(ClusterError, match="leaves nothing"):
        load_slurm_settings({**fields, "gpu_job_scoring_memory": "128G"})


def test_a_task_no_scoring_worker_can_hold_fails_before_the_run_naming_it():
    whole = {"MindSmallReranking": 40}  # as if scored in one process
    small = profile(
        "slurm", {"score_jobs": 2, "score_cpus": 8, "score_memory": "32G", "task_memory_gb": whole}
    )
    with pytest.raises(
        ClusterError, match=r"MindSmallReranking needs 40 GB.*largest offers 4 GB.*task_parts.*bigmem_jobs"
    ):
        small.check_fits(["SciDocsRR", "MindSmallReranking"], 1024)
    big = profile("slurm", {"score_jobs": 2, "score_memory": "32G", "bigmem_jobs": 1, "bigmem_memory": "64G",
                            "task_memory_gb": whole})  # fmt: skip
    assert big.check_fits(["SciDocsRR", "MindSmallReranking"], 1024)["MindSmallReranking"] == 40
    # in parts (the cost table's), a scoring job's process holds a part
    assert profile("slurm", {"score_jobs": 2, "score_memory": "64G"}).check_fits(["MindSmallReranking"], 1024)
    assert profile("slurm", {"task_parts": {"SciDocsRR": 3}}).score_parts("SciDocsRR") == 3
    pinned = profile("slurm", {"task_memory_gb": {"SciDocsRR": 40}, "memory": "64G"})
    assert pinned.check_fits(["SciDocsRR"], 1024) == {"SciDocsRR": 40}  # the profile's figure wins
    with pytest.raises(ClusterError, match="SciDocsRR needs 40 GB.*local: 8 GB"):
        profile("local", {"memory_gb": 8, "task_memory_gb": {"SciDocsRR": 40}}).check_fits(
            ["SciDocsRR"], 1024
        )
    with pytest.raises(ClusterError, match=r"cluster profile local: scoring_procs"):
        profile("local", {"scoring_procs": 2})
    assert profile("local", {"scoring_processes": 0}).scoring_processes == 0  # score in the worker's threads
    assert profile("local").scoring_processes == os.cpu_count() and profile("slurm").scoring_processes == 0


# --- a real SLURM ------------------------------------------------------------------------------


@needs_slurm
def test_slurm_check_names_what_the_ci_node_cannot_give_and_passes_the_small_profile(slurm):
    """The default profile (8 CPUs, 64 GiB, a GPU per job) against the 2-CPU CI node: exit 1, each field
    to change named with the most it can be; `slurm-cpu` (the demo's, docs/clusters.md): exit 0."""
    from typer.testing import CliRunner

    from flows.commands import app

    big = CliRunner().invoke(app, ["slurm-check", "--cluster", "slurm"])
    assert big.exit_code == 1, big.output
    assert "change cpus: 8 CPUs asked" in big.stdout and "change memory: 64G asked" in big.stdout
    assert (
        "sbatch --test-only: allocation failure: Requested node configuration is not available" in big.stdout
    )
    assert big.stdout.rstrip().endswith(
        "profile slurm: its jobs cannot start here: change the fields named above"
    )
    small = CliRunner().invoke(app, ["slurm-check", "--cluster", "slurm-cpu"])
    assert small.exit_code == 0, small.output
    assert "change " not in small.stdout and "profile slurm-cpu: its jobs can start here" in small.stdout


@pytest.fixture(scope="module")
def slurm():
    """SLURM answers, or the tests say how to start it."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and " up " in f" {out.stdout} ", (
        f"SLURM is installed but not answering ({out.stderr.strip()}): run `bash .ci/slurm.sh start`"
    )


@pytest.fixture
def ci_profile(slurm, exclusive, tmp_path, monkeypatch):
    """The slurm profile shrunk to this 2-core box (the fake GPU is /dev/null), SLURM to this test alone
    (across pytest-xdist workers); returns the log dir."""
    logs = tmp_path / "slurm-logs"
    job_name = f"lt-{tmp_path.name[-12:]}"
    env = {"PARTITION": "debug", "ACCOUNT": "", "CPUS": "1", "THREADS": "2", "MEMORY": "3G",
           "WALLTIME": "00:15:00", "DEVICE": "cpu", "GPUS": "1", "INTERFACE": "lo", "DASHBOARD_ADDRESS": "",
           "MIN_JOBS": "1", "MAX_JOBS": "1", "BIGMEM_JOBS": "0", "DEATH_TIMEOUT": "30", "LOG_DIRECTORY": str(logs),
           "JOB_NAME": job_name}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(f"LAYERTIME_SLURM_{key}", value)
    with exclusive("slurm"):
        yield logs
        subprocess.run(["scancel", "--name", job_name], capture_output=True, timeout=30)


def _run(spec_overrides: dict, cluster: str):
    from flows.layer_by_layer import layer_by_layer

    return layer_by_layer(SPEC, cluster=cluster, overrides=spec_overrides, return_state=True)


def _task_runs(flow_run_id) -> list:
    return list(prefect_runs.task_runs(flow_run_id).values())


def _task_logs(flow_run_id) -> list:
    return [entry for entry in prefect_runs.logs(flow_run_id) if entry.task_run_id is not None]


def _jobs(logs: Path) -> dict[str, str]:
    """SLURM job id -> what its worker printed (dask-jobqueue names the files <job_name>-<id>.out/.err)."""
    jobs: dict[str, str] = {}
    for path in sorted(logs.glob("*-*.*")):
        job_id = path.stem.rpartition("-")[2]
        jobs[job_id] = jobs.get(job_id, "") + path.read_text(errors="replace")
    return jobs


def _scores(run_root: Path) -> pl.DataFrame:
    scores = pl.read_parquet(run_root / "tables/scores.parquet")
    return scores.drop("seconds", "peak_memory_gb").sort("revision", "task", "layer", "subset")  # costs vary


def _metrics(run_root: Path) -> pl.DataFrame:
    metrics = pl.read_parquet(run_root / "tables/metrics.parquet")
    return metrics.drop([c for c in metrics.columns if c == "seconds"]).sort(metrics.columns)


def _with_a_scoring_job(monkeypatch) -> None:
    """The CI profile plus one CPU-only scoring job of one process (the box has 2 CPUs)."""
    for key, value in {"SCORE_JOBS": "1", "SCORE_CPUS": "1", "SCORE_MEMORY": "3G"}.items():
        monkeypatch.setenv(f"LAYERTIME_SLURM_{key}", value)


MARK = {"gpu": "- embedding ", "score": "- scored "}  # a task of the kind under way / finished


def _run_cancelling_a_job(kind: str, logs: Path, hub: Path, tmp_path: Path, before=None) -> tuple:
    """Run the demo grid on the slurm profile and `scancel` the first job whose worker logged a finished
    `kind` task run (`before(job_id)` first); returns (the flow's state, [the cancelled job's id])."""
    killed: list[str] = []
    stop = threading.Event()

    def cancel() -> None:
        while not stop.wait(0.2):
            for job_id, text in _jobs(logs).items():
                # Our own task log lines (Prefect's "Finished in state" lines are quieted: flows/logs.py).
                if f"Task run '{kind}[" in text and MARK[kind] in text.partition(f"Task run '{kind}[")[2]:
                    if before is not None:
                        before(job_id)
                    subprocess.run(["scancel", job_id], check=True, timeout=30)
                    killed.append(job_id)
                    return

    killer = threading.Thread(target=cancel, daemon=True)
    killer.start()
    try:
        state = _run({**GRID, "hf_cache": str(hub), "run_root": str(tmp_path / "demo")}, "slurm")
    finally:
        stop.set()
        killer.join(timeout=10)
    return state, killed


def _one_blas_thread():
    """The slurm profile pins BLAS to one thread (docs/design.md §10): the local reference does the same."""
    import contextlib

    import torch
    from threadpoolctl import threadpool_limits

    @contextlib.contextmanager
    def pinned():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(1):
                yield
        finally:
            torch.set_num_threads(threads)

    return pinned()


@pytest.mark.slow
@needs_slurm
def test_demo_runs_in_slurm_jobs_with_the_scores_of_a_local_run(
    prefect_api, ci_profile, hub, tmp_path, monkeypatch
):
    _with_a_scoring_job(monkeypatch)  # embedding in the GPU job, scoring beside it
    grid = {**GRID, "hf_cache": str(hub)}
    with _one_blas_thread():
        local = _run({**grid, "run_root": str(tmp_path / "local/demo")}, "local")
    assert local.is_completed()

    started = time.monotonic()
    state = _run({**grid, "run_root": str(tmp_path / "slurm/demo")}, "slurm")
    assert state.is_completed(), state.message
    elapsed = time.monotonic() - started

    slurm_scores, local_scores = _scores(tmp_path / "slurm/demo"), _scores(tmp_path / "local/demo")
    assert slurm_scores.height == UNITS
    assert slurm_scores.equals(local_scores), f"{slurm_scores}\n!=\n{local_scores}"
    slurm_metrics, local_metrics = _metrics(tmp_path / "slurm/demo"), _metrics(tmp_path / "local/demo")
    assert slurm_metrics.height > 0 and slurm_metrics.equals(local_metrics), (
        f"{slurm_metrics}\n!=\n{local_metrics}"
    )

    jobs = _jobs(ci_profile)  # the work ran in real batch jobs: their workers' output is there
    assert jobs, f"no job output in {ci_profile}"
    ran = "\n".join(jobs.values())
    assert (
        "Start worker" in ran
        and "Task run 'score[main · DemoSTS · L3]' - scored main · DemoSTS layer 3" in ran
    )

    flow_run_id = state.state_details.flow_run_id
    runs = {r.id: r.name for r in _task_runs(flow_run_id)}
    logs = _task_logs(flow_run_id)  # written by the workers in the jobs, flushed before they closed
    logged = {
        runs[entry.task_run_id] for entry in logs if entry.message.startswith(("scored ", "tables written"))
    }
    assert set(SCORE_TASK_RUNS) <= logged
    assert "merge[demo]" in logged  # the last task of the run: its logs survive the cluster's close

    gpu_jobs = {p.stem.rpartition("-")[2] for p in ci_profile.glob("lt-*") if "-score-" not in p.name}
    score_jobs = {p.stem.rpartition("-")[2] for p in ci_profile.glob("*-score-*")}
    assert gpu_jobs and score_jobs
    assert all("Task run 'score[" not in jobs[j] for j in gpu_jobs)  # GPU jobs embed and measure
    assert any("Task run 'gpu[" in jobs[j] for j in gpu_jobs)
    scored_in = {json.loads(p.read_text())["provenance"]["slurm_job_id"]
                 for p in (tmp_path / "slurm/store/scores").rglob("layer_3.json")}  # fmt: skip
    assert scored_in and scored_in <= score_jobs
    print(f"slurm run: {elapsed:.0f} s, jobs {sorted(jobs)}")


@pytest.mark.slow
@needs_slurm
@pytest.mark.parametrize(
    ("setting", "value", "slurm_says"),
    [
        ("PARTITION", "no-such-partition", "Invalid partition name specified"),
        ("CPUS", "64", "Requested node configuration is not available"),
    ],
)
def test_a_job_slurm_rejects_fails_the_flow_fast_with_slurms_message(
    prefect_api, ci_profile, hub, tmp_path, monkeypatch, setting, value, slurm_says
):
    monkeypatch.setenv(f"LAYERTIME_SLURM_{setting}", value)
    started = time.monotonic()
    state = _run({**GRID, "hf_cache": str(hub), "run_root": str(tmp_path / "demo")}, "slurm")
    assert state.is_failed()
    with pytest.raises(Exception, match=slurm_says):
        state.result()
    assert time.monotonic() - started < 60
    assert not _jobs(ci_profile)  # nothing was queued


@pytest.mark.slow
@needs_slurm
def test_a_rejection_after_the_start_fails_the_pending_tasks_with_slurms_message(
    prefect_api, ci_profile, hub, tmp_path, monkeypatch
):
    monkeypatch.setenv("LAYERTIME_SLURM_PARTITION", "no-such-partition")
    monkeypatch.setenv("LAYERTIME_SLURM_PREFLIGHT", "false")  # as if SLURM changed its mind mid-run
    started = time.monotonic()
    state = _run({**GRID, "hf_cache": str(hub), "run_root": str(tmp_path / "demo")}, "slurm")
    assert state.is_failed()
    with pytest.raises(
        Exception, match="(?s)SLURM rejected the worker job.*Invalid partition name specified"
    ):
        state.result()
    assert time.monotonic() - started < 60


@pytest.mark.slow
@needs_slurm
def test_jobs_whose_worker_cannot_start_fail_the_flow_with_the_jobs_log(
    prefect_api, ci_profile, hub, tmp_path, monkeypatch
):
    monkeypatch.setenv("LAYERTIME_SLURM_PYTHON", "/nonexistent/venv/bin/python")  # a wrong path on the nodes
    started = time.monotonic()
    state = _run({**GRID, "hf_cache": str(hub), "run_root": str(tmp_path / "demo")}, "slurm")
    assert state.is_failed()
    with pytest.raises(
        Exception, match="(?s)ended before its Dask worker connected.*/nonexistent/venv/bin/python"
    ):
        state.result()
    # Fails, not replaced forever: JOBS_IN_A_ROW short jobs (each waits for a free CPU on the shared node)
    assert time.monotonic() - started < 120
    assert len(_jobs(ci_profile)) == JOBS_IN_A_ROW  # replaced until that many in a row ended without a task


# The jobs' python: its Dask worker connects, then the job dies on the first task it gets (the worker
# kills its nanny, which runs the job's script, and itself), as a job killed by a bad node or a broken
# library would.
_DIE_ON_EVERY_TASK = """
import os, signal, sys
from layertime.phases import record

def task_texts(*args, **kwargs):
    print(f"layertime test: job {os.environ.get('SLURM_JOB_ID')} dies on its task", file=sys.stderr, flush=True)
    os.kill(os.getppid(), signal.SIGKILL)
    os._exit(1)

record.task_texts = task_texts
"""


@pytest.mark.slow
@needs_slurm
def test_jobs_that_die_on_every_task_fail_the_flow_naming_the_last_jobs_log(
    prefect_api, ci_profile, hub, tmp_path, monkeypatch
):
    import dask

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DIE_ON_EVERY_TASK)
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\nexport PYTHONPATH={hook}${{PYTHONPATH:+:$PYTHONPATH}}\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    monkeypatch.setenv("LAYERTIME_SLURM_PYTHON", str(python))
    started = time.monotonic()
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}):  # replaced quickly
        state = _run({**GRID, "hf_cache": str(hub), "run_root": str(tmp_path / "demo")}, "slurm")
    assert state.is_failed()
    with pytest.raises(Exception) as failed:
        state.result()
    message = str(failed.value)
    # the jobs the run counted, as its message names them; a job SLURM ends before its script runs
    # writes no log file, so the logs may hold fewer, never others
    counted = re.search(r"in a row ended without finishing a task \(([\d, ]+)\)", message)
    assert counted, message
    ids = counted.group(1).split(", ")
    jobs = _jobs(ci_profile)
    assert len(ids) == JOBS_IN_A_ROW and set(jobs) <= set(ids), (
        ids,
        sorted(jobs),
    )  # replaced until that many
    last = max(ids, key=int)
    assert f"{JOBS_IN_A_ROW} gpu jobs in a row ended without finishing a task" in message, message
    assert "its worker connected, then it ended before finishing a task" in message
    assert f"-{last}.err" in message and f"layertime test: job {last} dies on its task" in message, message
    print(f"failed after {time.monotonic() - started:.0f} s, jobs {sorted(jobs)}")


@pytest.mark.slow
@needs_slurm
def test_a_worker_job_cancelled_mid_run_is_replaced_and_no_unit_is_lost_or_repeated(
    prefect_api, ci_profile, hub, tmp_path
):
    seen: dict[str, str] = {}

    def keep_its_script(job_id: str) -> None:
        out = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        seen["script"] = out.stdout

    state, killed = _run_cancelling_a_job("gpu", ci_profile, hub, tmp_path, keep_its_script)
    assert killed, "the run ended before a worker job could be cancelled"
    assert state.is_completed(), state.message

    scores = _scores(tmp_path / "demo")
    assert scores.height == UNITS and scores["main_score"].is_finite().all()
    assert scores.select("revision", "task", "layer", "subset").is_unique().all()
    names = [r.name for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith("score[")]
    assert sorted(names) == SCORE_TASK_RUNS  # each (checkpoint, task) once, none twice

    jobs = _jobs(ci_profile)
    assert len(jobs) >= 2, f"no job replaced the cancelled one: {sorted(jobs)}"
    after = "\n".join(text for job_id, text in jobs.items() if job_id != killed[0])
    assert "Task run 'score[" in after  # the work went on in another job
    # The job's environment: offline hub, the flow's Prefect API, the test's mteb cache.
    script = seen["script"]
    assert "export HF_HUB_OFFLINE=1" in script and "export PREFECT_API_URL=http://127.0.0.1:" in script
    assert "export MTEB_CACHE=" in script


@pytest.mark.slow
@needs_slurm
def test_a_scoring_job_cancelled_mid_run_is_replaced_and_no_unit_is_lost_or_repeated(
    prefect_api, ci_profile, hub, tmp_path, monkeypatch
):
    _with_a_scoring_job(monkeypatch)
    state, killed = _run_cancelling_a_job("score", ci_profile, hub, tmp_path)
    assert killed, "the run ended before the scoring job could be cancelled"
    assert state.is_completed(), state.message
    scores = _scores(tmp_path / "demo")
    assert scores.height == UNITS and scores.select("revision", "task", "layer", "subset").is_unique().all()
    names = [r.name for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith("score[")]
    assert sorted(names) == SCORE_TASK_RUNS  # each (checkpoint, task) once, none twice
    score_jobs = {p.stem.rpartition("-")[2] for p in ci_profile.glob("*-score-*")}
    assert len(score_jobs) >= 2 and killed[0] in score_jobs  # another scoring job took over
