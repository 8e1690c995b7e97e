"""Record: the exact texts mteb will ask for on a task, from one cached recording pass (docs/design.md §4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layertime.rundir import RunDir


def task_texts(task: str, run: RunDir, aggregation: str, hf_cache: Path | None = None) -> Any:
    """The exact texts mteb will ask for on `task` (a cached recording pass): a `bridge.TaskTexts`."""
    from layertime.bridge import recorded_texts

    return recorded_texts(task, run.texts, aggregation, hf_cache)
