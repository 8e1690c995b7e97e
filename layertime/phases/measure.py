"""Measure: a checkpoint's representation metrics (docs/design.md §5), one streamed pass over the
layers not yet recorded, each layer's rows a completion record of its own."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from layertime import memory, records
from layertime.checkpoints import Checkpoint
from layertime.phases import embed, record
from layertime.phases.context import Context
from layertime.plan import Plan
from layertime.provenance import packages, provenance
from layertime.rundir import RunDir
from layertime.settings import settings_id
from layertime.spec import ExperimentSpec


def metrics_prompts(spec: ExperimentSpec, run: RunDir) -> tuple[str, list[str]]:
    """(corpus label, prompts) of the spec's metrics corpus (docs/design.md §5)."""
    from layertime import metrics_corpus

    m = spec.metrics
    if m.corpus == "wikitext-103":
        return f"wikitext-103[:{m.lines}]", metrics_corpus.wikitext_prompts(m.lines)
    if m.corpus == "tasks":
        prompts = [
            text
            for task in spec.tasks
            for text in metrics_corpus.task_sample(
                record.task_texts(task, run, spec.aggregation, spec.hf_cache).texts, m.sample, m.seed
            )
        ]
        return f"tasks[{m.sample}/task]", list(dict.fromkeys(prompts))
    path = Path(m.corpus)
    if not path.is_file():
        raise metrics_corpus.CorpusError(
            f"metrics.corpus: {m.corpus!r} is neither wikitext-103, tasks nor a file"
        )
    return path.name, metrics_corpus.file_prompts(path)


def metrics_blocks(plan: Plan) -> list[int]:
    """The blocks the spec's metrics are measured on: every block with `all_layers`, else the plan's."""
    return list(range(plan.num_blocks)) if plan.spec.metrics.all_layers else plan.blocks


def gpu_blocks(plan: Plan) -> list[int]:
    """The blocks one model load serves for both embedding and metrics (the metrics' blocks include
    the plan's): a checkpoint's GPU work loads it once."""
    return metrics_blocks(plan) if plan.spec.metrics is not None else list(plan.blocks)


def metrics_key(spec: ExperimentSpec) -> str:
    """What decides a layer's metric values besides its commit and encoder settings: the prompts (the
    corpus: for `tasks`, which tasks under which rule and mteb version; for a file, its content) and
    the views. Not the layer list: each layer's metrics are recorded on their own (`measure_unit`)."""
    m = spec.metrics
    corpus: dict[str, Any] = {"corpus": m.corpus, "seed": m.seed}
    if m.corpus == "wikitext-103":
        corpus["lines"] = m.lines
    elif m.corpus == "tasks":
        corpus.update(sample=m.sample, tasks=list(spec.tasks), aggregation=spec.aggregation,
                      mteb=packages()["mteb"])  # fmt: skip
    elif Path(m.corpus).is_file():
        corpus["sha256"] = hashlib.sha256(Path(m.corpus).read_bytes()).hexdigest()
    return settings_id({**corpus, "views": m.views, "lidar_views": m.lidar_views})


def metrics_ask(ctx: Context, ckpt: Checkpoint, layer: int) -> records.MetricsAsk:
    """What the metrics record of (`ckpt`, `layer`) must hold: a row per metric the spec's views ask for."""
    from layertime.measure import PER_PROMPT, metric_names

    m = ctx.spec.metrics
    return records.MetricsAsk(ckpt.model, ckpt.commit, layer, ctx.settings.encoder_settings(), metrics_key(ctx.spec),
                              frozenset(metric_names(m.views, m.lidar_views)), PER_PROMPT)  # fmt: skip


def recorded(ctx: Context, ckpt: Checkpoint, layer: int) -> list[dict] | None:
    """The rows of the layer's metrics record, or None when it has none (or a rejected one, removed)."""
    path = ctx.run.metrics_record(ctx.settings.encoder_id, ckpt, metrics_key(ctx.spec), layer)
    return records.read_metrics(path, metrics_ask(ctx, ckpt, layer))


def measure_unit(
    ctx: Context, ckpt: Checkpoint, device: str | None = None, encoder: Any = None
) -> list[dict]:
    """Metric rows of one checkpoint's layers, from one streamed pass over the layers not yet recorded.

    Each layer's rows are a completion record of their own, so a layer measured for any layer list
    (another spec, an override) is reused. `encoder`: a loaded model of this checkpoint to reuse
    (`gpu_blocks`); else one is loaded here with the missing layers only.
    """
    from layertime.measure import measure

    spec, plan, run, settings = ctx.spec, ctx.plan, ctx.run, ctx.settings
    m = spec.metrics
    blocks = metrics_blocks(plan)
    found = {b: recorded(ctx, ckpt, b) for b in blocks}
    missing = [b for b in blocks if found[b] is None]
    if not missing:
        return [row for b in blocks for row in found[b]]
    corpus, prompts = metrics_prompts(spec, run)
    start = time.perf_counter()
    if encoder is None:
        encoder = embed.load_encoder(spec, ckpt, missing, settings, device)
    elif not set(missing) <= set(encoder.layers):
        raise ValueError(f"measure: the encoder returns blocks {encoder.layers}, the metrics need {missing}")
    with memory.peak(encoder.device) as used:
        rows = [
            {"model": ckpt.model, "commit": ckpt.commit, "depth": (r["layer"] + 1) / plan.num_blocks, **r}
            for r in measure(encoder, prompts, m.views, m.lidar_views, m.seed, corpus)
        ]
    cost = records.CostRecord.seal(phase="measure", task=None, seconds=time.perf_counter() - start,
                                   device=str(encoder.device), texts=len(prompts) * (1 + max(m.views, m.lidar_views)),
                                   **used)  # fmt: skip
    records.write_cost(run.cost_record(settings.id, ckpt, "measure"), cost)
    key = metrics_key(spec)
    for b in missing:
        found[b] = [r for r in rows if r["layer"] == b]
        path = run.metrics_record(settings.encoder_id, ckpt, key, b)
        records.write_metrics(
            path, metrics_ask(ctx, ckpt, b), found[b], m.model_dump(), provenance(spec.digest)
        )
    return [row for b in blocks for row in found[b]]
