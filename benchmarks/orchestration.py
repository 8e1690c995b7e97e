"""Benchmark of orchestration at exp2's size: the scale world through a real Prefect server (issue 15).

Runs `deployments/scale.yaml` (exp2's shape: 50 checkpoints × 4 layers × 32 tasks, every unit real but
tiny) the way users run exp2: `prefect server start`, a process work pool, `prefect deploy` of the
`scale` deployment, one `prefect worker`, `prefect deployment run 'layer-by-layer/scale'` — once with
the server on SQLite (Prefect's default) and once on PostgreSQL (`.ci/postgres.sh`), side by side.
Each backend gets a fresh Prefect home, a fresh database and its own run root, so neither reuses the
other's results. It records, per backend:

- wall time from `deployment run` to the flow run's final state;
- compute: the units' own measured seconds, summed from the tables (`scores.seconds`: scoring;
  `costs.seconds`: embedding and metrics);
- orchestration overhead per task run: (flow run's running time − compute / slots) / task runs,
  `slots` = the scoring processes that run at once (min(processes, cores)); it includes the flow's
  fixed costs (imports, offline verification, recording, merge and report). The same non-compute
  time is also given in seconds and per evaluation (a score task run scores up to 4 layers);
- where the machine's core-seconds went while the flow ran (`CpuTime`): CPU seconds of the scoring
  processes, the flow process (GPU work, the Dask scheduler and Prefect's task engine), the server,
  the database and the worker, and the cores' idle time; on this one machine they share its cores,
  so the server's and database's CPU is part of the run's cost here (on a cluster they run elsewhere);
- errors in the server's and the worker's (flow's) logs: `database is locked`, HTTP 5xx answers,
  client retries ("retryable"), tracebacks;
- task runs by final state from the API against the plan (lost, duplicated, left Pending/Running);
- peak memory (RSS) of the flow-run process and of its whole process tree (scoring processes too);
- latency of the queries the UI's flow-run page makes (task-run list and count, graph, artifacts,
  logs), sampled every few seconds during the run: p50 and p95;
- the Prefect database's size afterwards.

`--cluster slurm --jobs N` runs the same deployment with cluster="slurm" on the single-node SLURM of
`.ci/slurm.sh` (2 CPUs, 2 fake GPUs): N worker jobs (adaptive minimum = maximum = N) of 1 CPU, 2 Dask
threads, 6 GiB and one fake GPU each (`SLURM_JOB`; embedding on the CPU, scoring on the jobs' threads),
so at most 2 run at once and more wait in the queue. The overhead's `slots` are then what really
scored at once: min(the most jobs SLURM ran at once × the scoring units one job runs at once (its
threads, as many as its MEM_GB holds), the node's CPUs). The flow process (with the Dask scheduler),
the server and the worker share those CPUs with the jobs. Peak RSS is the flow process's; the jobs'
processes are slurmd's, outside the worker's tree, and are summed separately (found by the job name
in their environment). SLURM's own facts come from its job-completion log (`JobCompLoc`,
`$LAYERTIME_SLURM_STATE/jobcomp.log`) and squeue: jobs submitted, their final states, how many ran
at once.

Usage (PostgreSQL must be up: `bash .ci/postgres.sh start`; root only for that script):

    python benchmarks/orchestration.py --checkpoints 50          # the full 6,400 units (exp2's size)
    python benchmarks/orchestration.py --checkpoints 8 --no-write # 1,024 units, print only
    python benchmarks/orchestration.py --checkpoints 8 --cluster slurm --jobs 2  # `bash .ci/slurm.sh start` first

Figures go to `benchmarks/RESULTS.md` (a section per run, machine and load named). The functions
(server, deploy, worker, run, states, errors) are reused by `tests/test_scale.py`,
`tests/test_scale_retry.py` and (the SLURM variant) `tests/test_orchestration_slurm.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the flow's own constants (flows/ is not installed)
    sys.path.insert(1, str(ROOT))
PREFECT = str(Path(sys.executable).parent / "prefect")
SPEC = ROOT / "deployments" / "scale.yaml"
DEPLOYMENT = "layer-by-layer/scale"
POOL = "layertime"  # prefect.yaml's work pool
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# What counts as an error in a log, by kind.
LOG_PATTERNS: dict[str, str] = {
    "database is locked": r"database is locked",
    "HTTP 5xx": r"(?:status code|HTTP/1\.1\"?|Server error '?)\s*5\d\d\b|Internal Server Error|Service Unavailable",
    "client retries": r"retryable (?:status code|exception)",
    "tracebacks": r"^Traceback \(most recent call last\)",
}


# ------------------------------------------------------------------------------------- the server


@dataclass
class Server:
    """A `prefect server start` on loopback with its own home; `env` is what clients need."""

    env: dict[str, str]
    proc: subprocess.Popen
    log: Path
    database: str  # "sqlite" or the PostgreSQL URL

    @property
    def api(self) -> str:
        return self.env["PREFECT_API_URL"]


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_postgres_database(base_url: str, name: str) -> str:
    """Drop and create database `name` on the server of `base_url` (postgresql+asyncpg://u:p@h:port/db);
    returns its URL. The role must be allowed to create databases (.ci/postgres.sh gives `prefect` that)."""
    m = re.fullmatch(r"postgresql\+asyncpg://([^:]+):([^@]+)@([^:/]+):(\d+)/(\w+)", base_url)
    if m is None:
        raise ValueError(f"not a postgresql+asyncpg://user:password@host:port/db URL: {base_url!r}")
    user, password, host, port, db = m.groups()
    env = {**os.environ, "PGPASSWORD": password}
    for sql in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", "-X", "-q", "-h", host, "-p", port, "-U", user, "-d", db, "-c", sql],
                       env=env, check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    return f"postgresql+asyncpg://{user}:{password}@{host}:{port}/{name}"


def database_size(server: Server) -> int:
    """Bytes of the server's database: the SQLite file (and its WAL) or pg_database_size."""
    if server.database == "sqlite":
        home = Path(server.env["PREFECT_HOME"])
        return sum(p.stat().st_size for p in home.glob("prefect.db*"))
    m = re.fullmatch(r"postgresql\+asyncpg://([^:]+):([^@]+)@([^:/]+):(\d+)/(\w+)", server.database)
    assert m is not None
    user, password, host, port, db = m.groups()
    out = subprocess.run(["psql", "-X", "-At", "-h", host, "-p", port, "-U", user, "-d", db, "-c",
                          "SELECT pg_database_size(current_database())"], env={**os.environ, "PGPASSWORD": password},
                         check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    return int(out.stdout.strip())


def start_server(home: Path, port: int, database_url: str | None, timeout: float = 240) -> Server:
    """`prefect server start` with PREFECT_HOME=`home` on 127.0.0.1:`port`; SQLite in `home` unless
    `database_url` (PREFECT_API_DATABASE_CONNECTION_URL) names a PostgreSQL database."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",  # the API the UI calls is what is measured; no static files to serve
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=home)  # fmt: skip
    server = Server(env, proc, log, database_url or "sqlite")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.api}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it does not exit within `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def prefect(env: dict, *args: str, timeout: float = 300, cwd: Path = ROOT) -> str:
    """Run the `prefect` CLI; its stdout, or RuntimeError with both streams."""
    out = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def deploy(server: Server) -> None:
    """The work pool and the `scale` deployment of prefect.yaml, as the README's path does."""
    prefect(server.env, "work-pool", "create", POOL, "--type", "process")
    prefect(server.env, "--no-prompt", "deploy", "--name", "scale")


def start_worker(server: Server, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """One process worker on the pool (one flow run at a time); its output (the flow's logs) to `log`.
    `env` adds to the server's client environment (its flow runs inherit it)."""
    with open(log, "w") as out:
        return subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
                                env={**server.env, **(env or {})}, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def run_deployment(server: Server, overrides: dict, cluster_overrides: dict, cluster: str = "local") -> str:
    """`prefect deployment run 'layer-by-layer/scale'` with these parameters; the flow run's id."""
    out = prefect(server.env, "deployment", "run", DEPLOYMENT, "--param", f"overrides={json.dumps(overrides)}",
                  "--param", f"cluster_overrides={json.dumps(cluster_overrides)}",
                  "--param", f"cluster={cluster}")  # fmt: skip
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    if m is None:
        raise RuntimeError(f"no flow run id in the output of prefect deployment run:\n{out}")
    return m.group(1)


# ------------------------------------------------------------------------------------- watching


UI_QUERIES: dict[str, tuple[str, str, Any]] = {
    # name: (method, path, body), the calls the UI's flow-run page makes ({id}: the flow run)
    "task runs list": ("POST", "/task_runs/filter",
                       {"flow_runs": {"id": {"any_": ["{id}"]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 200}),
    "task runs count": ("POST", "/task_runs/count", {"flow_runs": {"id": {"any_": ["{id}"]}}}),
    "graph": ("GET", "/flow_runs/{id}/graph-v2", None),
    "artifacts": ("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ["{id}"]}}, "limit": 200}),
    "logs": ("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": ["{id}"]}}, "sort": "TIMESTAMP_ASC",
                                      "limit": 200}),
}  # fmt: skip


def _fill(body: Any, flow_run: str) -> Any:
    return json.loads(json.dumps(body).replace("{id}", flow_run)) if body is not None else None


def _idle_core_seconds() -> float:
    """Core-seconds this machine has spent idle (or waiting on I/O) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuTime:
    """Where the machine's core-seconds went while the flow ran (issue 15: what the overhead is made
    of). Per group, CPU seconds (user + system) of its processes, each process's largest sample: a
    process that ends loses at most one sampling interval. `idle` is machine-wide, from /proc/stat,
    between the first and last sample taken while the flow run was Running."""

    groups: dict[str, dict[int, float]] = field(default_factory=dict)  # group -> pid -> CPU s
    before: dict[str, dict[int, float]] = field(default_factory=dict)  # the same, when the flow started
    idle: list[float] = field(default_factory=list)  # idle core-seconds at the first and last sample

    def sample(self, worker: subprocess.Popen, server: Server, running: bool) -> None:
        import psutil

        def add(group: str, procs: list) -> None:
            seen = self.groups.setdefault(group, {})
            for p in procs:
                try:
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                seen[p.pid] = max(seen.get(p.pid, 0.0), t.user + t.system)

        try:
            flows = psutil.Process(worker.pid).children()
            add("server", [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)])
        except psutil.Error:
            return
        add("worker", [psutil.Process(worker.pid)])
        add("flow process", flows)
        add("scoring processes", [c for f in flows for c in f.children(recursive=True)])
        add("database", [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"])
        if running:
            idle = _idle_core_seconds()
            if not self.idle:  # the flow run's start: what was spent before is not its cost
                self.before = {group: dict(by_pid) for group, by_pid in self.groups.items()}
            self.idle = [self.idle[0] if self.idle else idle, idle]

    def split(self) -> dict[str, float]:
        """CPU seconds per group while the flow ran, and the machine's idle core-seconds meanwhile."""
        out = {
            group: sum(t - self.before.get(group, {}).get(pid, 0.0) for pid, t in by_pid.items())
            for group, by_pid in self.groups.items()
        }
        out["idle"] = self.idle[1] - self.idle[0] if self.idle else 0.0
        return out


@dataclass
class Watch:
    """What was seen while the flow ran: final state, UI latencies (s) per query, peak memory (bytes)."""

    state: str = ""
    message: str = ""
    queued_s: float = 0.0  # deployment run -> flow run started (worker pick-up, process start)
    running_s: float = 0.0  # flow run start -> end, from the API
    latencies: dict[str, list[float]] = field(default_factory=dict)
    ui_errors: list[str] = field(default_factory=list)
    cpu: CpuTime = field(default_factory=CpuTime)
    flow_rss: int = 0
    tree_rss: int = 0
    jobs_rss: int = 0  # SLURM worker jobs' processes, summed (outside the worker's process tree)


def _rss(worker: subprocess.Popen) -> tuple[int, int]:
    """RSS of the worker's flow-run child (largest direct child) and of everything under the worker."""
    import psutil

    try:
        children = psutil.Process(worker.pid).children()
    except psutil.Error:
        return 0, 0
    flow, tree = 0, 0
    for child in children:
        try:
            own = child.memory_info().rss
            below = sum(p.memory_info().rss for p in child.children(recursive=True))
        except psutil.Error:
            continue
        flow, tree = max(flow, own), tree + own + below
    return flow, tree


def watch(
    server: Server,
    flow_run: str,
    worker: subprocess.Popen,
    timeout: float,
    every: float = 5.0,
    jobs_rss: Callable[[], int] | None = None,
) -> Watch:
    """Poll the flow run until it is final, timing the UI's queries and sampling memory meanwhile
    (`jobs_rss`: the SLURM worker jobs' memory now, which no process of the worker holds)."""
    seen = Watch(latencies={name: [] for name in UI_QUERIES})
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.api, timeout=120) as client:
        while time.monotonic() < deadline:
            flow, tree = _rss(worker)
            seen.flow_rss, seen.tree_rss = max(seen.flow_rss, flow), max(seen.tree_rss, tree)
            if jobs_rss is not None:
                seen.jobs_rss = max(seen.jobs_rss, jobs_rss())
            run = client.get(f"/flow_runs/{flow_run}").json()
            state = run.get("state") or {}
            seen.cpu.sample(worker, server, running=state.get("type") in {"RUNNING", *FINAL})
            if state.get("type") in FINAL:
                seen.state, seen.message = state["type"], state.get("message") or ""
                seen.queued_s, seen.running_s = _seconds(run["created"], run["start_time"], run["end_time"])
                return seen
            if state.get("type") == "RUNNING":
                for name, (method, path, body) in UI_QUERIES.items():
                    t0 = time.perf_counter()
                    answer = client.request(
                        method, path.replace("{id}", flow_run), json=_fill(body, flow_run)
                    )
                    seen.latencies[name].append(time.perf_counter() - t0)
                    if answer.status_code >= 400:
                        seen.ui_errors.append(f"{name}: HTTP {answer.status_code}")
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode}) before the flow run ended")
            time.sleep(every)
    raise TimeoutError(f"flow run {flow_run} not final after {timeout} s")


