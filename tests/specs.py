"""Spec builders for tests: the demo spec (deployments/demo.yaml), small, under the test's own tmp_path.

- `demo_fields(tmp_path, hub, **fields)`: the demo spec's fields on SMALL (one checkpoint, blocks 1 and
  3, DemoSTS, no metrics), its run root `tmp_path/run/demo` (the store beside it, `tmp_path/run/store`),
  reading the session's `hub`; `fields` replace any of them.
- `demo_spec_file(tmp_path, hub, filename="spec.yaml", **fields)`: the same, written to `tmp_path/filename`
  (for `layertime run`, `plan`, `verify`).
- `demo_overrides(tmp_path, hub, **fields)`: SMALL as `overrides` of an in-process flow run of
  deployments/demo.yaml (`layer_by_layer(DEMO_SPEC, overrides=...)`), its run root `tmp_path/demo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPEC = ROOT / "deployments/demo.yaml"
DEMO: dict[str, Any] = yaml.safe_load(DEMO_SPEC.read_text())
SMALL: dict[str, Any] = {"checkpoints": ["step1000"], "layers": [1, 3], "tasks": ["DemoSTS"], "metrics": None}


def demo_fields(tmp_path: Path, hub: Path, **fields: Any) -> dict[str, Any]:
    """The demo spec on SMALL, run root `tmp_path/run/demo`, reading `hub`; `fields` replace any field."""
    return {**DEMO, "run_root": str(tmp_path / "run/demo"), "hf_cache": str(hub), **SMALL, **fields}


def demo_spec_file(tmp_path: Path, hub: Path, filename: str = "spec.yaml", **fields: Any) -> Path:
    """`demo_fields(tmp_path, hub, **fields)` written to `tmp_path/filename`."""
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(demo_fields(tmp_path, hub, **fields), sort_keys=False))
    return path


def demo_overrides(tmp_path: Path, hub: Path, **fields: Any) -> dict[str, Any]:
    """Overrides of deployments/demo.yaml for a flow run: SMALL, run root `tmp_path/demo`, `hub`."""
    return {"run_root": str(tmp_path / "demo"), "hf_cache": str(hub), **SMALL, **fields}
