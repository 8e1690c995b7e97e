"""Cluster profiles: where the tasks run. A profile becomes the flow's Dask task runner.

- `local` (default): one Dask worker in the flow's process, threads only — a process LocalCluster
  under the embedded Prefect API starts one temporary API server per worker process (DESIGN §6).
  The worker advertises one `GPU` slot (the GPU when CUDA is present, the CPU otherwise) so embed
  and measure tasks, annotated with it, run one at a time while scoring uses the other threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefect_dask import DaskTaskRunner

GPU = {"GPU": 1}  # the resource annotation of GPU tasks


@dataclass(frozen=True)
class Profile:
    name: str
    device: str  # where embedding runs: decides what dtype 'auto' means

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
        raise ValueError(f"cluster profile {self.name!r} has no task runner")


def profile(name: str) -> Profile:
    """The named cluster profile; an unknown name is an error that lists the known ones."""
    if name == "local":
        import torch

        return Profile("local", "cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(f"cluster: unknown profile {name!r} (known: local)")