def _seconds(created: str, start: str | None, end: str | None) -> tuple[float, float]:
    """(created -> start, start -> end) in seconds from the API's ISO timestamps."""
    import datetime as dt

    t = [dt.datetime.fromisoformat(x) if x else None for x in (created, start, end)]
    if t[1] is None or t[2] is None:
        return 0.0, 0.0
    return (t[1] - t[0]).total_seconds(), (t[2] - t[1]).total_seconds()


PAGE = 200  # the most rows the server answers per filter call (PREFECT_API_DEFAULT_LIMIT)


def read_all(api: str, path: str, body: dict[str, Any]) -> list[dict]:
    """Every row of a filter endpoint (`/task_runs/filter`, `/logs/filter`, ...), page by page: the
    server answers at most PAGE rows per call, exp2 has ~1,700 task runs."""
    rows: list[dict] = []
    with httpx.Client(base_url=api, timeout=120) as client:
        while True:
            page = client.post(path, json={**body, "limit": PAGE, "offset": len(rows)})
            page.raise_for_status()
            batch = page.json()
            rows += batch
            if len(batch) < PAGE:
                return rows


def task_runs(server: Server, flow_run: str) -> list[dict]:
    """Every task run of `flow_run` from the API (name, state type)."""
    runs = read_all(
        server.api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}, "sort": "ID_DESC"}
    )
    return [{"id": r["id"], "name": r["name"], "state": (r.get("state") or {}).get("type")} for r in runs]


