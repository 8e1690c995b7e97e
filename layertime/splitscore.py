"""A step of a split layer in the store (layertime/scoreparts.py): compute a part unless its file is whole,
or merge the parts into the layer's completion record, written last (docs/design.md §10). What a score
task run of a split batch calls for each of its layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layertime import bridge, pipeline
from layertime.scoreparts import MERGE, part_file, read_part, remove_parts


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
