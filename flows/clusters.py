"""Cluster profiles: where the tasks run. A profile becomes the flow's Dask task runner.

- `local` (default): one Dask worker in the flow's process, threads only — a process LocalCluster
  under the embedded Prefect API starts one temporary API server per worker process (DESIGN §6).
  The worker advertises one `GPU` slot (the GPU when CUDA is present, the CPU otherwise) so embed
  and measure tasks, annotated with it, run one at a time while scoring uses the other threads.
- `slurm`: Dask workers in SLURM batch jobs (dask-jobqueue's SLURMCluster, adaptive), one worker
  process per job advertising one `GPU` slot; embedding takes the slot while scoring runs on the
  job's other threads. Settings come from `deployments/clusters/slurm.yaml`, then environment
  variables `LAYERTIME_SLURM_<FIELD>`, then per-run overrides (`SlurmSettings` documents each field).
  The scheduler lives in the flow's process; workers must reach it and the Prefect API.

Failures of the SLURM path are surfaced, not waited on (DESIGN §6: a failing `sbatch` under adapt
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
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GPU = {"GPU": 1}  # the resource annotation of GPU tasks
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
    dashboard_address: str | None = Field(":8787", description="the Dask dashboard; null: none")
    preflight: bool = Field(True, description="check the job script with `sbatch --test-only` first")

    @field_validator("walltime", mode="before")
    @classmethod
    def _walltime(cls, value: Any) -> Any:
        if isinstance(value, int):  # YAML reads an unquoted 24:00:00 as sexagesimal seconds
            return f"{value // 3600:02d}:{value % 3600 // 60:02d}:{value % 60:02d}"
        if isinstance(value, str) and not _WALLTIME.match(value.strip()):
            raise ValueError(f"{value!r} is not a SLURM time limit ([D-]HH:MM:SS)")
        return value

    @field_validator("memory", mode="before")
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
        n, unit = _MEMORY.match(self.memory).groups()
        return f"{n}{unit.upper()}"

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
    slurm: SlurmSettings | None = None  # the slurm profile's settings

    def task_runner(self) -> DaskTaskRunner:
        if self.name == "local":
            return DaskTaskRunner(
                cluster_class="distributed.LocalCluster",
                cluster_kwargs={
                    "n_workers": 1,
                    "processes": False,
                    "threads_per_worker": max(2, os.cpu_count() or 2),
                    "resources": GPU,
                    "dashboard_address": None,
                },
            )
        if self.slurm is not None:
            return DaskTaskRunner(
                cluster_class=LayertimeSLURMCluster,
                cluster_kwargs=cluster_kwargs(self.slurm, _api_url(required=True)),
                adapt_kwargs={"minimum_jobs": self.slurm.min_jobs, "maximum_jobs": self.slurm.max_jobs},
            )
        raise ValueError(f"cluster profile {self.name!r} has no task runner")


def profile(name: str, overrides: dict | None = None) -> Profile:
    """The named cluster profile; an unknown name is an error that lists the known ones.

    `overrides` replaces profile fields for this run (the `slurm` profile's, e.g. {"partition": "a100"}).
    """
    if name == "local":
        if overrides:
            raise ClusterError(f"cluster profile local takes no overrides (got {sorted(overrides)})")
        import torch

        return Profile("local", "cuda" if torch.cuda.is_available() else "cpu")
    if name == "slurm":
        settings = load_slurm_settings(overrides)
        return Profile("slurm", settings.device, settings)
    raise ValueError(f"cluster: unknown profile {name!r} (known: {', '.join(PROFILES)})")


def job_script(spec: str | Path | None = None, overrides: dict | None = None) -> str:
    """The batch script the `slurm` profile submits for each worker job (what `sbatch` receives).

    `spec`, when given, is validated first (a bad spec fails here, not on the cluster). The script
    names a placeholder scheduler address: the real one exists once the flow runs.
    """
    if spec is not None:
        from layertime.spec import load_spec

        load_spec(spec)
    settings = load_slurm_settings(overrides)
    kwargs = cluster_kwargs(settings, _api_url(required=False))
    for cluster_only in ("scheduler_options", "preflight"):
        kwargs.pop(cluster_only)
    logs = Path(kwargs["log_directory"])
    created = [p for p in (logs, *logs.parents) if not p.exists()]
    job = SLURMJob(scheduler="tcp://<scheduler-address>:8786", name="<worker-name>", **kwargs)
    for path in created:  # SLURMJob makes the log directory: a preview leaves no trace
        path.rmdir()
    return job.job_script()


def cluster_kwargs(settings: SlurmSettings, api_url: str | None) -> dict[str, Any]:
    """SLURMCluster keyword arguments for these settings."""
    gres = ":".join(["gpu", *([settings.gpu_type] if settings.gpu_type else []), str(settings.gpus)])
    directives = [f"--gres={gres}"] if settings.gpus else []
    exports = dict(settings.env)
    exports.update({k: os.environ[k] for k in settings.forward_env if k in os.environ and k not in exports})
    if api_url:
        exports["PREFECT_API_URL"] = api_url  # tasks on the workers log to the flow's API
    prologue = [f"export {k}={_quote(v)}" for k, v in exports.items()] + list(settings.job_script_prologue)
    lifetime = settings.walltime_seconds - min(600, settings.walltime_seconds // 10)
    worker_args = ["--resources", "GPU=1"]  # one embedding slot per job (DESIGN §6), CPU or GPU
    if lifetime > 60:  # retire before SLURM kills the job at its walltime: the scheduler replaces it
        worker_args += ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{min(300, lifetime // 20)}s"]
    return {
        "queue": settings.partition,
        "account": settings.account,
        "cores": settings.threads or settings.cpus,
        "job_cpu": settings.cpus,
        "processes": 1,
        "memory": f"{settings.slurm_memory}iB",  # Dask's name for the same amount (64GiB)
        "job_mem": settings.slurm_memory,
        "walltime": settings.walltime,
        "job_name": settings.job_name,
        "log_directory": str(Path(settings.log_directory).absolute()),
        "interface": settings.interface,
        "python": settings.python or sys.executable,
        "job_script_prologue": prologue,
        "job_extra_directives": directives + list(settings.job_extra_directives),
        "worker_extra_args": worker_args,
        "local_directory": settings.local_directory,
        "death_timeout": settings.death_timeout,
        "scheduler_options": {"dashboard_address": settings.dashboard_address}
        if settings.dashboard_address else {"dashboard": False},
        "preflight": settings.preflight,
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

    def __init__(self, *, preflight: bool = True, **kwargs: Any):
        self._rejection: str | None = None  # SLURM's message for the last refused job
        self._broken: str | None = None  # why worker jobs end before their worker connects
        self._failed_starts = 0
        self._connected: set[str] = set()  # names of the jobs whose worker connected once
        self._watch_task: asyncio.Task | None = None
        super().__init__(on_sbatch=self._sbatch, **kwargs)
        if preflight:
            try:
                self.preflight()
            except BaseException:
                self.close()
                raise

    def preflight(self) -> None:
        """`sbatch --test-only` of this cluster's job script; SlurmRejected with SLURM's message."""
        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="layertime-preflight-") as f:
            f.write(self.job_script())
            f.flush()
            try:
                out = subprocess.run(
                    ["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SlurmRejected(f"cannot run sbatch: {e}") from e
        if out.returncode != 0:
            raise SlurmRejected(
                f"SLURM rejects the worker job ({self._summary()}): {(out.stderr or out.stdout).strip()}"
            )
        log.info("sbatch --test-only: %s", (out.stderr or out.stdout).strip())

    def _summary(self) -> str:
        header = [line.removeprefix("#SBATCH ") for line in self.job_header.splitlines()]
        return " ".join(h for h in header if not h.startswith(("-J", "-e", "-o")))

    def _sbatch(self, name: str, rejected: str | None) -> None:
        """SLURM took worker job `name` (rejected None) or refused it with that message."""
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
        self._watch_task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Fail the pending tasks when nothing can run them; look for jobs that died at start."""
        rounds = 0
        while True:
            await asyncio.sleep(0.5)
            rounds += 1
            try:
                if self.scheduler is not None:
                    self._connected |= self._names()
                if rounds % 10 == 0:
                    await self._check_starts()
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
        proc = await asyncio.create_subprocess_exec(
            "squeue", "-h", "-o", "%i", "-j", ",".join(waiting),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode and b"Invalid job id" not in err:
            return  # SLURM did not answer: next round
        for job_id in set(waiting) - set(out.decode().split()):
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
        if scheduler is None or scheduler.workers or not scheduler.tasks:
            return
        if self._rejection and not self._accepted():
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
        if self.scheduler is not None and self.scheduler.workers:
            try:
                await asyncio.wait_for(self._flush_worker_logs(), timeout=20)
            except Exception as e:  # noqa: BLE001 -- closing goes on; the logs are a courtesy
                log.warning("could not flush task logs from the workers: %s", e)
        await super()._close()

    async def _flush_worker_logs(self) -> None:
        from distributed import Client

        async with Client(self.scheduler.address, asynchronous=True) as client:
            await client.run(_flush_prefect_logs, on_error="ignore")


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return [f"(no log: {e})"]


async def _flush_prefect_logs() -> None:
    """On a worker: send the Prefect logs still queued (they are batched every few seconds)."""
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()
