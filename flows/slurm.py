"""The Dask cluster of a SLURM profile: worker jobs submitted with `sbatch` (dask-jobqueue), watched.

Failures of the SLURM path are surfaced, not waited on (docs/design.md §6: a failing `sbatch` under
adaptive scaling hangs a flow): the job scripts are checked with `sbatch --test-only` before the
cluster starts; a submission SLURM rejects later fails the pending tasks with SLURM's own message when
no worker is left to run them; a worker job that dies (walltime, preemption, `scancel`) is replaced and
Dask reruns what it held; jobs that keep ending without finishing a task (a wrong `python`, a failing
prologue, a node that kills every task) fail the run with the end of the last one's log instead of
being replaced forever. Task logs are flushed from the workers before the cluster closes.

Every job SLURM takes is registered with the run's guard (`flows/guard.py`), which `scancel`s the ones
still alive when the run stops early (a cancel, a signal, the worker gone).

This module is imported only where a SLURM profile runs or shows its job scripts, and from the main
thread: importing dask_jobqueue installs a SIGINT handler (dask_jobqueue/runner.py), which Python
allows only there. Prefect's worker loads the flow's module in a thread to run its cancellation hooks;
while flows/clusters.py imported dask_jobqueue, every cancel logged `ValueError: signal only works in
main thread` (issue 23). The handler it installs (SIGINT -> sys.exit) is replaced by the one that was
there before.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.diagnostics.plugin import SchedulerPlugin

from flows import guard
from flows.clusters import SlurmRejected
from flows.slurm_check import sbatch_test_only


def _import_jobqueue() -> None:
    """Import dask_jobqueue, keeping this process's SIGINT handler (see the module's doc)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "flows.slurm must be imported in the main thread (dask_jobqueue sets a signal handler)"
        )
    previous = signal.getsignal(signal.SIGINT)
    import dask_jobqueue.slurm  # noqa: F401 -- installs SIGINT -> sys.exit

    signal.signal(signal.SIGINT, previous)


_import_jobqueue()

from dask_jobqueue import SLURMCluster  # noqa: E402
from dask_jobqueue.slurm import SLURMJob  # noqa: E402

log = logging.getLogger("layertime.slurm")

# Jobs of one kind in a row that end without finishing a task (their worker never connected, or it
# connected and died on its first task) before the run fails with the end of the last one's log. A
# job that dies once (a bad node, preemption) is replaced; three in a row is the job, not the node.
JOBS_IN_A_ROW = 3