def flow_run_logs(server: Server, flow_run: str) -> list[dict]:
    """Every log of `flow_run` stored by the server: message and task_run_id (None: the flow's own)."""
    logs = read_all(
        server.api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run]}}, "sort": "TIMESTAMP_ASC"}
    )
    return [{"message": r["message"], "task_run_id": r.get("task_run_id")} for r in logs]


def expected_task_runs(plan: Any) -> Counter:
    """How many task runs of each kind the flow makes for `plan` on a fresh run root: a recording pass
    per task (real CPU work, in parallel), a GPU task per checkpoint (one model load), a score task per
    LAYERS_PER_SCORE_TASK layers of a (checkpoint, task), one merge. Embeddings are deleted by the
    flow, not by tasks."""
    from flows.layer_by_layer import score_batches

    ckpts, tasks = len(plan.distinct_checkpoints()), len(plan.tasks)
    per_unit = len(score_batches(list(plan.blocks)))
    return Counter({"record": tasks, "gpu": ckpts, "score": ckpts * tasks * per_unit, "merge": 1})


def state_check(runs: list[dict], plan: Any) -> dict[str, Any]:
    """Task runs by final state against the plan: per kind counts, duplicates by name, not final."""
    kinds = Counter(r["name"].split("[", 1)[0] for r in runs)
    names = Counter(r["name"] for r in runs)
    expected = expected_task_runs(plan)
    return {
        "task runs": len(runs),
        "expected": sum(expected.values()),
        "by state": dict(Counter(r["state"] for r in runs)),
        "by kind": dict(kinds),
        "lost": {k: n - kinds.get(k, 0) for k, n in expected.items() if kinds.get(k, 0) < n},
        "duplicated": sorted(name for name, n in names.items() if n > 1)[:10],
        "not final": sum(1 for r in runs if r["state"] not in FINAL),
    }


