"""A layer of a big reranking task scored in parts: its queries over several scoring processes, each part's
per-query values a file in the store, merged bit-identically into the one completion record (docs/design.md §10).

MindSmallReranking in one process needs ~37 GiB (its 2.36M sub-queries' data and results); split into
`parts` (the cost table's, `costs.score_parts`) no process holds more than its share:

    part p of P   loads only its queries (`loading_part`: mteb's loader, the other parts' rows dropped
                  before they become Python objects), computes their per-query values on arrays
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
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def write_part(path: Path, values: dict, seconds: float, peak_memory_gb: float | None, dim: int) -> None:
    """One part's values (`reranking.part_values`) as an .npz, atomically; with its CPU seconds, peak
    memory and the embeddings' width (the merge's mteb export names the model by it)."""
    arrays: dict[str, np.ndarray] = {}
    for (split, subset), (sub, base) in values.items():
        for level, found in (("sub", sub), ("base", base)):
            if found is not None:
                arrays.update({f"{split}|{subset}|{level}|{k}": v for k, v in found.arrays().items()})
    meta = {
        "seconds": seconds,
        "peak_memory_gb": peak_memory_gb,
        "dim": dim,
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


# ---------------------------------------------------------------------------------------------- loading


_PART = threading.local()  # the part this thread's task loads are for (`loading_part`)
_INSTALLED: list[bool] = []
_INSTALL = threading.Lock()


@contextmanager
def loading_part(part: tuple[int, int] | None, grouped: bool, candidates: bool = True) -> Iterator[None]:
    """mteb's retrieval loader, in this thread, keeps only part `(p, parts)`'s queries: their qrels and
    candidate lists are filtered while still arrow/polars rows, so the others never become Python
    objects (MindSmall's 97M candidate ids are most of its memory); without `candidates`, none at all
    (a recording pass needs only the texts). See `_load`."""
    _install_loader()
    _PART.value = (part, grouped, candidates)
    try:
        yield
    finally:
        _PART.value = None


def _install_loader() -> None:
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalDatasetLoader

    with _INSTALL:
        if not _INSTALLED:
            own = RetrievalDatasetLoader.load

            def load(self: Any, num_proc: int | None = None) -> Any:
                active = getattr(_PART, "value", None)
                return own(self, num_proc) if active is None else _load(self, num_proc, *active)

            RetrievalDatasetLoader.load = load
            _INSTALLED.append(True)


def _load(loader: Any, num_proc: int | None, part: tuple[int, int], grouped: bool, candidates: bool) -> Any:
    """mteb's `RetrievalDatasetLoader.load` (and its `_load_qrels`, `_load_top_ranked`) for the queries
    of `part` only: the same steps on their rows, and each query's position in the queries dataset
    (`layertime_position`, the order a merge puts them back in)."""
    import polars as pl
    from datasets import Features, Sequence, Value
    from mteb.abstasks.retrieval_dataset_loaders import (
        RetrievalSplitData,
        _combine_queries_with_instructions_datasets,
    )

    queries = loader._load_queries(num_proc)
    all_ids = list(queries["id"])
    mine = pl.Series(
        [q for q in all_ids if reranking.part_of(q, part[1], grouped) == part[0]], dtype=pl.String
    )

    config = f"{loader.config}-qrels" if loader.config is not None else "default"
    if config == "default" and config not in loader.dataset_configs:
        if "qrels" not in loader.dataset_configs:
            raise ValueError(
                "No qrels or default config found. Please specify a valid config or ensure the dataset has qrels."
            )
        config = "qrels"
    qrels_ds = loader._load_dataset_split(config, num_proc).select_columns(["query-id", "corpus-id", "score"])
    qrels_ds = qrels_ds.cast(
        Features({"query-id": Value("string"), "corpus-id": Value("string"), "score": Value("int32")})
    )
    qrels_ds = qrels_ds.to_polars().filter(pl.col("query-id").is_in(mine))
    qrels = {
        query_id[0]: dict(zip(group["corpus-id"], group["score"], strict=True))
        for query_id, group in qrels_ds.group_by("query-id", maintain_order=False)
    }
    del qrels_ds
    corpus = loader._load_corpus(num_proc)
    indices = [i for i, id_ in enumerate(all_ids) if id_ in qrels]
    queries = queries.select(indices)

    top_ranked = None
    top_config = f"{loader.config}-top_ranked" if loader.config is not None else "top_ranked"
    if top_config in loader.dataset_configs and candidates:
        ranked_ds = loader._load_dataset_split(top_config, num_proc)
        ranked_ds = ranked_ds.cast(
            Features({"query-id": Value("string"), "corpus-ids": Sequence(Value("string"))})
        )
        ranked_ds = ranked_ds.select_columns(["query-id", "corpus-ids"]).to_polars()
        ranked_ds = ranked_ds.filter(pl.col("query-id").is_in(mine))
        top_ranked = dict(
            zip(ranked_ds["query-id"].to_list(), ranked_ds["corpus-ids"].to_list(), strict=True)
        )
        del ranked_ds
    instruction_config = f"{loader.config}-instruction" if loader.config is not None else "instruction"
    if instruction_config in loader.dataset_configs:
        queries = _combine_queries_with_instructions_datasets(
            queries, loader._load_instructions(num_proc), num_proc
        )
    split = RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=qrels, top_ranked=top_ranked)
    split["layertime_position"] = {all_ids[i]: i for i in indices}
    return split


# ---------------------------------------------------------------------------------------------- steps


def compute_part(task: Any, encoder: Any, part: int, parts: int, path: Path) -> None:
    """Part `part` of `parts` of one layer (`encoder`: its LookupEncoder) of a loaded task, to `path`."""
    started = time.process_time()
    with memory.peak() as used:
        values = reranking.part_values(task, encoder, (part, parts))
    write_part(path, values, time.process_time() - started, used["peak_memory_gb"], encoder.matrix.shape[1])


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


def score_layer(  # noqa: PLR0913 (pipeline.score_unit's arguments, and the part)
    run: Any,
    settings: Any,
    ckpt: Any,
    task: str,
    block: int,
    embeddings: Path | None,
    part: int,
    parts: int,
    aggregation: str,
    num_blocks: int,
    hf_cache: Path | None = None,
    spec_digest: str | None = None,
) -> list[dict] | None:
    """One step of a split layer (`part` in 0..parts-1, or MERGE): the layer's rows when its record
    exists or this step merges it (writing the record, last, then dropping the parts); None after a
    part (computed, or kept from an earlier try). MissingEmbeddings / MissingParts when inputs lack."""
    from layertime import bridge, pipeline

    record = run.score_record(settings.id, ckpt, task, block)
    if (rows := pipeline.read_record(record)) is not None:
        return rows
    if part == MERGE:
        dims = {
            meta["dim"]
            for p in range(parts)
            if (found := read_part(part_file(record, p, parts)))
            for meta in [found[1]]
        }
        meta = bridge.model_meta(
            ckpt.model, ckpt.key, max(dims, default=0), {"layer": block, **settings.as_dict()}
        )
        subsets = bridge.merge_parts(task, record, parts, meta, run.mteb_results, aggregation, hf_cache)
        rows = pipeline.record_scores(run, settings, ckpt, task, block, subsets, num_blocks, spec_digest)
        remove_parts(record)
        return rows
    path = part_file(record, part, parts)
    if read_part(path) is not None:
        return None
    if embeddings is None or not pipeline.embeddings_ok(embeddings, [block]):
        raise pipeline.MissingEmbeddings(
            f"embeddings of {ckpt.revision} · {task} are missing or damaged at {embeddings}"
        )
    texts, vectors = pipeline.load_embeddings(embeddings, block)
    bridge.score_part(task, texts, vectors, (part, parts), path, aggregation, hf_cache)
    return None
