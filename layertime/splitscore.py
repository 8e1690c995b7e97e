"""A step of a split layer in the store (layertime/scoreparts.py): compute a part unless its file is whole
and was computed from the same embedding file, or merge the parts into the layer's completion record,
written last (docs/design.md §10). What a score task run of a split batch calls for each of its layers."""

from __future__ import annotations

from pathlib import Path

from layertime import bridge, records
from layertime.checkpoints import Checkpoint
from layertime.phases import record as recording
from layertime.phases import score as scoring
from layertime.phases.context import Context
from layertime.scoreparts import MERGE, MissingParts, part_file, read_part, remove_parts


def score_layer(
    ctx: Context, ckpt: Checkpoint, task: str, block: int, embeddings: Path | None, part: int, parts: int
) -> list[dict] | None:
    """One step of a split layer (`part` in 0..parts-1, or MERGE): the layer's rows when its record
    exists or this step merges it (writing the record, last, then dropping the parts); None after a
    part (computed, or kept from an earlier try of the same embeddings). MissingEmbeddings when the
    layer's embeddings are missing or rejected, MissingParts when the merge lacks parts."""
    if (rows := scoring.recorded(ctx, ckpt, task, block)) is not None:
        return rows
    record = ctx.run.score_record(ctx.settings.id, ckpt, task, block)
    spec = ctx.spec
    if part == MERGE:
        found = [read_part(part_file(record, p, parts)) for p in range(parts)]
        sources = {f[1].get("source") for f in found if f is not None}
        if len(sources) > 1:  # parts of different embedding files: none of them can be trusted
            remove_parts(record)
            raise MissingParts(f"{task}: the parts of {record.name} were scored from different embeddings "
                               f"(removed: score its parts again)")  # fmt: skip
        dim = max((f[1]["dim"] for f in found if f is not None), default=0)
        meta = bridge.model_meta(ckpt.model, ckpt.key, dim, {"layer": block, **ctx.settings.as_dict()})
        subsets = bridge.merge_parts(
            task, record, parts, meta, ctx.run.mteb_results, spec.aggregation, spec.hf_cache
        )
        rows = scoring.record_scores(ctx, ckpt, task, block, subsets, sources.pop())
        remove_parts(record)
        return rows
    if embeddings is None:
        raise scoring.MissingEmbeddings(f"embeddings of {ckpt.revision} · {task} are missing")
    texts = recording.task_texts(task, ctx.run, spec.aggregation, spec.hf_cache).texts
    unit = records.EmbeddingsAsk.of(ckpt.model, ckpt.commit, task, texts)
    try:
        vectors, digest = records.load_layer(embeddings, unit, block)
    except records.RejectedEmbeddings as e:
        raise scoring.MissingEmbeddings(f"embeddings of {ckpt.revision} · {task} rejected: {e}") from None
    path = part_file(record, part, parts)
    if (kept := read_part(path)) is not None and kept[1].get("source") == digest:
        return None
    bridge.score_part(task, texts, vectors, (part, parts), path, digest, spec.aggregation, spec.hf_cache)
    return None
