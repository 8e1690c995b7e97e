"""What the store holds about finished work, read back checked: completion records (scores, metrics),
cost records and a unit's embeddings manifest (docs/design.md §7).

Every reader here treats a file that is missing, damaged or not what it claims to be as absent: the
work it stands for is done again, never merged half-read and never a permanent failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def read_cost(path: Path) -> dict | None:
    """A cost record (a JSON object with its phase and seconds), or None when there is none or it is
    damaged (then it is removed)."""
    try:
        cost = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        cost = None
    if (
        isinstance(cost, dict)
        and isinstance(cost.get("phase"), str)
        and isinstance(cost.get("seconds"), float | int)
    ):
        return cost
    path.unlink(missing_ok=True)
    return None


_ROW_FIELDS = {
    "scores": {"layer": int, "task": str, "subset": str, "split": str, "main_score": float | int},
    "metrics": {"layer": int, "metric": str, "normalization": str, "value": float | int},
}


def read_record(path: Path) -> list[dict] | None:
    """The rows of a completion record; None when there is none, or it is damaged (then it is removed,
    so the unit is computed again instead of merged half-read).

    Checked, not trusted: a JSON object whose `rows` are a non-empty list of rows with the fields of
    their kind (scores or metrics, by the record's place in the store), of the layer its name says
    (`layer_<b>.json`) and, for scores, of the task its folder names.
    """
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = None
    rows = record.get("rows") if isinstance(record, dict) else None
    if _rows_ok(path, rows):
        return rows
    path.unlink(missing_ok=True)
    return None


def _rows_ok(path: Path, rows: Any) -> bool:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return False
    # <store>/<kind>/<settings>/<model>/<commit>/<task or metrics key>/layer_<b>.json (rundir)
    kind = path.parts[-6] if len(path.parts) >= 6 else None
    fields = _ROW_FIELDS.get(kind, {"layer": int})
    if not all(
        isinstance(r.get(k), t) and not isinstance(r.get(k), bool) for r in rows for k, t in fields.items()
    ):
        return False
    name = path.stem.removeprefix("layer_")
    if path.stem.startswith("layer_") and name.isdigit() and any(r["layer"] != int(name) for r in rows):
        return False
    return kind != "scores" or all(r["task"] == path.parent.name for r in rows)


def valid_files(path: Path) -> dict[str, int]:
    """{name: size} of the files the unit's manifest (done.json, written last) lists that are on disk
    at that size; {} without a readable manifest."""
    try:
        files = dict(json.loads((path / "done.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: size for name, size in files.items() if _size(path / name) == size}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def same_texts(path: Path, texts: list[str]) -> bool:
    """True when the unit's texts.json at `path` holds exactly `texts`."""
    try:
        return json.loads(path.read_text()) == texts
    except (OSError, ValueError):
        return False


def embeddings_ok(path: Path, blocks: list[int]) -> bool:
    """True when the unit's manifest (done.json, written last) lists every file at its size, the texts
    read back as a list of texts and each layer's array header is a float32 matrix with a row per text.

    Checked, not trusted: a file of the right size with a damaged header would fail its unit at
    scoring on every run; here it only sends the unit back to be embedded.
    """
    valid = valid_files(path)
    if not all(name in valid for name in ["texts.json", *(f"layer_{b}.npy" for b in blocks)]):
        return False
    try:
        texts = json.loads((path / "texts.json").read_text())
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return False
    except (OSError, ValueError):
        return False
    return all(array_ok(path / f"layer_{b}.npy", len(texts)) for b in blocks)


def array_ok(path: Path, rows: int) -> bool:
    """True when `path` reads back as a float32 matrix of `rows` rows (its header, memory-mapped)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return array.dtype == np.float32 and array.ndim == 2 and array.shape[0] == rows


def load_embeddings(path: Path, block: int) -> tuple[list[str], np.ndarray]:
    """A unit's texts and one layer's vectors (check them first: `embeddings_ok`)."""
    return json.loads((path / "texts.json").read_text()), np.load(path / f"layer_{block}.npy")
