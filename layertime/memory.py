"""Peak memory of this process, per unit of work (Linux: /proc/self).

The kernel keeps a high-water mark of resident memory (VmHWM); writing "5" to /proc/self/clear_refs
resets it to the current RSS (Linux >= 4.0). Reset before a unit and read after it, the mark is that
unit's peak — exact in a one-thread scoring process; in a process that scores on several threads
at once it is the process's peak over the unit, an upper bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PROC = Path("/proc/self")


def reset_peak() -> bool:
    """Start a new high-water mark at the current RSS; False where the OS does not allow it."""
    try:
        (_PROC / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_gb() -> float | None:
    """Resident memory high-water mark in GB (10^9 bytes) since the last reset; None off Linux."""
    try:
        status = (_PROC / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9  # reported in kB
    return None


@contextlib.contextmanager
def peak(device: Any = None) -> Iterator[dict[str, float | None]]:
    """Measure a block: yields a dict filled on exit with `peak_memory_gb` (this process's resident
    peak) and `peak_gpu_memory_gb` (torch's CUDA allocator peak on `device`; None off CUDA)."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    found: dict[str, float | None] = {}
    reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield found
    finally:
        found["peak_memory_gb"] = peak_gb()
        found["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
