"""Embed: one (checkpoint, task) unit's texts through the model, every requested layer from one forward
pass per unique text, written to the store beside what other runs may be reading (docs/design.md §7)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from layertime import claims, memory, records
from layertime.checkpoints import Checkpoint
from layertime.io import atomic_add_files, atomic_write_text, save_array
from layertime.phases.context import Context
from layertime.settings import Settings
from layertime.spec import ExperimentSpec


def load_encoder(
    spec: ExperimentSpec, ckpt: Checkpoint, blocks: list[int], settings: Settings, device: str | None = None
) -> Any:
    """The checkpoint's MultiLayerEncoder with the spec's settings, loaded by commit when known.

    On the settings' device type and token budget: they are part of the key its embeddings are kept
    under, so a worker cannot file numbers of another device under it."""
    from layertime.encoder import MultiLayerEncoder

    return MultiLayerEncoder(
        spec.model, ckpt.commit or ckpt.revision, blocks, settings.final_norm, settings.pooling,
        settings.normalize, settings.max_length, settings.dtype, device or settings.device, settings.tokens_per_batch,
        str(spec.hf_cache) if spec.hf_cache else None,
    )  # fmt: skip


def embed_unit(
    encoder: Any, ctx: Context, ckpt: Checkpoint, task: str, texts: list[str], blocks: list[int]
) -> Path:
    """Embed one (checkpoint, task) unit with every requested layer; write texts.json + layer_<b>.npy.

    The store is shared: another run may be reading this unit's files. So the layers it lacks are
    added beside the valid ones, which are never replaced (io.atomic_add_files), and the manifest
    (done.json, listing every valid file) is rewritten last; writers of one unit take turns
    (claims.writing), and a unit written meanwhile by another run is not embedded again. A write
    that fails (a full disk) removes its temp directory and names the path; the temp of a writer
    killed earlier is removed by the next one. The caller holds a claim on the unit when other runs
    may delete it (layertime/claims.py).
    """
    target = ctx.run.embeddings(ctx.settings.id, ckpt, task)
    cost_record = ctx.run.cost_record(ctx.settings.id, ckpt, f"embed__{task}")
    if not records.embeddings_ok(target, blocks):
        with claims.writing(target):
            if not records.embeddings_ok(target, blocks):  # another run may have written them meanwhile
                cost = _embed_beside(encoder, target, task, texts, blocks)
                atomic_write_text(cost_record, json.dumps(cost))  # outlives cleanup
                return target
    # Killed between the two writes, or the cost record is damaged: the manifest has the cost.
    if records.read_cost(cost_record) is None:
        manifest = json.loads((target / "done.json").read_text())
        atomic_write_text(cost_record, json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    return target


def _embed_beside(encoder: Any, target: Path, task: str, texts: list[str], blocks: list[int]) -> dict:
    """Encode `texts` and write the files of `blocks` that `target` lacks, then the manifest; the cost."""
    valid = records.valid_files(target)
    if not records.same_texts(target / "texts.json", texts):
        valid = {}  # another text set under this key: every file is rewritten
    # A layer file of the right size with a damaged header is rewritten too.
    valid = {
        n: size
        for n, size in valid.items()
        if not n.endswith(".npy") or records.array_ok(target / n, len(texts))
    }
    start = time.perf_counter()
    with memory.peak(encoder.device) as used:
        vectors = encoder.encode(texts)
    cost = {"phase": "embed", "task": task, "seconds": time.perf_counter() - start, "device": str(encoder.device),
            **used, **(encoder.last_stats.__dict__ if encoder.last_stats else {})}  # fmt: skip

    def write(tmp: Path) -> None:
        if "texts.json" not in valid:
            (tmp / "texts.json").write_text(json.dumps(texts))
        for b in blocks:
            if f"layer_{b}.npy" not in valid:
                save_array(tmp / f"layer_{b}.npy", vectors[b])  # a full disk says ENOSPC

    added = atomic_add_files(target, write)
    atomic_write_text(target / "done.json", json.dumps({**cost, "files": {**valid, **added}}))  # last
    return cost
