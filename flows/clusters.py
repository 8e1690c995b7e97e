"""Cluster profiles: where the tasks run. A profile becomes the flow's Dask task runner.

- `local` (default): one Dask worker in the flow's process, threads only — a process LocalCluster
  under the embedded Prefect API starts one temporary API server per worker process (docs/design.md §6).
  The worker advertises one `GPU` slot (the GPU when CUDA is present, the CPU otherwise); a
  checkpoint's GPU task takes 1/MODELS_PER_GPU of it, so one computes while the next loads, and
  scoring uses the other threads.
- `slurm`: Dask workers in SLURM batch jobs (dask-jobqueue's SLURMCluster, adaptive), one worker
  process per job advertising one `GPU` slot (two checkpoints' GPU tasks: one computes while the
  next loads); scoring runs on scoring jobs, or on the GPU job's other threads. Settings come from
  `deployments/clusters/slurm.yaml`, then environment variables `LAYERTIME_SLURM_<FIELD>`, then
  per-run overrides (`SlurmSettings` documents each field).
  The scheduler lives in the flow's process; workers must reach it and the Prefect API.

Failures of the SLURM path are surfaced, not waited on (docs/design.md §6: a failing `sbatch` under adapt
hangs a flow): the job script is checked with `sbatch --test-only` before the cluster starts, and a
submission that SLURM rejects later fails the pending tasks with SLURM's own message when no worker
is left to run them. A worker job that dies (walltime, preemption, `scancel`) is replaced, and the
tasks it was running are rescheduled by Dask. Task logs are flushed from the workers before the
cluster closes, so the last task runs' logs reach the Prefect API too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layertime.costs import MODELS_PER_GPU

CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout that holds flows/ and tasks/

# The resource annotation of GPU tasks: a share of a worker's one slot (`GPU_SLOT`), so each GPU
# worker runs MODELS_PER_GPU (2) checkpoints' tasks at once, one reading its model while another
# computes (layertime.phases.gpu.checkpoint_gpu_work); the cost simulation assumes the same.
GPU_SLOT = 1
GPU = {"GPU": GPU_SLOT / MODELS_PER_GPU}
CLUSTERS = Path(__file__).resolve().parents[1] / "deployments" / "clusters"
ENV_PREFIX = "LAYERTIME_SLURM_"  # LAYERTIME_SLURM_PARTITION=gpu, ..., LAYERTIME_SLURM_CONFIG=path.yaml
PROFILES = ("local", "slurm")

log = logging.getLogger("layertime.slurm")


class ClusterError(ValueError):
    """A profile that cannot run: the message names the field, the value and where it came from."""


class SlurmRejected(RuntimeError):
    """SLURM refused a worker job; the message is SLURM's own."""


_MEMORY = re.compile(r"^\s*(\d+)\s*([KMGT])(?:i?B)?\s*$", re.IGNORECASE)
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


