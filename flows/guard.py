"""A flow run that stops early stops everything it started, within seconds, and says why in Prefect.

What Prefect 3.9 does by itself, and where it fell short (issue 23; docs/design.md §6):
- *Cancel* (`prefect flow-run cancel`, the UI): the worker's observer (a websocket, with polling as a
  fallback) sees the run Cancelling, tells the flow's process over a loopback control channel, sends it
  SIGTERM (SIGKILL after 30 s), runs the flow's on_cancellation hooks in a subprocess that loads the
  flow's module, and sets Cancelled. After a server restart the observer gives up for good ("flow run
  cancellation will fail"): the run went on computing and stayed Cancelling.
- *The worker dies* (SIGKILL, OOM, a closed tmux): nothing tells the flow's process, which runs in a
  process group of its own. It went on without its output pipe (BrokenPipeError in the tasks that
  logged) and held the run root until killed by hand.
- *A signal to the flow's process*: Prefect raises TerminationSignal in the flow's main thread, and
  the flow unwound through the Dask cluster's and the scoring pool's closing (20-40 s).

So `Guard`, around the flow's body, watches for itself, in a process that is the run's (a worker
or runner started it for this run: `PREFECT__FLOW_RUN_ID` is this run's; or `layertime run`):
- the flow run's state, read from the API every POLL_S seconds (when there is a server): Cancelling
  or Cancelled stops the run, whatever the worker's observer did;
- its parent process, under a worker: the parent gone (this process re-parented) stops the run as
  Crashed;
- SIGTERM and SIGINT, under a worker (the flow runs in the process's main thread): the run stops at
  once. (`layertime run` runs the flow in a thread; its main thread's handler, layertime/stopping.py,
  runs the guard's hook instead.)
A notebook or a test that calls the flow keeps Prefect's own behaviour: nothing here exits its process.

Every stop is `layertime.stopping.stop_now`, whose hook here logs the reason to the flow run's log,
`scancel`s the run's SLURM jobs (flows/slurm.py registers each one SLURM takes in `JOBS`), and sets the
flow run's state: Cancelled (a cancel or a signal) or Crashed (the worker gone), with the reason and
what is kept; then every descendant process is killed and the process exits. The run root's lock is
an flock, released by the kernel with the process, so the next run takes over at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from layertime import stopping

POLL_S = 2.0  # the flow run's state is read this often (one small request)
PARENT_S = 0.5  # the parent process is checked this often (a system call)
API_TIMEOUT_S = 10.0  # each request of a stop: a lost server must not hold the stop up
JOBS: set[str] = set()  # SLURM job ids of this process's clusters, from sbatch until they end


class Guard:
    """The watch over one flow run (module doc). Use as a context manager around the flow's body;
    `describe` (set once the run is planned) gives what is kept and how to resume."""

    def __init__(self) -> None:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        self.flow_run = context.flow_run if context is not None else None
        flow_run_id = str(self.flow_run.id) if self.flow_run is not None else None
        # Started by a worker or runner for this very run (its engine sets the variable): watch the parent.
        self.by_worker = flow_run_id is not None and os.environ.get("PREFECT__FLOW_RUN_ID") == flow_run_id
        self.owns_process = self.by_worker or stopping.owns_process()  # else: a notebook's, a test's
        self.parent = os.getppid()
        # Prefect's settings live in context variables of the flow's thread (the API URL; a test
        # harness's or `layertime run`'s embedded settings): the watchers and a stop from the main
        # thread's signal handler use a copy of this context, not their own.
        self.context = contextvars.copy_context()
        self.api_url = _api_url()  # None: Prefect's embedded server, private to this process
        self.describe: Callable[[], str] | None = None
        self._done = threading.Event()
        self._stack = contextlib.ExitStack()

    @property
    def label(self) -> str | None:
        """This flow run, as the run root's lock names its holder."""
        return f"Prefect flow run {self.flow_run.name} ({self.flow_run.id})" if self.flow_run else None

    def keep(self, run: Any, settings_id: str, units: Any) -> None:
        """What a stop says: how many of `units` are scored and kept, and how to compute the rest."""
        how = (
            f"re-running the deployment (or `prefect flow-run retry {self.flow_run.id}`)"
            if self.by_worker
            else "running it again"
        )
        self.describe = functools.partial(stopping.scored_line, run, settings_id, list(units), how)

    def __enter__(self) -> Guard:
        self._stack.enter_context(stopping.on_stop(self._on_stop))
        if self.by_worker and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(sig, self._signalled)
                self._stack.callback(signal.signal, sig, previous)
        if self.by_worker:
            self._start(self._watch_parent)
        if self.owns_process and self.flow_run is not None and self.api_url:
            self._start(self._watch_state)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._stack.close()

    def _start(self, target: Callable[[], None]) -> None:
        context = self.context.copy()
        threading.Thread(
            target=context.run, args=(target,), daemon=True, name=f"layertime-{target.__name__}"
        ).start()

    def _code(self) -> int:
        """Exit code of a stop: 0 under a worker (the flow run's state says what happened; a non-zero
        code would make the worker propose Crashed over it), 1 in a terminal."""
        return 0 if self.by_worker else 1

    def _signalled(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        stopping.stop_now("Cancelled", f"stopped by {name}", self._code(), self.describe)

    def _watch_parent(self) -> None:
        while not self._done.wait(PARENT_S):
            if os.getppid() != self.parent:
                reason = (
                    f"the process that started this flow run (pid {self.parent}, the Prefect worker) is gone"
                )
                stopping.stop_now("Crashed", reason, self._code(), self.describe)

    def _watch_state(self) -> None:
        with _client() as client:
            while not self._done.wait(POLL_S):
                try:
                    state = client.read_flow_run(self.flow_run.id).state
                except Exception:  # noqa: BLE001 -- the server may be restarting: ask again
                    continue
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    stopping.stop_now("Cancelled", "cancelled in Prefect", self._code(), self.describe)

    def _on_stop(self, state: str, reason: str) -> None:
        """The orchestration's part of a stop (stopping.on_stop): scancel, then log and mark the flow
        run, unless it is on Prefect's embedded server (its database goes with this process)."""
        cancelled = cancel_jobs()
        if self.flow_run is not None and self.api_url:
            self.context.copy().run(self._mark, state, reason, cancelled)

    def _mark(self, state: str, reason: str, cancelled: list[str]) -> None:
        with contextlib.suppress(Exception), _client() as client:
            current = client.read_flow_run(self.flow_run.id).state
            if current is not None and current.is_final():
                return  # a stop during the teardown of a finished run changes nothing
            if current is not None and current.is_cancelling():
                state, reason = "Cancelled", "cancelled in Prefect"  # the worker's SIGTERM, or our own poll
            kept = ""
            with contextlib.suppress(Exception):
                kept = self.describe() if self.describe is not None else ""
            jobs = f"; SLURM jobs cancelled: {', '.join(cancelled)}" if cancelled else ""
            message = f"layertime: {reason}{jobs}" + (f"; {kept}" if kept else "")
            with contextlib.suppress(Exception):
                from prefect.logging.loggers import flow_run_logger

                flow_run_logger(self.flow_run).error(message)
            from prefect.states import Cancelled, Crashed

            new = Cancelled(message=message) if state == "Cancelled" else Crashed(message=message)
            client.set_flow_run_state(self.flow_run.id, new, force=True)
        with contextlib.suppress(Exception):
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)


def cancel_jobs() -> list[str]:
    """`scancel` every SLURM job this process's clusters hold; the ids cancelled."""
    jobs = sorted(JOBS)
    if jobs:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
        JOBS.difference_update(jobs)
    return jobs


def _api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@contextlib.contextmanager
def _client():
    """A sync Prefect client that answers or fails within API_TIMEOUT_S (no retries with backoff)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"client.max_retries": 0}):
        with get_client(httpx_settings={"timeout": API_TIMEOUT_S}, sync_client=True) as client:
            yield client
