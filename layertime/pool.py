"""A pool of one-thread scoring processes: mteb scoring in parallel without sharing a GIL (docs/design.md §10).

mteb's scoring is CPU work that is partly pure Python (MindSmallReranking loops over 2.36M
sub-queries), so threads of one process do not scale; more BLAS threads per process made it slower
and moved scores. The pool runs as many processes as asked (the local profile: one per core), each
prepared once by `bridge.prepare_scoring_process` (one BLAS thread, no GPU) and keeping its own loaded
tasks. Processes are spawned, not forked: the parent holds threads (Dask, Prefect, torch) that a fork
would copy mid-flight.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")


class ScoringProcessDied(RuntimeError):
    """A scoring process ended mid-unit (killed, out of memory); the unit can be retried."""


def _prepare() -> None:
    from layertime.bridge import prepare_scoring_process

    prepare_scoring_process(dedicated=True)


class ScoringPool:
    """`run(fn, *args)` in one of `processes` one-thread scoring processes, started on first use."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"scoring processes: {processes} (need at least 1)")
        self.processes = processes
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a scoring process; waits for it. A dead process fails only the
        units it held (ScoringProcessDied); the next call starts a fresh pool."""
        executor = self._get()
        try:
            return executor.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool as e:
            self._discard(executor)
            raise ScoringProcessDied(
                f"a scoring process died while scoring ({e}); killed, or out of memory? "
                "The unit is retried in a new process"
            ) from None

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_prepare
                )
            return self._executor

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
