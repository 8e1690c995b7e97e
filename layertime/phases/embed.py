"""Embed: one (checkpoint, task) unit's texts through the model, every requested layer from one forward
pass per unique text, written to the store beside what other runs may be reading (docs/design.md §7)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from layertime import claims, memory, records
from layertime.checkpoints import Checkpoint
from layertime.io import atomic_add_files, save_array
from layertime.phases.context import Context
from layertime.settings import Settings
from layertime.spec import ExperimentSpec

log = logging.getLogger(__name__)


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

    The files already there are checked first (records.check_embeddings: their digests and shapes
    against the manifest, the unit's checkpoint, task and texts, finite values); a rejected one is
    logged (one line per file) and written again, so damaged embeddings heal here, before scoring.
    The store is shared: another run may be reading this unit's files. So the layers it lacks are
    added beside the valid ones, which are never replaced (io.atomic_add_files), and the manifest
    (done.json, listing every valid file with its digest) is rewritten last; writers of one unit take
    turns (claims.writing), and a unit written meanwhile by another run is not embedded again. A
    write that fails (a full disk) removes its temp directory and names the path; the temp of a
    writer killed earlier is removed by the next one. The caller holds a claim on the unit when other
    runs may delete it (layertime/claims.py).
    """
    target = ctx.run.embeddings(ctx.settings.id, ckpt, task)
    cost_record = ctx.run.cost_record(ctx.settings.id, ckpt, f"embed__{task}")
    ask = records.EmbeddingsAsk.of(ckpt.model, ckpt.commit, task, texts)
    found = records.check_embeddings(target, ask)
    if not found.holds(blocks):
        with claims.writing(target):
            found = records.check_embeddings(target, ask)  # another run may have written them meanwhile
            if not found.holds(blocks):
                needed = {"done.json", "texts.json", *map(records.layer_file, blocks)}
                for name, why in found.rejected.items():  # one line per rejected file
                    then = "embedded again" if name in needed else "left out of the manifest"
                    log.warning(f"rejected {target / name}: {why}; {then}")
                cost = _embed_beside(encoder, target, ask, texts, blocks, found.good)
                records.write_cost(cost_record, cost)  # outlives cleanup
                return target
    # Killed between the two writes, or the cost record is damaged: the manifest has the cost.
    if records.read_cost(cost_record) is None:
        records.write_cost(cost_record, found.manifest.cost)
    return target


def _embed_beside(
    encoder: Any,
    target: Path,
    ask: records.EmbeddingsAsk,
    texts: list[str],
    blocks: list[int],
    good: dict[str, records.EmbeddingFile],
) -> records.CostRecord:
    """Encode `texts` and write the files of `blocks` that `target` lacks (beside the `good` ones),
    then the manifest; the cost."""
    start = time.perf_counter()
    with memory.peak(encoder.device) as used:
        vectors = encoder.encode(texts)
    stats = encoder.last_stats.__dict__ if encoder.last_stats else {}
    cost = records.CostRecord.seal(phase="embed", task=ask.task, seconds=time.perf_counter() - start,
                                   device=str(encoder.device), **used, **stats)  # fmt: skip
    written: dict[str, records.EmbeddingFile] = {}

    def write(tmp: Path) -> None:
        written.clear()  # the entries of the files this temp directory holds
        if "texts.json" not in good:
            (tmp / "texts.json").write_text(json.dumps(texts))
            written["texts.json"] = records.embedding_file(tmp / "texts.json", None, len(texts), None)
        for b in blocks:
            name = records.layer_file(b)
            if name not in good:
                save_array(tmp / name, vectors[b])  # a full disk says ENOSPC
                written[name] = records.embedding_file(tmp / name, b, *vectors[b].shape)

    atomic_add_files(target, write)
    manifest = records.EmbeddingsManifest.seal(
        model=ask.model, commit=ask.commit, task=ask.task, texts_sha256=ask.texts_sha256, texts=ask.texts,
        files={**good, **written}, cost=cost,
    )  # fmt: skip
    records.write_manifest(target, manifest)  # last
    return cost
