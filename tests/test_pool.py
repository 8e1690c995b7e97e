"""The local profile's scoring processes: one thread each (BLAS, OpenMP, torch), and a dead one fails
only its unit."""

import os
import signal

import pytest

from layertime.pool import ScoringPool, ScoringProcessDied


def _blas_threads() -> tuple[int, int]:
    """(pid, the most threads any BLAS, OpenMP or torch pool of this process may use)."""
    import torch
    from sklearn.cluster import KMeans  # noqa: F401 -- loads the OpenMP runtime k-means uses
    from threadpoolctl import threadpool_info

    return os.getpid(), max([i["num_threads"] for i in threadpool_info()] + [torch.get_num_threads()])


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would


def test_scoring_runs_in_other_processes_with_one_blas_thread():
    with ScoringPool(2) as pool:
        pid, threads = pool.run(_blas_threads)
    assert pid != os.getpid() and threads == 1


def test_a_killed_scoring_process_fails_its_unit_and_the_pool_recovers():
    with ScoringPool(1) as pool:
        first, _ = pool.run(_blas_threads)
        with pytest.raises(ScoringProcessDied, match="killed, or out of memory"):
            pool.run(_die)
        second, threads = pool.run(_blas_threads)  # a fresh process takes the next unit
    assert second != first and threads == 1


def test_a_pool_needs_a_process():
    with pytest.raises(ValueError, match="scoring processes: 0"):
        ScoringPool(0)