class SlurmSettings(BaseModel):
    """The `slurm` profile: what each worker job asks SLURM for and how its worker starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = Field(None, description="`#SBATCH -p`; null: the cluster's default partition")
    account: str | None = Field(None, description="`#SBATCH -A`; null: the user's default account")
    gpus: int = Field(1, ge=0, le=1, description="GPUs per job (`--gres=gpu:N`); 0: CPU-only jobs")
    gpu_type: str | None = Field(None, description="GPU type in the gres (`--gres=gpu:a100:1`)")
    cpus: int = Field(8, ge=1, description="CPUs per job (`--cpus-per-task`)")
    threads: int | None = Field(None, ge=1, description="Dask worker threads per job; null: `cpus`")
    memory: str = Field("64G", description="memory per job, SLURM units (`--mem=64G`, binary units)")
    walltime: str = Field("24:00:00", description="time limit per job (`-t`), [D-]HH:MM:SS")
    job_script_prologue: list[str] = Field(
        default_factory=list, description="shell lines run before the worker (module load, activation)"
    )
    env: dict[str, str] = Field(default_factory=dict, description="variables exported in every job")
    forward_env: list[str] = Field(
        default_factory=list,
        description="variables copied from the submitting process when set there (HF_HUB_CACHE, ...)",
    )
    log_directory: str = Field("runs/slurm-logs", description="where jobs write `<job_name>-<id>.out/.err`")
    interface: str | None = Field(None, description="network interface workers and scheduler use (ib0)")
    min_jobs: int = Field(1, ge=0, description="adaptive: jobs kept while the flow runs")
    max_jobs: int = Field(8, ge=1, description="adaptive: most jobs at once")
    python: str | None = Field(None, description="the workers' python; null: the flow's interpreter")
    device: Literal["cuda", "cpu"] = Field("cuda", description="where embedding runs (decides dtype auto)")
    job_name: str = Field("layertime", description="`#SBATCH -J`")
    job_extra_directives: list[str] = Field(
        default_factory=list, description="more `#SBATCH` options (`--qos=long`, `--constraint=a100`)"
    )
    local_directory: str | None = Field(None, description="worker scratch space on the node ($TMPDIR)")
    death_timeout: int = Field(120, ge=1, description="seconds a worker waits for a lost scheduler")
    dashboard_address: str | None = Field(
        None, description="the Dask dashboard (':8787' listens on 127.0.0.1); null: none"
    )
    preflight: bool = Field(True, description="check the job script with `sbatch --test-only` first")
    score_jobs: int = Field(
        0, ge=0, description="CPU-only scoring jobs (no GPU); 0: scoring runs on the GPU jobs' threads"
    )
    score_cpus: int = Field(8, ge=1, description="CPUs per scoring job: one one-thread worker process each")
    score_memory: str = Field("32G", description="memory per scoring job, shared evenly by its processes")
    score_partition: str | None = Field(None, description="partition of the scoring jobs; null: `partition`")
    bigmem_jobs: int = Field(
        0, ge=0, description="big-memory scoring jobs, one process each, for tasks (MindSmallReranking) "
        "that no scoring process has the memory for"
    )  # fmt: skip
    bigmem_memory: str = Field("64G", description="memory per big-memory scoring job")
    task_memory_gb: dict[str, int] = Field(
        default_factory=dict, description="scoring memory (GB) of a task, replacing the cost table's figure"
    )

    @field_validator("walltime", mode="before")
    @classmethod
    def _walltime(cls, value: Any) -> Any:
        if isinstance(value, int):  # YAML reads an unquoted 24:00:00 as sexagesimal seconds
            return f"{value // 3600:02d}:{value % 3600 // 60:02d}:{value % 60:02d}"
        if isinstance(value, str) and not _WALLTIME.match(value.strip()):
            raise ValueError(f"{value!r} is not a SLURM time limit ([D-]HH:MM:SS)")
        return value

    @field_validator("memory", "score_memory", "bigmem_memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if isinstance(value, str) and not _MEMORY.match(value):
            raise ValueError(f"{value!r} is not a memory size like 64G, 500M")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SlurmSettings:
        if self.device == "cuda" and self.gpus == 0:
            raise ValueError("device 'cuda' needs gpus: 1 (or set device: cpu for CPU-only jobs)")
        if self.min_jobs > self.max_jobs:
            raise ValueError(f"min_jobs {self.min_jobs} > max_jobs {self.max_jobs}")
        return self

    @property
    def slurm_memory(self) -> str:
        """`--mem` value, e.g. '64G' (SLURM's K/M/G/T are binary units)."""
        return _slurm_memory(self.memory)

    def scoring_workers(self) -> dict[str, int]:
        """MEM_GB each kind of worker process offers scoring (Dask resource; whole GiB).

        - `score` jobs: the job's memory split evenly over its one-thread processes;
        - `bigmem` jobs: one process with the job's memory;
        - `gpu` jobs score only when there are no scoring jobs: 3/4 of the job's memory (the rest
          holds the model and the forward pass's host buffers).
        """
        workers = {"score": _gib(self.score_memory) // self.score_cpus} if self.score_jobs else {}
        if not self.score_jobs:
            workers["gpu"] = _gib(self.memory) * 3 // 4
        if self.bigmem_jobs:
            workers["bigmem"] = _gib(self.bigmem_memory)
        return workers

    @property
    def walltime_seconds(self) -> int:
        """SLURM's reading: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
        days, *rest = _WALLTIME.match(self.walltime.strip()).groups()
        parts = [int(p) for p in rest if p is not None]
        if days is None:
            units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
        else:
            units = (3600, 60, 1)[: len(parts)]
        return int(days or 0) * 86400 + sum(p * u for p, u in zip(parts, units, strict=True))


def _slurm_memory(value: str) -> str:
    n, unit = _MEMORY.match(value).groups()
    return f"{n}{unit.upper()}"


def _gib(value: str) -> int:
    """Whole GiB in a SLURM memory size ('64G' -> 64, '500M' -> 0, '1T' -> 1024)."""
    n, unit = _MEMORY.match(value).groups()
    return int(n) * {"K": 1, "M": 2**10, "G": 2**20, "T": 2**30}[unit.upper()] // 2**20


class LocalSettings(BaseModel):
    """The `local` profile: this machine, one GPU slot, a pool of one-thread scoring processes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scoring_processes: int | None = Field(
        None, ge=0, description="one-thread scoring processes; null: one per core; 0: score in threads"
    )
    memory_gb: int | None = Field(None, ge=1, description="memory scoring may use (GB); null: 3/4 of RAM")
    task_memory_gb: dict[str, int] = Field(
        default_factory=dict, description="scoring memory (GB) of a task, replacing the cost table's figure"
    )
    dashboard_address: str | None = Field(
        None, description="the Dask dashboard (':8787' listens on 127.0.0.1); null: none"
    )

    def scoring_workers(self) -> dict[str, int]:
        """MEM_GB the machine offers scoring: all of it is one pool, shared by the running units."""
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
        return {"local": self.memory_gb or ram * 3 // 4}


def load_slurm_settings(overrides: dict | None = None, path: str | Path | None = None) -> SlurmSettings:
    """The `slurm` profile: the YAML file, then LAYERTIME_SLURM_<FIELD> variables, then `overrides`."""
    path = Path(path or os.environ.get(f"{ENV_PREFIX}CONFIG") or CLUSTERS / "slurm.yaml")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ClusterError(f"cluster profile slurm: cannot read {path}: {e}") from e
    if not isinstance(values, dict):
        raise ClusterError(f"cluster profile slurm: {path} is not a mapping of fields")
    values.pop("kind", None)
    source = {k: str(path) for k in values}
    fields = SlurmSettings.model_fields
    for name, info in fields.items():
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        values[name], source[name] = _from_env(raw, info.annotation), ENV_PREFIX + name.upper()
    for name, value in (overrides or {}).items():
        values[name], source[name] = value, "cluster overrides"
    try:
        return SlurmSettings(**values)
    except ValidationError as e:
        problems = [_problem(err, source) for err in e.errors()]
        raise ClusterError("cluster profile slurm: " + "; ".join(problems)) from None


def _problem(err: Any, source: dict[str, str]) -> str:
    """'field (where it came from, value ...): what is wrong'; a whole-profile error has no field."""
    if not err["loc"]:
        return err["msg"].removeprefix("Value error, ")
    name = str(err["loc"][0])
    where = source.get(name, "default")
    return f"{'.'.join(map(str, err['loc']))} ({where}, value {err['input']!r}): {err['msg']}"


def _from_env(raw: str, annotation: Any) -> Any:
    """An environment variable's value for a field: lists and mappings as JSON/YAML, '' as null."""
    text = str(annotation)
    if text.startswith(("list", "dict")):
        return yaml.safe_load(raw)
    if raw.strip().lower() in ("", "null", "none") and "None" in text:
        return None
    return raw


@dataclass(frozen=True)
class Profile:
    name: str
    device: str  # where embedding runs: decides what dtype 'auto' means
    settings: SlurmSettings | LocalSettings

    @property
    def slurm(self) -> SlurmSettings | None:
        return self.settings if isinstance(self.settings, SlurmSettings) else None

    @property
    def scoring_processes(self) -> int:
        """Size of the flow process's pool of one-thread scoring processes (local profile only)."""
        if not isinstance(self.settings, LocalSettings):
            return 0  # SLURM jobs' workers are already one-thread processes (or GPU job threads)
        found = self.settings.scoring_processes
        return (os.cpu_count() or 1) if found is None else found

    def _scoring_threads(self) -> int:
        """Dask threads for score tasks on the local profile. Two per scoring process: while one
        waits for its process's result, the other's task run does Prefect's bookkeeping (states,
        logs) and is next in line, so a process does not idle between units (a 512-unit scale run on
        2 cores: 28 idle core-seconds of 255 with one thread each, 11 of 297 with two;
        benchmarks/RESULTS.md, 20:32)."""
        processes = self.scoring_processes
        return 2 * processes if processes else max(2, os.cpu_count() or 2)

    @property
    def gpu_slots(self) -> int:
        """GPU slots the profile can have at once: the local worker's one, or one per SLURM GPU job at
        the adaptive maximum (`max_jobs`). The flow keeps MODELS_PER_GPU checkpoints per slot
        submitted, so no `gpu` task queues on a worker ahead of scoring."""
        return self.slurm.max_jobs if self.slurm else 1

    def memory_need(self, task: str, dim: int) -> int:
        """MEM_GB one scoring process of `task` takes: the profile's figure, else the cost table's."""
        from layertime import costs

        return self.settings.task_memory_gb.get(task) or costs.scoring_memory_gb(task, dim)

    def check_fits(self, tasks: list[str], dim: int) -> dict[str, int]:
        """Each task's MEM_GB, after checking some worker can hold it (else it would wait forever,
        or be killed): a ClusterError names the tasks, what they need and what to change."""
        needs = {t: self.memory_need(t, dim) for t in tasks}
        workers = self.settings.scoring_workers()
        largest = max(workers.values())
        too_big = {t: n for t, n in needs.items() if n > largest}
        if too_big:
            fix = (
                "set bigmem_jobs: 1 with bigmem_memory above that, or raise score_memory"
                if self.slurm else "run it on the slurm profile with a big-memory job, or set memory_gb"
            )  # fmt: skip
            listed = ", ".join(f"{t} needs {n} GB" for t, n in too_big.items())
            raise ClusterError(
                f"cluster profile {self.name}: no scoring worker has the memory: {listed}; the largest "
                f"offers {largest} GB ({', '.join(f'{k}: {v} GB' for k, v in workers.items())}); {fix}"
            )
        return needs

    def task_runner(self) -> DaskTaskRunner:
        quiet_dashboard_link(self.settings.dashboard_address is None)
        if isinstance(self.settings, LocalSettings):
            resources = {"GPU": GPU_SLOT, "MEM_GB": self.settings.scoring_workers()["local"]}
            return DaskTaskRunner(
                cluster_class="distributed.LocalCluster",
                cluster_kwargs={
                    "n_workers": 1,
                    "processes": False,
                    "threads_per_worker": self._scoring_threads() + MODELS_PER_GPU,  # + GPU tasks
                    "resources": resources,
                    "scheduler_kwargs": dashboard(self.settings.dashboard_address),
                    "worker_dashboard_address": LOOPBACK_ANY_PORT,
                },
            )
        settings = self.settings
        kwargs = cluster_kwargs(settings, _api_url(required=True))
        scoring = bool(settings.score_jobs or settings.bigmem_jobs)
        return DaskTaskRunner(
            cluster_class=LayertimeSLURMCluster,
            cluster_kwargs=kwargs,
            adapt_kwargs={
                "minimum_jobs": settings.min_jobs,
                "maximum_jobs": settings.max_jobs,
                **({"Adaptive": GpuAdaptive} if scoring else {}),
            },
        )


LOOPBACK_ANY_PORT = "127.0.0.1:0"


def dashboard(address: str | None) -> dict[str, Any]:
    """The Dask scheduler's arguments for the profile's `dashboard_address` (docs/design.md §6).

    A distributed Scheduler (and Worker) starts an HTTP server whatever `dashboard` says: routes for
    JSON state, logs, Prometheus metrics and health. Without an address it listens on port 8787 of
    every interface (IPv4 and IPv6; a worker on a random port), as `LocalCluster(dashboard_address=None)`
    and dask-jobqueue's default ':8787' both did. So: no dashboard and that server on loopback, or the
    dashboard where asked, on 127.0.0.1 when the address names a port alone (':8787', '8787')."""
    if address is None:
        return {"dashboard": False, "dashboard_address": LOOPBACK_ANY_PORT}
    host, _, port = address.strip().rpartition(":")
    return {"dashboard": True, "dashboard_address": f"{host or '127.0.0.1'}:{port}"}


def quiet_dashboard_link(quiet: bool) -> None:
    """prefect-dask logs "The Dask dashboard is available at <link>" whenever the scheduler has an HTTP
    server, dashboard or not: dropped (in this process) unless the profile asks for a dashboard."""
    logger = logging.getLogger("prefect.task_runner.dask")
    for f in [f for f in logger.filters if isinstance(f, _NoDashboardLink)]:
        logger.removeFilter(f)
    if quiet:
        logger.addFilter(_NoDashboardLink())


class _NoDashboardLink(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("The Dask dashboard is available at")


def profile(name: str, overrides: dict | None = None) -> Profile:
    """The named cluster profile; an unknown name is an error that lists the known ones.

    `overrides` replaces profile fields for this run (the `slurm` profile's, e.g. {"partition": "a100"};
    the `local` profile's, e.g. {"scoring_processes": 4}).
    """
    if name == "local":
        import torch

        try:
            settings = LocalSettings(**(overrides or {}))
        except ValidationError as e:
            problems = [_problem(err, {}) for err in e.errors()]
            raise ClusterError("cluster profile local: " + "; ".join(problems)) from None
        return Profile("local", "cuda" if torch.cuda.is_available() else "cpu", settings)
    if name == "slurm":
        settings = load_slurm_settings(overrides)
        return Profile("slurm", settings.device, settings)
    raise ValueError(f"cluster: unknown profile {name!r} (known: {', '.join(PROFILES)})")


def job_script(spec: str | Path | None = None, overrides: dict | None = None) -> str:
    """The batch scripts the `slurm` profile submits (what `sbatch` receives): the GPU worker job,
    then the scoring jobs' when the profile has them.

    `spec`, when given, is validated first (a bad spec fails here, not on the cluster). The scripts
    name a placeholder scheduler address: the real one exists once the flow runs.
    """
    if spec is not None:
        from layertime.spec import load_spec

        load_spec(spec)
    settings = load_slurm_settings(overrides)
    api_url = _api_url(required=False)
    scripts = [f"# {kind} jobs: {count}\n" + _script(job_kwargs(settings, api_url, kind))
               for kind, count in job_counts(settings).items() if count]  # fmt: skip
    return "\n".join(scripts)


def _script(kwargs: dict[str, Any]) -> str:
    logs = Path(kwargs["log_directory"])
    created = [p for p in (logs, *logs.parents) if not p.exists()]
    job = SLURMJob(scheduler="tcp://<scheduler-address>:8786", name="<worker-name>", **kwargs)
    for path in created:  # SLURMJob makes the log directory: a preview leaves no trace
        path.rmdir()
    return job.job_script()


def job_counts(settings: SlurmSettings) -> dict[str, int]:
    """Jobs of each kind at most: GPU jobs (adaptive up to max_jobs), scoring and big-memory jobs."""
    return {"gpu": settings.max_jobs, "score": settings.score_jobs, "bigmem": settings.bigmem_jobs}


def cluster_kwargs(settings: SlurmSettings, api_url: str | None) -> dict[str, Any]:
    """LayertimeSLURMCluster keyword arguments: the GPU jobs' (adaptive), then the scoring jobs'."""
    return {
        **job_kwargs(settings, api_url, "gpu"),
        # The scheduler's own port listens on every interface: the workers on other nodes connect to it.
        "scheduler_options": dashboard(settings.dashboard_address),
        "preflight": settings.preflight,
        "scoring_jobs": [(kind, count, job_kwargs(settings, api_url, kind))
                         for kind, count in job_counts(settings).items() if kind != "gpu" and count],
    }  # fmt: skip


def job_kwargs(settings: SlurmSettings, api_url: str | None, kind: str) -> dict[str, Any]:
    """dask-jobqueue job arguments of one kind of worker job (docs/design.md §6, §10).

    - `gpu`: one worker process, `cpus` threads, one GPU slot (embedding, metrics); it also offers
      MEM_GB to scoring when the profile has no scoring jobs;
    - `score`: `score_cpus` one-thread worker processes, each offering its share of `score_memory`;
    - `bigmem`: one one-thread process offering all of `bigmem_memory`.
    Scoring jobs ask for no GPU and hide any from their processes.
    """
    exports = dict(settings.env)
    exports.update({k: os.environ[k] for k in settings.forward_env if k in os.environ and k not in exports})
    if api_url:
        exports["PREFECT_API_URL"] = api_url  # tasks on the workers log to the flow's API
    # tasks/ is a folder of the checkout, not an installed package (layertime_command.py): the workers
    # import the tasks they run from it, wherever SLURM starts the job. A deployment run (`prefect
    # deployment run`) loads flows/layer_by_layer.py as the top-level module `layer_by_layer`, with
    # flows/ on sys.path (Prefect's load_script_as_module), and each task's context names the flow by
    # that module: the workers need flows/ too, last so that nothing in it shadows another module.
    inherited = (exports.get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")).split(os.pathsep)
    path = [str(CHECKOUT), *inherited, str(CHECKOUT / "flows")]
    exports["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
    if kind == "gpu":
        cpus, processes, memory = settings.cpus, 1, settings.memory
        threads = settings.threads or settings.cpus
        gres = ":".join(["gpu", *([settings.gpu_type] if settings.gpu_type else []), str(settings.gpus)])
        directives = [f"--gres={gres}"] if settings.gpus else []
        resources = [f"GPU={GPU_SLOT}"]  # one embedding slot per job (docs/design.md §6), CPU or GPU
    else:
        cpus = threads = processes = settings.score_cpus if kind == "score" else 1
        memory = settings.score_memory if kind == "score" else settings.bigmem_memory
        directives, resources = [], []
        exports["CUDA_VISIBLE_DEVICES"] = ""
    mem_gb = settings.scoring_workers().get(kind)
    if mem_gb is not None:
        resources.append(f"MEM_GB={mem_gb}")
    prologue = [f"export {k}={_quote(v)}" for k, v in exports.items()] + list(settings.job_script_prologue)
    lifetime = settings.walltime_seconds - min(600, settings.walltime_seconds // 10)
    worker_args = ["--resources", ",".join(resources)] if resources else []
    # A worker's HTTP server (metrics, health; its dashboard) on its node's loopback only: its own
    # port, which the scheduler and the other workers connect to, is all it offers the network.
    worker_args += ["--no-dashboard", "--dashboard-address", LOOPBACK_ANY_PORT]
    if lifetime > 60:  # retire before SLURM kills the job at its walltime: the scheduler replaces it
        worker_args += ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{min(300, lifetime // 20)}s"]
    return {
        "queue": settings.partition if kind == "gpu" else settings.score_partition or settings.partition,
        "account": settings.account,
        "cores": threads,
        "job_cpu": cpus,
        "processes": processes,
        "memory": f"{_slurm_memory(memory)}iB",  # Dask's name for the same amount (64GiB)
        "job_mem": _slurm_memory(memory),
        "walltime": settings.walltime,
        "job_name": settings.job_name if kind == "gpu" else f"{settings.job_name}-{kind}",
        "log_directory": str(Path(settings.log_directory).absolute()),
        "interface": settings.interface,
        "python": settings.python or sys.executable,
        "job_script_prologue": prologue,
        "job_extra_directives": directives + list(settings.job_extra_directives),
        "worker_extra_args": worker_args,
        "local_directory": settings.local_directory,
        "death_timeout": settings.death_timeout,
    }  # fmt: skip


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(str(value))


def _api_url(required: bool) -> str | None:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url and required:
        raise ClusterError(
            "cluster profile slurm: workers in SLURM jobs need a Prefect API they can reach; start "
            "`prefect server start --host 0.0.0.0` and set PREFECT_API_URL=http://<login-node>:4200/api"
        )
    return url


class _RejectAwareJob(SLURMJob):
    """A SLURM worker job that tells its cluster whether `sbatch` took it, instead of vanishing."""

    def __init__(self, *args: Any, on_sbatch: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._on_sbatch = on_sbatch  # (job name, SLURM's error or None), in the cluster's loop

    async def start(self) -> None:
        try:
            await super().start()
        except RuntimeError as e:
            self.status = Status.failed  # never started: nothing to close
            if self._on_sbatch is not None:
                self._on_sbatch(self.name, _slurm_message(str(e)))
            raise
        if self._on_sbatch is not None:
            self._on_sbatch(self.name, None)


def _slurm_message(error: str) -> str:
    """SLURM's words from dask-jobqueue's 'Command exited with non-zero exit code ... stderr: ...'."""
    stderr = error.rpartition("stderr:")[2].strip()
    return stderr or error.strip()


class LayertimeSLURMCluster(SLURMCluster):
    """SLURMCluster that fails fast on rejected jobs, replaces dead ones and flushes task logs on close.

    - before starting: `sbatch --test-only` of the exact job script (a bad partition or account, or
      a request over the partition's limits, fails here with SLURM's message);
    - while running: when SLURM refuses a job and no other job is queued or running, every pending
      task is cancelled with SLURM's message (the flow fails at once instead of waiting forever);
      when other jobs were taken (a per-user job limit), the adaptive maximum drops to them;
    - a worker job that dies (walltime, preemption, scancel) is resubmitted once SpecCluster gives
      up on it (`distributed.deploy.lost-worker-timeout`); Dask reruns the tasks it held;
    - a job that ends before its worker connects (a wrong `python`, a failing prologue) is retried
      once; the second in a row fails the pending tasks with the end of the job's `.err` log;
    - on close, every worker flushes its queued Prefect logs before its job is cancelled.
    """

    job_cls = _RejectAwareJob

    def __init__(
        self, *, preflight: bool = True, scoring_jobs: list[tuple[str, int, dict]] = (), **kwargs: Any
    ):
        self._rejection: str | None = None  # SLURM's message for the last refused job
        self._broken: str | None = None  # why worker jobs end before their worker connects
        self._failed_starts = 0
        self._connected: set[str] = set()  # names of the jobs whose worker connected once
        self._watch_task: asyncio.Task | None = None
        self._scoring_kinds = list(scoring_jobs)  # (kind, count, job kwargs): fixed, not adaptive
        self._scoring: dict[str, _RejectAwareJob] = {}  # name -> a scoring job SLURM took
        self._scoring_serial = 0
        self._scoring_failed_starts = 0  # scoring jobs in a row that ended before their workers connected
        self._scoring_broken: str | None = None  # why no scoring job can run: the run fails with it
        super().__init__(on_sbatch=self._sbatch, **kwargs)
        if preflight:
            try:
                self.preflight()
            except BaseException:
                self.close()
                raise

    def preflight(self) -> None:
        """`sbatch --test-only` of each job script (GPU, scoring); SlurmRejected with SLURM's message."""
        self._test_only(self.job_script(), self._summary())
        for kind, _, kwargs in self._scoring_kinds:
            job = self.job_cls(scheduler="tcp://127.0.0.1:1", name=f"{kind}-preflight", **kwargs)
            self._test_only(job.job_script(), f"{kind} job")

    def _test_only(self, script: str, summary: str) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="layertime-preflight-") as f:
            f.write(script)
            f.flush()
            try:
                out = subprocess.run(
                    ["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SlurmRejected(f"cannot run sbatch: {e}") from e
        if out.returncode != 0:
            raise SlurmRejected(
                f"SLURM rejects the worker job ({summary}): {(out.stderr or out.stdout).strip()}"
            )
        log.info("sbatch --test-only: %s", (out.stderr or out.stdout).strip())

    def _summary(self) -> str:
        header = [line.removeprefix("#SBATCH ") for line in self.job_header.splitlines()]
        return " ".join(h for h in header if not h.startswith(("-J", "-e", "-o")))

    def _sbatch(self, name: str, rejected: str | None) -> None:
        """SLURM took worker job `name` (rejected None) or refused it with that message."""
        if name in self._scoring:  # no GPU job can score in its place: the run cannot go on
            if rejected is not None:
                log.error("SLURM rejected scoring job %s: %s", name, rejected)
                self._scoring_broken = f"SLURM rejected the scoring job {name}: {rejected}"
                self._scoring.pop(name, None)
            return
        if rejected is None:
            self._rejection = None
            return
        self._rejection = rejected
        queued = len(self._accepted())
        log.error(
            "SLURM rejected worker job %s (%d other jobs queued or running): %s", name, queued, rejected
        )
        adaptive = getattr(self, "_adaptive", None)
        if queued and adaptive is not None:  # e.g. a per-user job limit: go on with the jobs it took
            adaptive.maximum = max(adaptive.minimum, queued)
        asyncio.get_running_loop().call_soon(self._forget, name)

    def _accepted(self) -> list:
        """Worker jobs that SLURM took and that have not ended."""
        return [j for j in self.workers.values() if getattr(j, "job_id", None) and j.status == Status.running]

    def _forget(self, name: str, tries: int = 50) -> None:
        """Drop a refused job from the plan, once SpecCluster has recorded it (right after its start)."""
        if name not in self.workers and tries:
            asyncio.get_running_loop().call_later(0.1, self._forget, name, tries - 1)
            return
        self.worker_spec.pop(name, None)
        self.workers.pop(name, None)

    async def _start(self) -> None:
        await super()._start()
        for kind, count, _ in self._scoring_kinds:
            for _ in range(count):
                await self._start_scoring_job(kind)
        self._watch_task = asyncio.ensure_future(self._watch())

    async def _start_scoring_job(self, kind: str) -> None:
        """Submit one scoring job of `kind`; its workers join this cluster's scheduler."""
        kwargs = next(k for name, _, k in self._scoring_kinds if name == kind)
        self._scoring_serial += 1
        name = f"{kind}-{self._scoring_serial}"
        job = self.job_cls(scheduler=self.scheduler.address, name=name, on_sbatch=self._sbatch, **kwargs)
        job.kind = kind
        self._scoring[name] = job
        try:
            await job
        except RuntimeError:
            pass  # refused: _sbatch recorded SLURM's message, and the pending tasks fail with it

    async def _check_scoring_jobs(self) -> None:
        """Scoring jobs that ended (walltime, preemption, scancel) are replaced; two in a row that end
        before their workers connect fail the run with the end of the job's log."""
        waiting = {str(j.job_id): j for j in self._scoring.values() if getattr(j, "job_id", None)}
        if not waiting:
            return
        gone = await self._not_queued(waiting)
        connected = _scoring_jobs_of(self._names())
        if connected:
            self._scoring_failed_starts = 0
        for job_id in gone:
            job = self._scoring.pop(waiting[job_id].name)
            if job.name in connected | self._connected:
                log.info("scoring job %s (%s) ended; submitting another", job_id, job.name)
            else:
                self._scoring_failed_starts += 1
                path = Path(job.log_directory or ".") / f"{job.job_name}-{job_id}.err"
                tail = "\n".join(_tail(path, 15))
                if self._scoring_failed_starts >= 2:
                    self._scoring_broken = (
                        f"scoring job {job_id} ended before its Dask workers connected; {path}:\n{tail}"
                    )
                    continue
            job.status = Status.closed
            await self._start_scoring_job(job.kind)

    async def _not_queued(self, jobs: dict) -> set[str]:
        """Ids among `jobs` that SLURM no longer lists (ended); empty when SLURM does not answer."""
        proc = await asyncio.create_subprocess_exec(
            "squeue", "-h", "-o", "%i", "-j", ",".join(jobs),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode and b"Invalid job id" not in err:
            return set()
        return set(jobs) - set(out.decode().split())

    async def _watch(self) -> None:
        """Fail the pending tasks when nothing can run them; look for jobs that died at start."""
        rounds = 0
        while True:
            await asyncio.sleep(0.5)
            rounds += 1
            try:
                if self.scheduler is not None:
                    self._connected |= self._names() | _scoring_jobs_of(self._names())
                if rounds % 10 == 0:
                    await self._check_starts()
                    await self._check_scoring_jobs()
                self._fail_pending()
            except Exception:  # noqa: BLE001 -- the watchdog must outlive one bad round
                log.exception("slurm watchdog")

    async def _check_starts(self) -> None:
        """Jobs that SLURM ran and ended before their worker connected (wrong python, a failing
        prologue): one is retried, the second in a row fails the run with the end of its log."""
        if self._names():
            self._failed_starts, self._broken = 0, None
        waiting = {str(j.job_id): j for j in self._accepted() if j.name not in self._connected}
        if not waiting:
            return
        for job_id in await self._not_queued(waiting):
            job = waiting[job_id]
            if job.name in self._connected | self._names():
                continue
            self._failed_starts += 1
            path = Path(job.log_directory or ".") / f"{job.job_name or 'worker'}-{job_id}.err"
            tail = "\n".join(_tail(path, 15))
            log.error("worker job %s ended before its worker connected; %s:\n%s", job_id, path, tail)
            if self._failed_starts >= 2:
                self._broken = f"worker job {job_id} ended before its Dask worker connected; {path}:\n{tail}"
            job.status = Status.closed
            self._forget(job.name)

    def _names(self) -> set[str]:
        return {ws.name for ws in self.scheduler.workers.values()}

    def _fail_pending(self) -> None:
        """Cancel every task with the reason, when nothing can run them: SLURM refused the last job and
        no other is queued or running, or jobs keep ending before their worker connects."""
        scheduler = self.scheduler
        if scheduler is None or not scheduler.tasks:
            return
        if self._scoring_broken:
            reason, message = "scoring jobs cannot run", self._scoring_broken
        elif scheduler.workers:
            return
        elif self._rejection and not self._accepted():
            reason, message = "SLURM rejected the worker job", self._rejection
        elif self._broken:
            reason, message = "worker jobs end before their Dask worker starts", self._broken
        else:
            return
        adaptive = getattr(self, "_adaptive", None)
        if adaptive is not None and adaptive.maximum:  # the run is over: submit nothing more
            log.error("%s; no more worker jobs: %s", reason, message)
            adaptive.minimum = adaptive.maximum = 0
        wanted = [key for key, ts in scheduler.tasks.items() if ts.who_wants]
        scheduler.stimulus_cancel(wanted, "fire-and-forget", force=True, reason=reason, msg=message)

    def _update_worker_status(self, op: str, msg: Any) -> None:
        super()._update_worker_status(op, msg)
        if op == "remove":  # a worker left: if its job died, resubmit it once SpecCluster forgets it
            import dask
            from dask.utils import parse_timedelta

            delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay + 1, self._replace_lost)

    def _replace_lost(self) -> None:
        if self.status.name == "running" and set(self.worker_spec) - set(self.workers):
            log.info("resubmitting %d lost worker job(s)", len(set(self.worker_spec) - set(self.workers)))
            self._correct_state()

    async def _close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        scoring, self._scoring = list(self._scoring.values()), {}
        if self.scheduler is not None and self.scheduler.workers:
            try:
                await asyncio.wait_for(self._flush_worker_logs(), timeout=20)
            except Exception as e:  # noqa: BLE001 -- closing goes on; the logs are a courtesy
                log.warning("could not flush task logs from the workers: %s", e)
        await asyncio.gather(*(job.close() for job in scoring), return_exceptions=True)
        await super()._close()

    async def _flush_worker_logs(self) -> None:
        from distributed import Client

        async with Client(self.scheduler.address, asynchronous=True) as client:
            await client.run(_flush_prefect_logs, on_error="ignore")


class GpuAdaptive(Adaptive):
    """Adaptive scaling of the GPU jobs alone, when scoring has jobs of its own (which stay fixed):
    as many GPU jobs as GPU tasks queued or running, within min_jobs..max_jobs; only idle GPU
    workers are retired. Dask's own target counts every thread, scoring workers' included."""

    async def target(self) -> int:
        tasks = self.cluster.scheduler.tasks.values()
        live = ("waiting", "no-worker", "queued", "processing")
        return sum(1 for ts in tasks if ts.state in live and "GPU" in (ts.resource_restrictions or {}))

    async def workers_to_close(self, target: int) -> list[str]:
        gpu = [ws for ws in self.cluster.scheduler.workers.values() if ws.name in self.cluster.worker_spec]
        idle = [ws.name for ws in gpu if not ws.processing]
        return idle[: max(0, len(gpu) - target)]


def _scoring_jobs_of(workers: set[str]) -> set[str]:
    """Scoring job names of worker names: 'score-3' (one process) and 'score-3-0' (several) -> 'score-3'."""
    return {"-".join(name.split("-")[:2]) for name in workers if name.startswith(("score-", "bigmem-"))}


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return [f"(no log: {e})"]


async def _flush_prefect_logs() -> None:
    """On a worker: send the Prefect logs still queued (they are batched every few seconds)."""
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()
