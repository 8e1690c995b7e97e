"""Score: mteb main scores of a (checkpoint, task) unit's layers from its stored embeddings, each layer
an evaluation of its own with its own completion record (docs/design.md §4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from layertime import records, suite
from layertime.checkpoints import Checkpoint
from layertime.errors import Permanent
from layertime.io import atomic_write_text
from layertime.phases.context import Context
from layertime.provenance import provenance


class MissingEmbeddings(Permanent, FileNotFoundError):
    """A unit's embeddings are not on disk (or damaged) when it is scored: scoring again cannot make them."""


def missing_layers(ctx: Context, ckpt: Checkpoint, task: str, blocks: list[int]) -> list[int]:
    """The layers of `blocks` without a valid completion record for (`ckpt`, `task`)."""
    return [
        b for b in blocks if records.read_record(ctx.run.score_record(ctx.settings.id, ckpt, task, b)) is None
    ]


def score_unit(
    ctx: Context, ckpt: Checkpoint, task: str, blocks: list[int], embeddings: Path | None
) -> dict[int, list[dict]]:
    """Rows per layer of one unit: recorded layers are read back, the others scored with mteb.

    Each newly scored layer gets its completion record, written last, stamped with `provenance`.
    Rows carry the measured cost: mteb's evaluation seconds and the scoring process's peak memory.
    """
    from layertime.bridge import model_meta, score_layers

    run, settings, spec = ctx.run, ctx.settings, ctx.spec
    recorded = {b: records.read_record(run.score_record(settings.id, ckpt, task, b)) for b in blocks}
    rows = {b: r for b, r in recorded.items() if r is not None}
    todo = [b for b in blocks if b not in rows]
    if not todo:
        return rows
    if embeddings is None or not records.embeddings_ok(embeddings, todo):
        raise MissingEmbeddings(
            f"embeddings of {ckpt.revision} · {task} are missing or damaged at {embeddings}"
        )

    def meta(block: int) -> Any:
        dim = int(np.load(embeddings / f"layer_{block}.npy", mmap_mode="r").shape[1])
        return model_meta(ckpt.model, ckpt.key, dim, {"layer": block, **settings.as_dict()})

    num_blocks = ctx.plan.num_blocks
    layers = ((b, records.load_embeddings(embeddings, b)) for b in todo)
    scored = score_layers(task, layers, meta, run.mteb_results, spec.aggregation, spec.hf_cache)
    for block, subsets in scored.items():
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
        record = {"settings": settings.as_dict(), "provenance": provenance(spec.digest), "rows": rows[block]}
        atomic_write_text(run.score_record(settings.id, ckpt, task, block), json.dumps(record))
    return rows