def log_errors(*logs: Path) -> dict[str, int]:
    """Count of each LOG_PATTERNS kind over the given log files."""
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    return {
        kind: len(re.findall(pattern, text, flags=re.MULTILINE)) for kind, pattern in LOG_PATTERNS.items()
    }


# ------------------------------------------------------------------------------------- one run


def scale_overrides(checkpoints: int, work: Path) -> dict:
    """Spec overrides: the first `checkpoints` of exp2's revisions, a run root and store under `work`."""
    last = 94000 + 1000 * (checkpoints - 1)
    return {
        "checkpoints": [f"step94000..step{last}/1000"] if checkpoints > 1 else ["step94000"],
        "run_root": str(work / "run"),
        "store": str(work / "store"),
        "hf_cache": str(ROOT / ".cache" / "scale-hub"),
    }


def table_check(run_root: Path, plan: Any) -> dict[str, Any]:
    """Every unit exactly once in the scores table; compute seconds from the tables."""
    import polars as pl

    scores = pl.read_parquet(run_root / "tables" / "scores.parquet")
    costs = pl.read_parquet(run_root / "tables" / "costs.parquet")
    keys = scores.select("revision", "task", "layer")
    return {
        "score rows": scores.height,
        "distinct units": keys.unique().height,
        "units twice": keys.height - keys.unique().height,
        "score seconds": float(scores["seconds"].sum()),
        "gpu seconds": float(costs["seconds"].sum()),
        "expected units": plan.evaluations,
    }