class _Job(SLURMJob):
    """A SLURM worker job that tells its cluster whether `sbatch` took it (instead of vanishing) and
    when it closes, and remembers what became of it: whether a worker of it connected and whether it
    finished a task.

    With `node_scoring` (job arguments of one-thread scoring workers, `gpu_job_scoring`), the job also
    starts those workers in the background, GPU hidden, before its own: they use the node's cores the
    GPU worker leaves idle, as processes of their own (mteb's scoring is half pure Python: threads of
    the GPU worker would share its GIL). They are named `<job>-score-<i>`, outside the adaptive spec.
    """

    def __init__(
        self,
        *args: Any,
        on_sbatch: Any = None,
        on_close: Any = None,
        kind: str = "gpu",
        node_scoring: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if node_scoring:
            scheduler = kwargs.get("scheduler", args[0] if args else None)
            scoring = SLURMJob(scheduler=scheduler, name=f"{self.name}-score", **node_scoring)
            self._command_template = (
                f"CUDA_VISIBLE_DEVICES= {scoring._command_template} &\n{self._command_template}"
            )
        self._on_sbatch = on_sbatch  # (job, SLURM's error or None), in the cluster's loop
        self._on_close = on_close  # (job), before it is cancelled
        self.kind = kind  # gpu, score or bigmem
        self.connected = False  # a Dask worker of this job joined the scheduler
        self.finished_a_task = False  # ... and finished a task, done or failed: the job can work

    async def start(self) -> None:
        try:
            await super().start()
        except RuntimeError as e:
            self.status = Status.failed  # never started: nothing to close
            if self._on_sbatch is not None:
                self._on_sbatch(self, _slurm_message(str(e)))
            raise
        guard.JOBS.add(str(self.job_id))
        if self._on_sbatch is not None:
            self._on_sbatch(self, None)

    async def close(self) -> None:
        if self._on_close is not None:
            self._on_close(self)
        await super().close()
        guard.JOBS.discard(str(self.job_id))
        self.status = Status.closed  # dask-jobqueue's close leaves it running: SpecCluster's close asserts it


def _slurm_message(error: str) -> str:
    """SLURM's words from dask-jobqueue's 'Command exited with non-zero exit code ... stderr: ...'."""
    stderr = error.rpartition("stderr:")[2].strip()
    return stderr or error.strip()


class _TaskEnds(SchedulerPlugin):
    """Tells the cluster the address of each worker that joined (a worker that dies within the
    watchdog's 0.5 s rounds was never seen connected) and of each that finished a task (done or failed)."""

    def __init__(self, on_finish: Any, on_join: Any = None) -> None:
        self.on_finish, self.on_join = on_finish, on_join

    def add_worker(self, scheduler: Any, worker: str) -> None:
        if self.on_join is not None:
            self.on_join(worker)

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        if start == "processing" and finish in ("memory", "erred") and kwargs.get("worker"):
            self.on_finish(kwargs["worker"])


class LayertimeSLURMCluster(SLURMCluster):
    """SLURMCluster that fails fast on rejected jobs, replaces dead ones and flushes task logs on close.

    - before starting: `sbatch --test-only` of the exact job script (a bad partition or account, or
      a request over the partition's limits, fails here with SLURM's message);
    - while running: when SLURM refuses a job and no other job is queued or running, every pending
      task is cancelled with SLURM's message (the flow fails at once instead of waiting forever);
      when other jobs were taken (a per-user job limit), the adaptive maximum drops to them;
    - a worker job that dies (walltime, preemption, scancel) is replaced: a GPU job once SpecCluster
      gives up on it (`distributed.deploy.lost-worker-timeout`), a scoring job at once; Dask reruns
      the tasks it held;
    - JOBS_IN_A_ROW jobs of a kind in a row that end without finishing a task (never connected, or
      connected and died) fail the pending tasks with the end of the last job's `.err` log;
    - on close, every worker flushes its queued Prefect logs before its job is cancelled.
    """

    job_cls = _Job

    def __init__(
        self, *, preflight: bool = True, scoring_jobs: list[tuple[str, int, dict]] = (), **kwargs: Any
    ):
        self._rejection: str | None = None  # SLURM's message for the last refused GPU job
        self._broken: str | None = None  # why worker jobs cannot run: the pending tasks fail with it
        self._taken: dict[str, _Job] = {}  # job id -> a job SLURM took that has not ended or closed
        self._failed: dict[str, list[str]] = {}  # kind -> ids of its jobs in a row that did no task
        self._watch_task: asyncio.Task | None = None
        self._scoring_kinds = list(scoring_jobs)  # (kind, count, job kwargs): fixed, not adaptive
        self._scoring: dict[str, _Job] = {}  # name -> a scoring job that is wanted
        self._scoring_serial = 0
        super().__init__(on_sbatch=self._sbatch, on_close=self._closing, **kwargs)
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
        try:
            out = sbatch_test_only(script, "layertime-preflight-")
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlurmRejected(f"cannot run sbatch: {e}") from e
        if out.returncode != 0:
            raise SlurmRejected(
                f"SLURM rejects the worker job ({summary}): {(out.stderr or out.stdout).strip()}; "
                "`layertime slurm-check --cluster PROFILE` says which profile field to change"
            )
        log.info("sbatch --test-only: %s", (out.stderr or out.stdout).strip())

    def _summary(self) -> str:
        header = [line.removeprefix("#SBATCH ") for line in self.job_header.splitlines()]
        return " ".join(h for h in header if not h.startswith(("-J", "-e", "-o")))

    def _sbatch(self, job: _Job, rejected: str | None) -> None:
        """SLURM took worker job `job` (rejected None) or refused it with that message."""
        if rejected is None:
            self._taken[str(job.job_id)] = job
            if job.kind == "gpu":
                self._rejection = None
            return
        if job.kind != "gpu":  # no GPU job can score in its place: the run cannot go on
            log.error("SLURM rejected scoring job %s: %s", job.name, rejected)
            self._broken = f"SLURM rejected the scoring job {job.name}: {rejected}"
            self._scoring.pop(job.name, None)
            return
        self._rejection = rejected
        queued = len(self._accepted())
        log.error(
            "SLURM rejected worker job %s (%d other jobs queued or running): %s", job.name, queued, rejected
        )
        adaptive = getattr(self, "_adaptive", None)
        if queued and adaptive is not None:  # e.g. a per-user job limit: go on with the jobs it took
            adaptive.maximum = max(adaptive.minimum, queued)
        asyncio.get_running_loop().call_soon(self._forget, job.name)

    def _accepted(self) -> list:
        """GPU worker jobs that SLURM took and that have not ended."""
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
        self.scheduler.add_plugin(_TaskEnds(self._finished_a_task, self._joined), name="layertime-task-ends")
        for kind, count, _ in self._scoring_kinds:
            for _ in range(count):
                await self._start_scoring_job(kind)
        self._watch_task = asyncio.ensure_future(self._watch())

    async def _start_scoring_job(self, kind: str) -> None:
        """Submit one scoring job of `kind`; its workers join this cluster's scheduler."""
        kwargs = next(k for name, _, k in self._scoring_kinds if name == kind)
        self._scoring_serial += 1
        name = f"{kind}-{self._scoring_serial}"
        job = self.job_cls(scheduler=self.scheduler.address, name=name, on_sbatch=self._sbatch,
                           on_close=self._closing, kind=kind, **kwargs)  # fmt: skip
        self._scoring[name] = job
        try:
            await job
        except RuntimeError:
            pass  # refused: _sbatch recorded SLURM's message, and the pending tasks fail with it

    def _job_of(self, worker: str) -> _Job | None:
        """The job a Dask worker runs in, by the worker's name: a GPU job's name, or a scoring job's
        ('score-3', or 'score-3-0' for one of its several processes), or a GPU job's own scoring
        processes' (`gpu_job_scoring`: '<job>-score', '<job>-score-0')."""
        node = worker.rpartition("-score")[0]
        return (
            self.workers.get(worker)
            or self._scoring.get(worker)
            or self._scoring.get(worker.rpartition("-")[0])
            or (self.workers.get(node) if node else None)
        )

    def _joined(self, address: str) -> None:
        """A worker joined the scheduler (its plugin): its job connected."""
        ws = self.scheduler.workers.get(address) if self.scheduler is not None else None
        if ws is not None and (job := self._job_of(str(ws.name))) is not None:
            job.connected = True

    def _finished_a_task(self, address: str) -> None:
        """A worker finished a task (the scheduler's plugin): its job works, and so do its kind's."""
        ws = self.scheduler.workers.get(address) if self.scheduler is not None else None
        job = self._job_of(str(ws.name)) if ws is not None else None
        if job is not None and not job.finished_a_task:
            job.finished_a_task = True
            self._failed.pop(job.kind, None)

    def _wanted(self, job: _Job) -> bool:
        """Whether the job is still part of the plan (an adaptive scale-down or the close takes it out)."""
        if self.status != Status.running:
            return False
        return job.name in self.worker_spec if job.kind == "gpu" else self._scoring.get(job.name) is job

    def _closing(self, job: _Job) -> None:
        """A job is being closed: by the plan (scale-down, the cluster's close) or by SpecCluster,
        which closes a job whose worker was lost; the latter ended by itself and is accounted."""
        taken = self._taken.pop(str(job.job_id), None)
        if taken is not None and self._wanted(job):
            self._ended(str(job.job_id), job)

    async def _watch(self) -> None:
        """Fail the pending tasks when nothing can run them; look for jobs that ended by themselves."""
        rounds = 0
        while True:
            await asyncio.sleep(0.5)
            rounds += 1
            try:
                if self.scheduler is not None:
                    for ws in self.scheduler.workers.values():
                        if (job := self._job_of(str(ws.name))) is not None:
                            job.connected = True
                if rounds % 10 == 0:
                    await self._check_ended_jobs()
                self._fail_pending()
            except Exception:  # noqa: BLE001 -- the watchdog must outlive one bad round
                log.exception("slurm watchdog")

    async def _check_ended_jobs(self) -> None:
        """Jobs SLURM no longer lists, though the plan still wants them: each is accounted
        (`_ended`), then a scoring job is replaced at once, and a GPU job whose worker never
        connected is dropped from the plan (adaptive scaling submits another; one whose worker
        connected is SpecCluster's to replace, after the lost-worker timeout)."""
        for job_id, job in list(self._taken.items()):
            if not self._wanted(job):
                del self._taken[job_id]
        if not self._taken:
            return
        for job_id in await self._not_queued(self._taken):
            job = self._taken.pop(job_id, None)
            if job is None:
                continue  # closed meanwhile
            self._ended(job_id, job)
            guard.JOBS.discard(job_id)
            if job.kind != "gpu":
                self._scoring.pop(job.name, None)
                job.status = Status.closed
                if not self._broken:
                    await self._start_scoring_job(job.kind)
            elif not job.connected:
                job.status = Status.closed
                self._forget(job.name)

    def _ended(self, job_id: str, job: _Job) -> None:
        """A wanted job ended by itself. One that finished a task is just replaced; one that did not
        counts toward JOBS_IN_A_ROW of its kind, and the last of those breaks the run."""
        if job.finished_a_task:
            log.info("%s job %s (%s) ended; another replaces it", job.kind, job_id, job.name)
            return
        why = ("its worker connected, then it ended before finishing a task" if job.connected
               else "it ended before its Dask worker connected")  # fmt: skip
        path = Path(job.log_directory or ".") / f"{job.job_name or 'worker'}-{job_id}.err"
        tail = "\n".join(_tail(path, 15))
        failed = self._failed.setdefault(job.kind, [])
        failed.append(job_id)
        log.error("%s job %s: %s; %s:\n%s", job.kind, job_id, why, path, tail)
        if len(failed) >= JOBS_IN_A_ROW:
            self._broken = (
                f"{len(failed)} {job.kind} jobs in a row ended without finishing a task "
                f"({', '.join(failed)}); in the last, job {job_id}, {why}; {path}:\n{tail}"
            )

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

    def _fail_pending(self) -> None:
        """Cancel every task with the reason, when nothing can run them: jobs cannot run (`_broken`),
        or SLURM refused the last GPU job and no other is queued or running."""
        scheduler = self.scheduler
        if scheduler is None or not scheduler.tasks:
            return
        if self._broken:
            reason, message = "worker jobs cannot run", self._broken
        elif scheduler.workers:
            return
        elif self._rejection and not self._accepted():
            reason, message = "SLURM rejected the worker job", self._rejection
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
        if self.status.name == "running" and not self._broken and set(self.worker_spec) - set(self.workers):
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
        workers = self.cluster.scheduler.workers.values()
        gpu = [ws for ws in workers if ws.name in self.cluster.worker_spec]
        busy_nodes = {
            str(ws.name).rpartition("-score-")[0]
            for ws in workers
            if "-score-" in str(ws.name) and ws.processing
        }
        # a GPU job goes with its own scoring processes (gpu_job_scoring): retired only when they are idle too
        idle = [ws.name for ws in gpu if not ws.processing and ws.name not in busy_nodes]
        return idle[: max(0, len(gpu) - target)]


def preview_script(kwargs: dict[str, Any]) -> str:
    """The batch script a job of these arguments would get (a placeholder scheduler address)."""
    logs = Path(kwargs["log_directory"])
    created = [p for p in (logs, *logs.parents) if not p.exists()]
    job = _Job(scheduler="tcp://<scheduler-address>:8786", name="<worker-name>", **kwargs)
    for path in created:  # SLURMJob makes the log directory: a preview leaves no trace
        path.rmdir()
    return job.job_script()


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return [f"(no log: {e})"]


async def _flush_prefect_logs() -> None:
    """On a worker: send the Prefect logs still queued (they are batched every few seconds)."""
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()
