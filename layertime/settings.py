"""A unit's identity beside its checkpoint, task and layer: the settings that change a number.

The store keeps every result under the id of these settings (layertime/rundir.py), so results of other
settings, code or mteb versions never share a file (docs/design.md §7).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from layertime import CODE_VERSION
from layertime.provenance import packages
from layertime.spec import ExperimentSpec


def settings_id(settings: dict[str, Any]) -> str:
    """A short stable id of the settings that change numbers (pooling, norm, dtype, ...)."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Settings:
    """Everything that changes a number beside the checkpoint, task and layer: a unit's identity.

    Embedding: final norm, pooling, normalisation, max length, the resolved dtype, the token budget
    (it sets the batches, and a batch's shape moves float32 results by ~1e-7) and the device type
    (float32 on a GPU gives other bits than on a CPU). Scoring: the aggregation rule (the subsets
    scored) and the mteb version (its tasks' dataset revisions, subsets, splits and scoring code).
    Both: our code version. `tests/test_keys.py` places every spec field: a new one fails it until
    it is either in here or in the unit's path.
    """

    final_norm: str
    pooling: str
    normalize: bool
    max_length: int
    dtype: str  # resolved: 'float32' on CPU for 'auto'
    tokens_per_batch: int
    device: str  # 'cpu' or 'cuda': where the embeddings are computed
    aggregation: str  # 'rule-a' or 'mteb-v1': which subsets are scored
    mteb: str  # mteb's version
    code_version: str = CODE_VERSION  # a new code version never reads an older one's records

    @classmethod
    def of(cls, spec: ExperimentSpec, device: str | None = None) -> Settings:
        import torch

        from layertime.encoder import resolve_dtype

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = str(resolve_dtype(spec.dtype, dev)).removeprefix("torch.")
        return cls(spec.final_norm, spec.pooling, spec.normalize, spec.max_length, dtype, spec.tokens_per_batch,
                   dev.type, spec.aggregation, packages()["mteb"] or "none", CODE_VERSION)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def id(self) -> str:
        """Scores, embeddings (their texts depend on the subsets) and costs are stored under it."""
        return settings_id(self.as_dict())

    def encoder_settings(self) -> dict[str, Any]:
        """What decides a vector: the settings without the aggregation rule and mteb's version."""
        return {k: v for k, v in self.as_dict().items() if k not in ("aggregation", "mteb")}

    @property
    def encoder_id(self) -> str:
        """Metrics are stored under it: they never see mteb or the subsets."""
        return settings_id(self.encoder_settings())