# ------------------------------------------------------------------------------------- SLURM (--cluster slurm)

# Each worker job on the single-node SLURM (.ci/slurm.sh: 2 CPUs, 2 fake GPUs, ~21 GB): one CPU and one
# fake GPU, so two jobs run at once, and two Dask threads with 6 GiB (MEM_GB 4 for scoring: two of the
# scale world's 2-GB units at once). Embedding runs on the CPU (float32), as the CI profile does.
SLURM_JOB = {
    "gpus": 1,
    "device": "cpu",
    "cpus": 1,
    "threads": 2,
    "memory": "6G",
    "score_jobs": 0,
    "bigmem_jobs": 0,
}


@dataclass
class SlurmJobs:
    """The run's SLURM worker jobs: `jobs` GPU-worker jobs (adaptive minimum = maximum), named `name`
    so that this run's jobs can be told apart in squeue and in SLURM's job-completion log."""

    jobs: int
    work: Path  # the jobs' logs go to work/slurm-logs
    timeout: float  # the run's; the jobs' walltime covers it
    name: str = field(default_factory=lambda: f"ltbench-{os.getpid()}-{time.strftime('%H%M%S')}")

    def cluster_overrides(self) -> dict[str, Any]:
        """The flow's `cluster_overrides` for the slurm profile: every field that sizes a job is set here,
        so what runs does not depend on deployments/clusters/slurm.yaml's sizes for a real cluster."""
        walltime = int(self.timeout) + 900
        return {
            **SLURM_JOB,
            "min_jobs": self.jobs,
            "max_jobs": self.jobs,
            "walltime": f"{walltime // 3600:02d}:{walltime % 3600 // 60:02d}:{walltime % 60:02d}",
            "interface": "lo",  # one node: scheduler and workers meet on loopback
            "dashboard_address": None,  # no port 8787 to collide with another run
            "death_timeout": 60,
            "log_directory": str(self.work / "slurm-logs"),
            "job_name": self.name,
        }

    def rss(self) -> int:
        """Bytes resident in every process of this run's jobs now (batch shell, nanny, worker), found by
        the SLURM_JOB_NAME that slurmd puts in their environment: they are slurmd's, not the worker's."""
        import psutil

        total = 0
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("SLURM_JOB_NAME", "").startswith(self.name):
                    total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def finish(self, plan: Any, wait: float = 90) -> dict[str, Any]:
        """After the run: wait for the jobs to leave the queue (the flow cancels them as it closes its
        cluster), cancel any left (a run that timed out), then what SLURM recorded of each job."""
        deadline = time.monotonic() + wait
        while self._queued() and time.monotonic() < deadline:
            time.sleep(2)
        left = self._queued()
        if left:
            subprocess.run(["scancel", "--name", self.name], capture_output=True, timeout=60)
            time.sleep(5)  # slurmctld appends the cancelled jobs to the completion log
        return slurm_facts(self._completed(), left, self.scoring_slots_per_job(plan))

    def _queued(self) -> list[str]:
        """`squeue` lines (id, state) of this run's jobs still pending or running."""
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True, timeout=60)
        return [" ".join(line.split()[:2]) for line in out.stdout.splitlines()
                if line.split()[-1:] and line.split()[-1].startswith(self.name)]  # fmt: skip

    def _completed(self) -> list[dict[str, str]]:
        """This run's entries of SLURM's job-completion log (jobcomp/filetxt: `Key=Value` per job)."""
        path = jobcomp_log()
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        entries = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]
        return [e for e in entries if e.get("Name", "").startswith(self.name)]

    def scoring_slots_per_job(self, plan: Any) -> int:
        """Scoring units one job runs at once: its Dask threads, as many as its MEM_GB holds units of
        the plan's tasks (the flow's own reading of the profile and the cost table)."""
        from flows.clusters import load_slurm_settings
        from layertime import costs

        settings = load_slurm_settings(self.cluster_overrides())
        mem_gb = settings.scoring_workers()["gpu"]
        need = max(costs.scoring_memory_gb(t, plan.hidden_size) for t in plan.tasks)
        return max(0, min(settings.threads or settings.cpus, mem_gb // need))


def jobcomp_log() -> Path:
    """Where SLURM appends finished jobs (`JobCompLoc`, .ci/slurm.sh: $LAYERTIME_SLURM_STATE/jobcomp.log)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    m = re.search(r"^JobCompLoc\s*=\s*(\S+)", out.stdout, re.MULTILINE)
    state = os.environ.get("LAYERTIME_SLURM_STATE", "/var/lib/layertime-slurm")
    return Path(m.group(1) if m else f"{state}/jobcomp.log")


def slurm_facts(completed: list[dict[str, str]], left: list[str], per_job: int) -> dict[str, Any]:
    """The jobs SLURM recorded: how many, their final states, how many ran at once at most, and the
    scoring slots that gives: min(jobs running at once × `per_job`, the node's CPUs)."""
    import datetime as dt

    ran = []
    for job in completed:  # a job cancelled while pending has no node
        if (
            job.get("NodeList", "(null)") not in ("(null)", "None", "")
            and job.get("StartTime", "Unknown") != "Unknown"
        ):
            start, end = (dt.datetime.fromisoformat(job[k]) for k in ("StartTime", "EndTime"))
            ran.append((start, end))
    events = sorted([(s, 1) for s, _ in ran] + [(e, -1) for _, e in ran], key=lambda x: (x[0], x[1]))
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=60)
    cpus = sum(int(c) for c in out.stdout.split() if c.isdigit()) or (os.cpu_count() or 1)
    return {
        "jobs submitted": len(completed) + len(left),
        "job states": dict(Counter(job.get("JobState", "?") for job in completed)),
        "jobs left in the queue": left,  # still pending/running after the run: cancelled by the benchmark
        "jobs ran": len(ran),
        "jobs at once": peak,
        "job ids": sorted(job.get("JobId", "?") for job in completed),
        "node cpus": cpus,
        "scoring slots": min(peak * per_job, cpus),
    }


def run_backend(database: str, checkpoints: int, processes: int, work: Path, port: int, pg_url: str | None,
                timeout: float, slurm: SlurmJobs | None = None) -> dict[str, Any]:  # fmt: skip
    """One whole run on `database` ("sqlite" or "postgres"): fresh home, database and run root; on the
    local profile with `processes` scoring processes, or in `slurm`'s worker jobs."""
    from layertime.plan import make_plan
    from layertime.spec import load_spec

    work.mkdir(parents=True, exist_ok=True)
    overrides = scale_overrides(checkpoints, work)
    plan = make_plan(load_spec(SPEC, **overrides))
    url = fresh_postgres_database(pg_url, f"bench_{database}_{port}") if database == "postgres" else None
    server = start_server(work / "prefect-home", port, url)
    worker = None
    jobs: dict[str, Any] = {}  # SLURM's facts (--cluster slurm)
    try:
        deploy(server)
        worker = start_worker(server, work / "worker.log")
        t0 = time.monotonic()
        if slurm is None:
            flow_run = run_deployment(server, overrides, {"scoring_processes": processes})
        else:
            flow_run = run_deployment(server, overrides, slurm.cluster_overrides(), cluster="slurm")
        seen = watch(server, flow_run, worker, timeout, jobs_rss=slurm.rss if slurm else None)
        wall = time.monotonic() - t0
        runs = task_runs(server, flow_run)
        logs = flow_run_logs(server, flow_run)
        size = database_size(server)
    finally:
        if worker is not None:
            stop(worker)
        stop(server.proc)
        if slurm is not None:
            jobs = slurm.finish(plan)
    tables = table_check(Path(overrides["run_root"]), plan) if seen.state == "COMPLETED" else {}
    compute = tables.get("score seconds", 0.0) + tables.get("gpu seconds", 0.0)
    states = state_check(runs, plan)
    slots = max(1, min(processes or 1, os.cpu_count() or 1))
    if slurm is not None:  # what scored at once: jobs that ran together, within the node's CPUs
        slots = max(1, jobs["scoring slots"])
    # The flow's own running time beyond its units' compute, spread over the slots.
    overhead = seen.running_s - compute / slots
    return {
        "database": database,
        "state": seen.state,
        "message": seen.message[:300],
        "evaluations": plan.evaluations,
        "wall s": wall,
        "queued s": seen.queued_s,
        "flow running s": seen.running_s,
        "compute s": compute,
        "overhead ms per task run": 1000 * overhead / max(1, states["task runs"]),
        "overhead s": overhead,
        "overhead ms per evaluation": 1000 * overhead / plan.evaluations,
        "cores": os.cpu_count(),
        "states": states,
        "tables": tables,
        "server log": log_errors(server.log),
        "flow log": log_errors(work / "worker.log"),
        "run log lines": len(logs),  # what the UI's Logs tab holds for the run
        "finished-in-state lines": sum(1 for m in logs if m["message"].startswith("Finished in state")),
        "ui": {name: _percentiles(v) for name, v in seen.latencies.items()},
        "ui errors": seen.ui_errors[:10],
        "cpu s": seen.cpu.split(),
        "flow peak rss GB": seen.flow_rss / 2**30,
        "tree peak rss GB": seen.tree_rss / 2**30,
        "db MB": size / 2**20,
        **({"cluster": "local"} if slurm is None else slurm_result(jobs, seen)),
    }


def slurm_result(jobs: dict[str, Any], seen: Watch) -> dict[str, Any]:
    """run_backend's SLURM entries: the jobs' facts and their processes' peak memory."""
    return {"cluster": "slurm", "slurm": jobs, "jobs peak rss GB": seen.jobs_rss / 2**30}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(values), "p50": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


# ------------------------------------------------------------------------------------- report


def _uptime() -> str:
    """The 1, 5 and 15-minute load averages, as `uptime` prints them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def markdown(results: list[dict], args: argparse.Namespace, loads: dict[str, str], started: str) -> str:
    from machine import cpu_model  # benchmarks/ is on sys.path

    rows = [
        ("final state", lambda r: r["state"]),
        ("wall time (deployment run → final state)", lambda r: f"{r['wall s']:.0f} s"),
        ("flow run: queued / running (API)", lambda r: f"{r['queued s']:.0f} s / {r['flow running s']:.0f} s"),
        ("compute (units' measured seconds)", lambda r: f"{r['compute s']:.0f} s"),
        ("orchestration overhead per task run", lambda r: f"{r['overhead ms per task run']:.0f} ms"),
        ("non-compute time: in all / per evaluation", lambda r: f"{r['overhead s']:.0f} s / "
                                                               f"{r['overhead ms per evaluation']:.0f} ms"),
        ("core-seconds while the flow ran: scoring / flow / server / database / worker / idle",
         lambda r: _cpu(r)),
        ("task runs (expected)", lambda r: f"{r['states']['task runs']} ({r['states']['expected']})"),
        ("by final state", lambda r: ", ".join(f"{k} {v}" for k, v in r["states"]["by state"].items())),
        ("lost / duplicated / not final", lambda r: f"{sum(r['states']['lost'].values())} / "
                                                    f"{len(r['states']['duplicated'])} / {r['states']['not final']}"),
        ("units in the tables (twice)", lambda r: f"{r['tables'].get('distinct units', '-')} "
                                                  f"({r['tables'].get('units twice', '-')})"),
        ("server log: locked / 5xx / retries / tracebacks", lambda r: " / ".join(map(str, r["server log"].values()))),
        ("flow log: locked / 5xx / retries / tracebacks", lambda r: " / ".join(map(str, r["flow log"].values()))),
        ("the run's log in the UI: lines (\"Finished in state\" lines)",
         lambda r: f"{r['run log lines']} ({r['finished-in-state lines']})"),
        ("flow process peak RSS (whole tree)", lambda r: f"{r['flow peak rss GB']:.2f} GB ({r['tree peak rss GB']:.2f} GB)"),
        *[(f"UI {name}: p50 / p95 (n)", lambda r, name=name: _latency(r["ui"][name])) for name in UI_QUERIES],
        ("Prefect database after", lambda r: f"{r['db MB']:.0f} MB"),
    ]  # fmt: skip
    if args.cluster == "slurm":
        rows += slurm_rows()
    heading, command, words = _cluster_text(args)
    head = "| | " + " | ".join(r["database"] for r in results) + " |"
    lines = [
        f"## Orchestration at scale{heading} — {started} — {cpu_model()}, {os.cpu_count()} cores",
        "",
        f"`{command}`: "
        f"the scale world ({results[0]['evaluations']} evaluations = {args.checkpoints} checkpoints × 4 layers × "
        f"32 tasks) through `prefect server start` + process work pool + `prefect deployment run`, "
        f"{words}, one backend after the other.",
        f"Machine load (1/5/15-min load averages): {loads}. Shared with other work: timings are upper bounds.",
        "",
        head,
        "|---|" + "---|" * len(results),
        *[f"| {label} | " + " | ".join(fn(r) for r in results) + " |" for label, fn in rows],
        "",
    ]
    return "\n".join(lines)


def _cluster_text(args: argparse.Namespace) -> tuple[str, str, str]:
    """The section's heading suffix, command line and description of where the flow ran."""
    line = f"python benchmarks/orchestration.py --checkpoints {args.checkpoints}"
    if args.cluster == "slurm":
        job = SLURM_JOB
        return (f", single-node SLURM, {args.jobs} worker jobs", f"{line} --cluster slurm --jobs {args.jobs}",
                f"slurm profile on the single-node SLURM (`.ci/slurm.sh`) with {args.jobs} worker jobs "
                f"({job['cpus']} CPU, {job['threads']} Dask threads, {job['memory']}, 1 fake GPU each; embedding "
                f"on the CPU; the Dask scheduler in the flow process)")  # fmt: skip
    # The local profile, as every section before the SLURM variant: no heading suffix.
    return (
        "",
        f"{line} --processes {args.processes}",
        f"local profile with {args.processes} scoring processes",
    )


def slurm_rows() -> list[tuple[str, Callable[[dict], str]]]:
    """The markdown rows of the SLURM variant: its jobs, how many ran at once, their memory."""
    return [
        ("SLURM jobs submitted (final states)", lambda r: f"{r['slurm']['jobs submitted']} (" + ", ".join(
            f"{k} {v}" for k, v in r["slurm"]["job states"].items()) + ")"),
        ("SLURM jobs running at once (peak) → scoring slots", lambda r: f"{r['slurm']['jobs at once']} → "
                                                                          f"{r['slurm']['scoring slots']}"),
        ("worker jobs' peak RSS (their processes, summed)", lambda r: f"{r['jobs peak rss GB']:.2f} GB"),
    ]  # fmt: skip


def _cpu(r: dict) -> str:
    cpu = r.get("cpu s") or {}
    parts = ("scoring processes", "flow process", "server", "database", "worker", "idle")
    total = r.get("cores", 1) * r["flow running s"]
    return " / ".join(f"{cpu.get(k, 0.0):.0f}" for k in parts) + f" (of {total:.0f})"


def _latency(q: dict) -> str:
    if not q.get("n"):
        return "not sampled"
    return f"{1000 * q['p50']:.0f} / {1000 * q['p95']:.0f} ms ({q['n']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=50, help="of exp2's 50 (50: 6,400 evaluations)")
    parser.add_argument("--processes", type=int, default=2, help="scoring processes of the local profile")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local",
                        help="the flow's cluster profile; slurm: the single-node SLURM of .ci/slurm.sh")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="SLURM worker jobs (--cluster slurm; 2 run at once "
                                                            "on the 2-CPU, 2-GPU node, more wait in the queue)")  # fmt: skip
    parser.add_argument("--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--port", type=int, default=4350, help="first server port (one per backend)")
    parser.add_argument("--timeout", type=float, default=7200, help="per backend, seconds")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    pg_url = os.environ.get("LAYERTIME_PG_URL")
    if "postgres" in args.databases and not pg_url:
        out = subprocess.run(
            ["bash", str(ROOT / ".ci" / "postgres.sh"), "url"], capture_output=True, text=True
        )
        pg_url = out.stdout.strip()
    from layertime.demo.scale_model import ensure_scale_model

    ensure_scale_model(ROOT / ".cache" / "scale-hub")  # built once, outside the timed runs
    work = args.work or Path(tempfile.mkdtemp(prefix="layertime-orchestration-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    loads = {"before": _uptime()}
    results = []
    for i, database in enumerate(args.databases.split(",")):
        shutil.rmtree(work / database, ignore_errors=True)
        slurm = SlurmJobs(args.jobs, work / database, args.timeout) if args.cluster == "slurm" else None
        result = run_backend(database, args.checkpoints, args.processes, work / database, args.port + i, pg_url,
                             args.timeout, slurm)  # fmt: skip
        loads[f"after {database}"] = _uptime()
        print(json.dumps(result, indent=1), flush=True)
        results.append(result)
    text = markdown(results, args, loads, started)
    print(text)
    if not args.no_write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
