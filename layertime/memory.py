"""Peak memory of this process, per unit of work (Linux: /proc/self).

The kernel keeps a high-water mark of resident memory (VmHWM); writing "5" to /proc/self/clear_refs
resets it to the current RSS (Linux >= 4.0). Reset before a unit and read after it, the mark is that
unit's peak — exact in a one-thread scoring process; in a process that scores on several threads
at once it is the process's peak over the unit, an upper bound.
"""

from __future__ import annotations

from pathlib import Path

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
