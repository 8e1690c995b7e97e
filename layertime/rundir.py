"""Where a run keeps its files (DESIGN §7). One run root per experiment; every write is atomic."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def settings_id(settings: dict[str, Any]) -> str:
    """A short stable id of the settings that change numbers (pooling, norm, dtype, ...)."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def texts(self) -> Path:
        """Recorded text sets per task (one recording pass each)."""
        return self.root / "texts"

    @property
    def mteb_results(self) -> Path:
        """mteb's own result cache: results/<org>__<name>/<commit>/experiments/<settings, layer>/."""
        return self.root / "mteb"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def embeddings(self, settings: str, checkpoint: str, task: str) -> Path:
        """One (checkpoint, task) unit's embeddings: texts.json and layer_<b>.npy."""
        return self.root / "embeddings" / settings / checkpoint / task

    def score_record(self, settings: str, checkpoint: str, task: str, layer: int) -> Path:
        """Completion record of one (checkpoint, task, layer): its subset scores, written last."""
        return self.root / "scores" / settings / checkpoint / task / f"layer_{layer}.json"

    def score_records(self) -> list[Path]:
        return sorted((self.root / "scores").glob("*/*/*/layer_*.json"))
