"""What a benchmark ran on, for the heading of its section in RESULTS.md (shared by the scripts here)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average: above the core count, other processes compete for the CPUs."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def machine_info(device: Any) -> dict[str, str]:
    """Date, CPU, cores, GPU name (torch device), library versions and the load at the start."""
    import mteb
    import torch
    import transformers

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mteb": mteb.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load avg (1 min) at start": load_average(),
    }
