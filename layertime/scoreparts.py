"""A layer of a big reranking task scored in parts: its queries over several scoring processes, each part's
per-query values a file in the store, merged bit-identically into the one completion record (docs/design.md §10).

MindSmallReranking in one process needs ~37 GiB (its 2.36M sub-queries' data and results); split into
`parts` (the cost table's, `costs.score_parts`) no process holds more than its share:

    part p of P   loads only its queries (`partload.loading_part`: mteb's loader, the other parts'
                  rows dropped before they become Python objects), computes their per-query values on arrays
                  (layertime.reranking) and writes them to `<record>.parts/part-<p>-of-<P>.npz`;
    merge         reads the P files, puts the queries back in mteb's order, computes mteb's averages
                  and nAUCs (`reranking.merged_scores`), writes the layer's completion record, last,
                  then deletes the part files.

A query's values depend on that query alone, and every average is taken over the merged lists in
mteb's order, so the scores equal one process's, bit for bit (tests/test_scoreparts.py). Resumable as
the flow is: a part whose file is whole is not computed again; a layer with a record gets no part; a
failed part leaves its layer without a record, and the flow names the layer.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from layertime import memory, reranking
from layertime.errors import Permanent
from layertime.io import atomic_write

MERGE = -1  # the `part` of a score task run that merges a layer's parts


class MissingParts(Permanent, FileNotFoundError):
    """A merge found parts of its layer missing or damaged (their scoring failed: re-run it)."""


def parts_dir(record: Path) -> Path:
    """Where the part files of the layer whose completion record is `record` live."""
    return record.with_name(record.stem + ".parts")


def part_file(record: Path, part: int, parts: int) -> Path:
    return parts_dir(record) / f"part-{part}-of-{parts}.npz"


# ---------------------------------------------------------------------------------------------- files


def write_part(  # noqa: PLR0913 (the values and what the merge needs to know of them)
    path: Path, values: dict, seconds: float, peak_memory_gb: float | None, dim: int, source: str = ""
) -> None:
    """One part's values (`reranking.part_values`) as an .npz, atomically; with its CPU seconds, peak
    memory, the embeddings' width (the merge's mteb export names the model by it) and `source`, the
    sha256 of the embedding file (the layer's record names it; parts of different files never merge)."""
    arrays: dict[str, np.ndarray] = {}
    for (split, subset), (sub, base) in values.items():
        for level, found in (("sub", sub), ("base", base)):
            if found is not None:
                arrays.update({f"{split}|{subset}|{level}|{k}": v for k, v in found.arrays().items()})
    meta = {
        "seconds": seconds,
        "peak_memory_gb": peak_memory_gb,
        "dim": dim,
        "source": source,
        "subsets": [list(k) for k in values],
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def read_part(path: Path) -> tuple[dict, dict] | None:
    """(values, meta) of a part file, or None when there is none or it is not whole."""
    names = [f.name for f in fields(reranking.QueryValues)]
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            values = {}
            for split, subset in meta["subsets"]:
                levels = []
                for level in ("sub", "base"):
                    keys = [f"{split}|{subset}|{level}|{n}" for n in names]
                    present = [k in data.files for k in keys]
                    if level == "sub" and not all(present) or any(present) and not all(present):
                        return None
                    levels.append(
                        reranking.QueryValues(**{n: data[k] for n, k in zip(names, keys, strict=True)})
                        if all(present)
                        else None
                    )
                values[split, subset] = tuple(levels)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    return values, meta


# ---------------------------------------------------------------------------------------------- steps


def compute_part(task: Any, encoder: Any, part: int, parts: int, path: Path, source: str = "") -> None:
    """Part `part` of `parts` of one layer (`encoder`: its LookupEncoder) of a loaded task, to `path`
    (`source`: the embedding file's sha256)."""
    started = time.process_time()
    with memory.peak() as used:
        values = reranking.part_values(task, encoder, (part, parts))
    seconds = time.process_time() - started
    write_part(path, values, seconds, used["peak_memory_gb"], encoder.matrix.shape[1], source)


def merged_result(task: Any, record: Path, parts: int) -> Any:
    """The layer's mteb TaskResult from its `parts` part files (MissingParts names the missing ones),
    built as mteb's `_evaluate_task` builds it; its evaluation time is the parts' CPU seconds."""
    import datetime

    from mteb.results import TaskResult

    found = {p: read_part(part_file(record, p, parts)) for p in range(parts)}
    missing = [p for p, f in found.items() if f is None]
    if missing:
        raise MissingParts(
            f"{task.metadata.name}: part(s) {', '.join(f'{p + 1}/{parts}' for p in missing)} of "
            f"{record.name} are missing or damaged in {parts_dir(record)}"
        )
    scores = reranking.merged_scores(task, [f[0] for f in found.values()])
    seconds = sum(f[1]["seconds"] for f in found.values())
    return TaskResult.from_task_results(
        task,
        scores,
        evaluation_time=seconds,
        kg_co2_emissions=None,
        date=datetime.datetime.now(tz=datetime.UTC),
    ), max((f[1]["peak_memory_gb"] or 0.0 for f in found.values()), default=None)


def remove_parts(record: Path) -> None:
    """Delete a merged layer's part files (the record holds everything they were for)."""
    shutil.rmtree(parts_dir(record), ignore_errors=True)


def part_labels(parts: int) -> Sequence[int]:
    """The `part` of each score task run of a split batch: each part, then the merge."""
    return [*range(parts), MERGE]
