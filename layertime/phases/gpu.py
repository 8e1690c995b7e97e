"""A checkpoint's GPU work from ONE model load: its metrics, then each task's embeddings. The flow's
`gpu` task (tasks/units.py) and `run_spec` (`--plain`) both run it, so a checkpoint is loaded once
either way (docs/design.md §2)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from layertime.checkpoints import Checkpoint
from layertime.phases import embed, record
from layertime.phases import measure as measuring
from layertime.phases.context import Context

Logger = logging.Logger | logging.LoggerAdapter  # a Prefect task passes its run logger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointDone:
    """What a checkpoint's GPU work produced: embeddings by task (their directories), its metric rows
    (None: not measured) and what failed, by task or "measure", with the error."""

    embeddings: dict[str, str]
    metrics: list[dict] | None
    failed: dict[str, str]


def checkpoint_gpu_work(
    ctx: Context,
    ckpt: Checkpoint,
    tasks: Sequence[str],
    measure: bool,
    device: str | None = None,
    gpu_lock: contextlib.AbstractContextManager | None = None,
    contain: tuple[type[BaseException], ...] = (),
    logger: Logger = log,
) -> CheckpointDone:
    """A checkpoint's GPU work from ONE model load: its metrics (`measure`), then each of `tasks`'
    embeddings (one forward pass per unique text, all layers).

    The model is read from storage before `gpu_lock` is taken: a GPU worker running two checkpoints
    loads the next while the current one computes, and only the one computing is on the GPU (model
    loads, not scoring, idled the GPUs: benchmarks/RESULTS.md). An error of a `contain` type fails
    only its unit and the others go on; any other error (a full disk, a lost device) propagates.
    """
    blocks = measuring.gpu_blocks(ctx.plan)
    logger.info(f"loading checkpoint {ckpt.model}@{ckpt.revision} ({ckpt.commit}), blocks {blocks}")
    encoder = embed.load_encoder(ctx.spec, ckpt, blocks, ctx.settings, device)
    with gpu_lock if gpu_lock is not None else contextlib.nullcontext():
        try:
            encoder.to_device()
            return _measure_and_embed(ctx, ckpt, tasks, measure, encoder, contain, logger)
        finally:
            del encoder  # this checkpoint's GPU memory is free before the next one moves in
            release_gpu_memory()


def _measure_and_embed(
    ctx: Context,
    ckpt: Checkpoint,
    tasks: Sequence[str],
    measure: bool,
    encoder: Any,
    contain: tuple[type[BaseException], ...],
    logger: Logger,
) -> CheckpointDone:
    spec, plan = ctx.spec, ctx.plan
    embeddings, failed, metrics = {}, {}, None
    if measure:
        logger.info(
            f"measuring {ckpt.revision}: representation metrics of blocks {measuring.metrics_blocks(plan)}"
        )
        try:
            metrics = measuring.measure_unit(ctx, ckpt, encoder=encoder)
        except contain as e:
            failed["measure"] = f"{type(e).__name__}: {e}"
            logger.error(f"measure[{ckpt.revision}] failed: {failed['measure']}")
    for task in tasks:
        try:
            texts = record.task_texts(task, ctx.run, spec.aggregation, spec.hf_cache).texts
            logger.info(f"embedding {task} at {ckpt.revision}: {len(texts):,} texts, blocks {plan.blocks}")
            path = embed.embed_unit(encoder, ctx, ckpt, task, texts, list(plan.blocks))
        except contain as e:
            failed[task] = f"{type(e).__name__}: {e}"
            logger.error(f"embed[{ckpt.revision} · {task}] failed: {failed[task]}")
        else:
            embeddings[task] = str(path)
    return CheckpointDone(embeddings, metrics, failed)


def release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
