"""Score: mteb main scores of a (checkpoint, task) unit's layers from its stored embeddings, each layer
an evaluation of its own with its own completion record (docs/design.md §4, §7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layertime import records, suite
from layertime.checkpoints import Checkpoint
from layertime.errors import Permanent
from layertime.phases import record
from layertime.phases.context import Context
from layertime.provenance import provenance


class MissingEmbeddings(Permanent, FileNotFoundError):
    """A unit's embeddings are missing or rejected (records.RejectedEmbeddings) when it is scored:
    scoring again cannot make them; embedding them again does (the flow does, flows/layer_by_layer.py)."""


def score_ask(ctx: Context, ckpt: Checkpoint, task: str, layer: int) -> records.ScoreAsk:
    """What the score record of (`ckpt`, `task`, `layer`) must hold (suite.requested builds the task)."""
    asked = suite.requested(task, ctx.spec.aggregation)
    return records.ScoreAsk(
        ckpt.model, ckpt.commit, task, layer, ctx.settings.as_dict(), asked.scores, asked.bounds
    )


def recorded(ctx: Context, ckpt: Checkpoint, task: str, layer: int) -> list[dict] | None:
    """The rows of the layer's score record, or None when it has none (or a rejected one, removed)."""
    path = ctx.run.score_record(ctx.settings.id, ckpt, task, layer)
    if not path.exists():  # most units of a run: no need to build the task to know it
        return None
    return records.read_score(path, score_ask(ctx, ckpt, task, layer))


def missing_layers(ctx: Context, ckpt: Checkpoint, task: str, blocks: list[int]) -> list[int]:
    """The layers of `blocks` without an accepted score record for (`ckpt`, `task`)."""
    return [b for b in blocks if recorded(ctx, ckpt, task, b) is None]


def score_unit(
    ctx: Context, ckpt: Checkpoint, task: str, blocks: list[int], embeddings: Path | None
) -> dict[int, list[dict]]:
    """Rows per layer of one unit: recorded layers are read back, the others scored with mteb.

    Each layer's embeddings are checked before they are scored (records.load_layer: the file its
    manifest lists, of this unit's texts, finite); a rejected file is a `MissingEmbeddings` naming it.
    Each newly scored layer gets its completion record, written last, stamped with `provenance` and
    the digest of the embedding file it was scored from. Rows carry the measured cost: mteb's
    evaluation seconds and the scoring process's peak memory.
    """
    from layertime.bridge import model_meta, score_layers

    run, settings, spec = ctx.run, ctx.settings, ctx.spec
    rows = {b: r for b in blocks if (r := recorded(ctx, ckpt, task, b)) is not None}
    todo = [b for b in blocks if b not in rows]
    if not todo:
        return rows
    if embeddings is None:
        raise MissingEmbeddings(f"embeddings of {ckpt.revision} · {task} are missing")
    texts = record.task_texts(task, run, spec.aggregation, spec.hf_cache).texts
    unit = records.EmbeddingsAsk.of(ckpt.model, ckpt.commit, task, texts)
    digests: dict[int, str] = {}
    dims: dict[int, int] = {}

    def layers():  # one layer in memory at a time
        for b in todo:
            try:
                vectors, digests[b] = records.load_layer(embeddings, unit, b)
            except records.RejectedEmbeddings as e:
                raise MissingEmbeddings(f"embeddings of {ckpt.revision} · {task} rejected: {e}") from None
            dims[b] = vectors.shape[1]
            yield b, (texts, vectors)

    def meta(block: int) -> Any:
        return model_meta(ckpt.model, ckpt.key, dims[block], {"layer": block, **settings.as_dict()})

    num_blocks = ctx.plan.num_blocks
    for block, subsets in score_layers(
        task, layers(), meta, run.mteb_results, spec.aggregation, spec.hf_cache
    ).items():
        rows[block] = [
            {
                "model": ckpt.model,
                "commit": ckpt.commit,
                "layer": block,
                "hidden_state": block + 1,
                "depth": (block + 1) / num_blocks,
                "task": task,
                "task_type": suite.task_type(task),
                "subset": s.subset,
                "split": s.split,
                "main_score": s.main_score,
                "mteb_version": s.mteb_version,
                "dataset_revision": s.dataset_revision,
                "seconds": s.seconds,
                "peak_memory_gb": s.peak_memory_gb,
            }  # fmt: skip
            for s in subsets
        ]
        path = run.score_record(settings.id, ckpt, task, block)
        records.write_score(path, score_ask(ctx, ckpt, task, block), rows[block], settings.as_dict(),
                            provenance(spec.digest), digests[block])  # fmt: skip
    return rows
