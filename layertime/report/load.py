"""Reading a run root for the report: its tables, spec and environment snapshot, into `RunData`.

Every file the report reads is read here, once, so that the analysis and the renderers work on frames.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from layertime import records, tables
from layertime.report.analysis import RunData


def load_run(run_root: Path) -> RunData:
    """Read `tables/scores`, `tables/metrics`, `tables/costs`, a layer search's `tables/search.json` and
    `tables/search_arms`, `spec.yaml`, `environment.json` and the store's text records of a run root."""
    root = Path(run_root)
    notes: list[str] = []
    scores = _read_table(root / "tables" / "scores.parquet", tables.scores_frame([]), notes)
    metrics = _read_table(root / "tables" / "metrics.parquet", tables.metrics_frame([]), notes)
    spec = None
    if (root / "spec.yaml").is_file():
        from layertime.spec import SpecError, load_spec

        try:
            spec = load_spec(root / "spec.yaml")
        except SpecError as e:
            notes.append(f"spec.yaml could not be read ({e}); the expected grid is what the tables hold")
    else:
        notes.append("no spec.yaml: the expected grid is what the tables hold")
    env_path = root / "environment.json"
    environment = json.loads(env_path.read_text()) if env_path.is_file() else {}
    costs_path = root / "tables" / "costs.parquet"
    costs = pl.read_parquet(costs_path) if costs_path.is_file() else None
    csvs = sorted((root / "tables").glob("*.csv"))
    search, search_arms = _search(root / "tables")
    return RunData(
        root,
        scores,
        metrics,
        spec,
        environment,
        notes,
        costs,
        texts_info(root, spec),
        csvs,
        search,
        search_arms,
    )


def _search(directory: Path) -> tuple[dict | None, pl.DataFrame | None]:
    """A layer search's `search.json` and `search_arms.parquet` (flows/layer_search.py), or (None, None)
    when the run root has not both."""
    summary, arms = directory / "search.json", directory / "search_arms.parquet"
    if not (summary.is_file() and arms.is_file()):
        return None, None
    return json.loads(summary.read_text()), pl.read_parquet(arms)


def _read_table(path: Path, empty: pl.DataFrame, notes: list[str]) -> pl.DataFrame:
    if not path.is_file():
        notes.append(f"{path.name} is missing: nothing of it is reported")
        return empty
    return pl.read_parquet(path)


def texts_info(root: Path, spec: Any | None) -> pl.DataFrame:
    """Per task: texts mteb asks for per evaluation and unique texts forwarded, from the store's records."""
    store = _store(root, spec)
    rows = []
    if store is None or spec is None:
        return pl.DataFrame()
    for task in spec.tasks:
        found = sorted((store / "texts").glob(f"{task}__*__{spec.aggregation}.json"), key=os.path.getmtime)
        if found and (record := records.peek_texts(found[-1])) is not None:
            rows.append({"task": task, "requested": record.requested, "unique": len(record.texts)})
    return pl.DataFrame(rows)


def _store(root: Path, spec: Any | None) -> Path | None:
    candidates = [root.parent / "store"]
    if spec is not None and spec.store is not None:
        candidates = [Path(spec.store), root.parent / Path(spec.store).name, *candidates]
    return next((p for p in candidates if (p / "texts").is_dir()), None)
