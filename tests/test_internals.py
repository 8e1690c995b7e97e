"""The internals of `distributed` and `dask_jobqueue` that flows/clusters.py overrides or reads are still
there, with the shape it relies on. pyproject bounds those packages to releases checked here: after an
upgrade this file says what moved, before a SLURM run does.

Each check names the line of flows/clusters.py that needs it. Where it can, a check uses the real
object (a LocalCluster's scheduler, a SLURMJob's failing command), not only its signature.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from pathlib import Path

import dask
import prefect_runs  # tests/prefect_runs.py
import pytest
from dask_jobqueue import SLURMCluster
from dask_jobqueue.core import Job, JobQueueCluster
from dask_jobqueue.slurm import SLURMJob
from distributed import Client, Event, LocalCluster
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.spec import SpecCluster
from prefect import flow

from flows import clusters


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _named_params(*functions) -> set[str]:
    """Parameters the functions take by name (a `**kwargs` would swallow a misspelled one silently)."""
    return {
        name
        for f in functions
        for name, p in inspect.signature(f).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


# --- dask_jobqueue ---------------------------------------------------------------------------------


def test_slurm_cluster_takes_its_job_class_from_a_class_attribute_and_passes_extra_kwargs_to_it():
    # LayertimeSLURMCluster: `job_cls = _RejectAwareJob`, `super().__init__(on_sbatch=..., **kwargs)`
    assert issubclass(clusters.LayertimeSLURMCluster, JobQueueCluster) and issubclass(
        JobQueueCluster, SpecCluster
    )
    assert SLURMCluster.job_cls is SLURMJob
    source = inspect.getsource(JobQueueCluster.__init__)
    assert 'getattr(type(self), "job_cls", None)' in source  # the class attribute is what is used
    assert (
        inspect.signature(JobQueueCluster.__init__).parameters["job_kwargs"].kind
        is inspect.Parameter.VAR_KEYWORD
    )
    # the kwargs reach the job class: `self.job_cls(..., **self._job_kwargs)`
    assert "**self._job_kwargs" in inspect.getsource(JobQueueCluster)


def test_every_job_argument_the_profile_passes_is_one_slurm_job_takes_by_name(tmp_path):
    # job_kwargs(): each key must be a real parameter, not swallowed by a **kwargs and ignored
    settings = clusters.SlurmSettings(log_directory=str(tmp_path / "logs"), score_jobs=1, bigmem_jobs=1)
    accepted = _named_params(SLURMJob.__init__, Job.__init__)
    for kind in ("gpu", "score", "bigmem"):
        unknown = set(clusters.job_kwargs(settings, None, kind)) - accepted
        assert unknown == set(), f"{kind} job arguments SLURMJob no longer takes: {sorted(unknown)}"


def _job(tmp_path: Path) -> SLURMJob:
    settings = clusters.SlurmSettings(log_directory=str(tmp_path / "logs"))
    return clusters._RejectAwareJob(
        scheduler="tcp://127.0.0.1:1",
        name="probe",
        on_sbatch=None,
        **clusters.job_kwargs(settings, None, "gpu"),
    )


def test_a_job_has_the_attributes_and_coroutines_the_cluster_reads(tmp_path):
    # _accepted, _check_starts, _check_scoring_jobs, _test_only, _close: job_id, status, name,
    # log_directory, job_name, job_script(), job_header; start/close awaited
    job = _job(tmp_path)
    assert job.job_id is None and job.name == "probe" and job.job_name == "layertime"
    assert job.log_directory == str(tmp_path / "logs") and isinstance(job.status, Status)
    assert "#SBATCH" in job.job_header and job.job_header in job.job_script()
    for method in ("start", "close", "_call"):
        assert inspect.iscoroutinefunction(getattr(SLURMJob, method)), method
    assert inspect.isawaitable(job)  # `await job` in _start_scoring_job


def test_a_failing_sbatch_raises_runtime_error_whose_stderr_the_profile_can_read(tmp_path):
    # _RejectAwareJob.start catches RuntimeError; _slurm_message keeps what follows "stderr:"
    job = _job(tmp_path)
    message = "sbatch: error: Batch job submission failed: Invalid partition name specified"
    with pytest.raises(RuntimeError) as failed:
        asyncio.run(job._call(["sh", "-c", f"echo '{message}' >&2; exit 1"]))
    assert clusters._slurm_message(str(failed.value)) == message
    assert "await self._submit_job" in inspect.getsource(Job.start)  # start() goes through _call's error


def test_the_cluster_adapts_with_job_bounds_and_an_adaptive_class_of_ours():
    # task_runner(): adapt_kwargs {"minimum_jobs", "maximum_jobs", "Adaptive": GpuAdaptive}
    assert {"minimum_jobs", "maximum_jobs"} <= set(_params(JobQueueCluster.adapt))
    assert "Adaptive" in _params(SpecCluster.adapt)


# --- distributed -----------------------------------------------------------------------------------


def test_the_spec_cluster_methods_the_profile_overrides_keep_their_shape():
    # LayertimeSLURMCluster overrides _start, _close (coroutines), _update_worker_status(op, msg),
    # calls _correct_state(); GpuAdaptive overrides target() and workers_to_close(target)
    assert inspect.iscoroutinefunction(SpecCluster._start) and inspect.iscoroutinefunction(SpecCluster._close)
    assert _params(SpecCluster._update_worker_status) == ["self", "op", "msg"]
    assert _params(SpecCluster._correct_state) == ["self"]
    assert inspect.iscoroutinefunction(Adaptive.target) and _params(Adaptive.target) == ["self"]
    assert inspect.iscoroutinefunction(Adaptive.workers_to_close)
    assert _params(Adaptive.workers_to_close) == ["self", "target"]
    assert {"running", "failed", "closed"} <= {s.name for s in Status}
    assert dask.config.get("distributed.deploy.lost-worker-timeout")  # _update_worker_status reads it
    assert "on_error" in _params(Client.run)  # _flush_worker_logs


def _slow(event: Event) -> int:
    event.wait()
    return 1


def test_a_live_cluster_has_the_state_the_watchdog_reads_and_cancels_by_stimulus():
    # _watch / _fail_pending / _names / _accepted / GpuAdaptive: cluster.worker_spec, .workers, .status,
    # ._adaptive (.minimum, .maximum); scheduler.tasks (.who_wants, .state, .resource_restrictions),
    # scheduler.workers (.name, .processing); scheduler.stimulus_cancel(keys, client, force, reason, msg)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                      resources={"GPU": 1}) as cluster, Client(cluster) as client:  # fmt: skip
        assert cluster.status is Status.running and set(cluster.worker_spec) == set(cluster.workers)
        cluster.adapt(Adaptive=clusters.GpuAdaptive, minimum=1, maximum=1)
        assert isinstance(cluster._adaptive, clusters.GpuAdaptive)
        assert (cluster._adaptive.minimum, cluster._adaptive.maximum) == (1, 1)
        scheduler = cluster.scheduler
        event = Event()
        with dask.annotate(resources={"GPU": 0.5}):
            running = client.submit(_slow, event, pure=False)
        with dask.annotate(resources={"MEM_GB": 1}):  # no worker offers it: it waits
            waiting = client.submit(_slow, event, pure=False)
        client.sync(_until, lambda: scheduler.tasks.get(running.key) is not None
                    and scheduler.tasks[running.key].state == "processing")  # fmt: skip
        target = client.sync(cluster._adaptive.target)
        assert target == 1  # GpuAdaptive counts the GPU task that is processing
        ts = scheduler.tasks[waiting.key]
        assert ts.who_wants and ts.state == "no-worker" and ts.resource_restrictions == {"MEM_GB": 1}
        (worker,) = scheduler.workers.values()
        assert worker.name in cluster.workers and scheduler.tasks[running.key] in worker.processing
        assert client.sync(cluster._adaptive.workers_to_close, 0) == []  # busy: not retired
        scheduler.stimulus_cancel([waiting.key], "fire-and-forget", force=True, reason="r", msg="why")
        client.sync(_until, lambda: waiting.status == "cancelled")
        event.set()
        assert running.result(timeout=60) == 1


async def _until(condition, timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not reached")


@flow
def _log_and_flush(line: str) -> list[str]:
    """Log `line` in a flow run, flush as `_flush_worker_logs` has each SLURM worker do before its job
    ends, then read the run's log from the API at once (the flow's own end would flush it too)."""
    from prefect import get_run_logger
    from prefect.context import get_run_context
    from prefect.utilities.asyncutils import run_coro_as_sync

    get_run_logger().info(line)
    run_coro_as_sync(clusters._flush_prefect_logs())
    return [entry.message for entry in prefect_runs.logs(get_run_context().flow_run.id)]


def test_a_workers_queued_prefect_logs_reach_the_api_when_it_flushes(prefect_api):
    # Unflushed, a line waits for the next batch (every 2 s): a job that ends first loses it.
    line = f"a task's last words {uuid.uuid4()}"
    assert line in _log_and_flush(line)
