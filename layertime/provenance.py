"""What produced a result: the versions of the packages that decide numbers, the git commit, the host.

Stamped into `environment.json` (runroot.write_snapshot), the run root's stamp (runroot.claim_run_root)
and every completion record (`provenance`).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from layertime import CODE_VERSION


@functools.cache
def packages() -> dict[str, str | None]:
    """Versions of the packages that decide numbers (environment.json and each record's provenance)."""
    return {p: _version(p) for p in ("layertime", "torch", "transformers", "mteb", "datasets", "polars")}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout layertime runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance(spec_digest: str | None) -> dict[str, Any]:
    """What produced a result, stamped into each record: versions, the spec's hash, where it ran."""
    return {
        "code_version": CODE_VERSION,
        "spec": spec_digest,
        **packages(),
        "host": platform.node(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
