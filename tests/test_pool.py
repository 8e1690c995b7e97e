"""The local profile's scoring processes: one thread each (BLAS, OpenMP, torch), and a dead one fails
only its unit."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from layertime.pool import ScoringPool, ScoringProcessDied


def _blas_threads() -> tuple[int, int]:
    """(pid, the most threads any BLAS, OpenMP or torch pool of this process may use)."""
    import torch
    from sklearn.cluster import KMeans  # noqa: F401 -- loads the OpenMP runtime k-means uses
    from threadpoolctl import threadpool_info

    return os.getpid(), max([i["num_threads"] for i in threadpool_info()] + [torch.get_num_threads()])


def test_scoring_runs_in_other_processes_with_one_blas_thread():
    with ScoringPool(2) as pool:
        pid, threads = pool.run(_blas_threads)
    assert pid != os.getpid() and threads == 1


def _hold(folder: str, name: str) -> int:
    """Write this process's pid to `<folder>/<name>.pid`, then wait for `<folder>/release`: a unit
    that is still running when the test kills its neighbour."""
    Path(folder, f"{name}.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + 600  # a failed assertion must not leave the pool's exit waiting forever
    while not Path(folder, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid()


def _pid_of(folder: Path, name: str, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while not (folder / f"{name}.pid").exists():
        assert time.monotonic() < deadline, f"unit {name} never started"
        time.sleep(0.1)
    return int((folder / f"{name}.pid").read_text())


def test_a_killed_scoring_process_fails_only_its_unit_and_a_fresh_process_takes_the_next(tmp_path):
    with ScoringPool(2) as pool, ThreadPoolExecutor(2) as threads:
        doomed = threads.submit(pool.run, _hold, str(tmp_path), "doomed")
        healthy = threads.submit(pool.run, _hold, str(tmp_path), "healthy")
        victim, neighbour = _pid_of(tmp_path, "doomed"), _pid_of(tmp_path, "healthy")
        assert victim != neighbour  # both units run at once, each in its own process
        os.kill(victim, signal.SIGKILL)  # as the OOM killer would
        with pytest.raises(ScoringProcessDied, match="killed, or out of memory"):
            doomed.result(timeout=300)
        (tmp_path / "release").touch()
        assert healthy.result(timeout=300) == neighbour  # the unit beside it finished in its process
        after = tmp_path / "after"  # two more units at once: one in the survivor, one in a fresh process
        after.mkdir()
        again = [threads.submit(pool.run, _hold, str(after), name) for name in ("one", "two")]
        pids = {_pid_of(after, "one"), _pid_of(after, "two")}
        (after / "release").touch()
        assert {f.result(timeout=300) for f in again} == pids
    assert neighbour in pids and victim not in pids and len(pids) == 2


def test_a_pool_needs_a_process():
    with pytest.raises(ValueError, match="scoring processes: 0"):
        ScoringPool(0)
