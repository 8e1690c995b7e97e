"""A pool of one-thread scoring processes: mteb scoring in parallel without sharing a GIL (docs/design.md §10).

mteb's scoring is CPU work that is partly pure Python (MindSmallReranking loops over 2.36M
sub-queries), so threads of one process do not scale; more BLAS threads per process made it slower
and moved scores. The pool runs as many processes as asked (the local profile: one per core), each
prepared once by `bridge.prepare_scoring_process` (one BLAS thread, no GPU) and keeping its own loaded
tasks. Processes are spawned, not forked: the parent holds threads (Dask, Prefect, torch) that a fork
would copy mid-flight.

Each process is a slot of its own (a one-process executor), and a unit runs in a free slot. One
`ProcessPoolExecutor` of N processes would not do: when one of its processes dies, the executor is
broken and every unit running in the others fails with it (issue 14.5).
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from layertime.stopping import stopping

T = TypeVar("T")


class ScoringProcessDied(RuntimeError):
    """A scoring process ended mid-unit (killed, out of memory); the unit can be retried."""


def _prepare() -> None:
    # A Ctrl-C reaches the whole process group: the flow's process stops the run and kills us
    # (layertime/stopping.py), so a scoring process ignores it rather than print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from layertime.bridge import prepare_scoring_process

    prepare_scoring_process(dedicated=True)


class ScoringPool:
    """`run(fn, *args)` in one of `processes` one-thread scoring processes, each started on first use."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"scoring processes: {processes} (need at least 1)")
        self.processes = processes
        self._free = threading.Condition()
        self._idle = list(range(processes))  # slots no unit runs in
        self._slots: list[ProcessPoolExecutor | None] = [None] * processes
        self._closed = False

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a free scoring process; waits for a free one, then for the result.
        A process that dies fails only the unit it held (ScoringProcessDied); a fresh process takes
        its slot's next unit."""
        slot = self._take()
        try:
            return self._run_in(slot, fn, *args, **kwargs)
        finally:
            self._give_back(slot)

    def _run_in(self, slot: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            future = self._executor(slot).submit(fn, *args, **kwargs)
        except BrokenProcessPool:  # the process died while idle: this unit never ran in it
            self._discard(slot)
            future = self._executor(slot).submit(fn, *args, **kwargs)
        try:
            return future.result()
        except BrokenProcessPool as e:
            self._discard(slot)
            raise ScoringProcessDied(
                f"a scoring process died while scoring ({e}); killed, or out of memory? "
                "The unit is retried in a new process"
            ) from None

    def _take(self) -> int:
        with self._free:
            self._free.wait_for(lambda: self._idle or self._closed)
            if self._closed:
                raise RuntimeError("the scoring pool is closed")
            return self._idle.pop()

    def _give_back(self, slot: int) -> None:
        with self._free:
            self._idle.append(slot)
            self._free.notify()

    def _executor(self, slot: int) -> ProcessPoolExecutor:
        # Only the thread holding `slot` reads or replaces it, so no lock is needed here.
        if self._slots[slot] is None:
            if stopping():  # a signal stops the run: a process started now would outlive it
                raise RuntimeError("the run is stopping: no scoring process is started")
            self._slots[slot] = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_prepare
            )
        return self._slots[slot]

    def _discard(self, slot: int) -> None:
        executor, self._slots[slot] = self._slots[slot], None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Wait for the running units, then end every process."""
        with self._free:
            self._free.wait_for(lambda: len(self._idle) == self.processes)
            self._closed = True
            self._free.notify_all()
            executors, self._slots = self._slots, [None] * self.processes
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
