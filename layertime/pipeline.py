"""The phases of a run as plain functions: record texts, embed a unit, score it, merge the tables.

Each phase reads and writes files under the run root and can be called from a notebook, a test,
the sequential `run_spec` below, or a Prefect task (tasks/). A (checkpoint, task) unit is done when
every layer has its completion record; finished layers are skipped on re-runs, so a run resumes
where it stopped and never computes a unit twice.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from layertime import CODE_VERSION, memory, suite
from layertime.checkpoints import Checkpoint
from layertime.io import atomic_write, atomic_write_dir, atomic_write_text, save_array
from layertime.plan import Plan, make_plan
from layertime.rundir import RunDir, settings_id
from layertime.spec import ExperimentSpec

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class Settings:
    """What changes numbers, beside the checkpoint, task and layer."""

    final_norm: str
    pooling: str
    normalize: bool
    max_length: int
    dtype: str  # resolved: 'float32' on CPU for 'auto'
    code_version: str = CODE_VERSION  # a new code version never reads an older one's records

    @classmethod
    def of(cls, spec: ExperimentSpec, device: str | None = None) -> Settings:
        import torch

        from layertime.encoder import resolve_dtype

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = str(resolve_dtype(spec.dtype, dev)).removeprefix("torch.")
        return cls(spec.final_norm, spec.pooling, spec.normalize, spec.max_length, dtype, CODE_VERSION)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def id(self) -> str:
        return settings_id(self.as_dict())


def prepare_world(spec: ExperimentSpec) -> None:
    """Build the offline demo (or scale world) model into the spec's HF cache when the spec asks for it."""
    from layertime.checkpoints import hub_cache
    from layertime.demo.model import DEMO_REPO, ensure_demo_model
    from layertime.demo.scale_model import SCALE_REPO, ensure_scale_model

    if spec.model == DEMO_REPO:
        ensure_demo_model(hub_cache(spec.hf_cache))
    elif spec.model == SCALE_REPO:
        ensure_scale_model(hub_cache(spec.hf_cache))


def write_snapshot(plan: Plan, run: RunDir, settings: Settings) -> None:
    """The spec as run, the environment and the resolved commits, beside the results."""
    spec = plan.spec
    atomic_write_text(
        run.root / "spec.yaml", yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)
    )
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _packages(),
        "git_commit": _git_commit(),
        "settings": settings.as_dict(),
        "settings_id": settings.id,
        "checkpoints": {c.revision: c.commit for c in plan.checkpoints},
        "layer_convention": "layer = 0-based block index b, states hidden_states[b + 1]",
    }
    atomic_write_text(run.root / "environment.json", json.dumps(env, indent=2))


class IncompatibleRun(RuntimeError):
    """The run root holds results of another code or mteb version."""


RUN_STAMP = "layertime-run.json"  # which code version writes this run root's tables


def claim_run_root(run: RunDir, spec: ExperimentSpec, force: bool = False) -> dict:
    """Stamp the run root with this code and mteb version, refusing one that another version wrote.

    Records live under a settings id that includes CODE_VERSION, so versions never share a record;
    the stamp keeps one run root's tables and report from silently switching to other numbers.
    `force` re-stamps it: the tables are then rebuilt from this version's results only.
    """
    path = run.root / RUN_STAMP
    mine = {"code_version": CODE_VERSION, "mteb": _packages()["mteb"], "layertime": _packages()["layertime"]}
    try:
        theirs = json.loads(path.read_text())
    except FileNotFoundError:
        theirs = None
    except (OSError, ValueError) as e:
        raise IncompatibleRun(f"run root {run.root}: cannot read {path}: {e}; fix or remove it") from e
    differs = [k for k in ("code_version", "mteb") if theirs.get(k) != mine[k]] if theirs is not None else []
    if differs and not force:
        found = ", ".join(f"{k} {theirs.get(k)}" for k in differs)
        want = ", ".join(f"{k} {mine[k]}" for k in differs)
        raise IncompatibleRun(
            f"run root {run.root} holds results of {found}; this is {want}, whose numbers may "
            f"differ. Give this run another run_root, or pass --force to recompute every unit "
            f"here with this version (the tables then hold this version's results only)"
        )
    same = theirs is not None and not differs
    since = theirs.get("since") if same else time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stamp = {**mine, "spec": spec.digest, "since": since}
    atomic_write_text(path, json.dumps(stamp, indent=2))
    return stamp


def provenance(spec_digest: str) -> dict[str, Any]:
    """What produced a result, stamped into each record: versions, the spec's hash, where it ran."""
    return {
        "code_version": CODE_VERSION,
        "spec": spec_digest,
        **_packages(),
        "host": platform.node(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


@functools.cache
def _packages() -> dict[str, str | None]:
    """Versions of the packages that decide numbers (environment.json and each record's provenance)."""
    return {p: _version(p) for p in ("layertime", "torch", "transformers", "mteb", "datasets", "polars")}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def task_texts(task: str, run: RunDir, aggregation: str, hf_cache: Path | None = None) -> Any:
    """The exact texts mteb will ask for on `task` (a cached recording pass): a `TaskTexts`."""
    from layertime.bridge import recorded_texts

    return recorded_texts(task, run.texts, aggregation, hf_cache)


def missing_layers(
    run: RunDir, settings: Settings, ckpt: Checkpoint, task: str, blocks: list[int]
) -> list[int]:
    return [b for b in blocks if read_record(run.score_record(settings.id, ckpt, task, b)) is None]


def load_encoder(
    spec: ExperimentSpec, ckpt: Checkpoint, blocks: list[int], settings: Settings, device: str | None = None
) -> Any:
    """The checkpoint's MultiLayerEncoder with the spec's settings, loaded by commit when known."""
    from layertime.encoder import MultiLayerEncoder

    return MultiLayerEncoder(
        spec.model, ckpt.commit or ckpt.revision, blocks, settings.final_norm, settings.pooling,
        settings.normalize, settings.max_length, settings.dtype, device, spec.tokens_per_batch,
        str(spec.hf_cache) if spec.hf_cache else None,
    )  # fmt: skip


def embed_unit(
    encoder: Any,
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    task: str,
    texts: list[str],
    blocks: list[int],
) -> Path:
    """Embed one (checkpoint, task) unit with every requested layer; write texts.json + layer_<b>.npy.

    The unit's directory appears whole or not at all (io.atomic_write_dir): a write that fails (a full
    disk) removes its temp directory and names the path, and the temp of a writer killed earlier is
    removed by the next one.
    """
    target = run.embeddings(settings.id, ckpt, task)
    cost_record = run.cost_record(settings.id, ckpt, f"embed__{task}")
    if embeddings_ok(target, blocks):
        if not cost_record.is_file():  # killed between the two writes: the manifest holds the cost
            manifest = json.loads((target / "done.json").read_text())
            atomic_write_text(cost_record, json.dumps({k: v for k, v in manifest.items() if k != "files"}))
        return target
    start = time.perf_counter()
    with memory.peak(encoder.device) as used:
        vectors = encoder.encode(texts)
    cost = {"phase": "embed", "task": task, "seconds": time.perf_counter() - start, "device": str(encoder.device),
            **used, **(encoder.last_stats.__dict__ if encoder.last_stats else {})}  # fmt: skip

    def write(tmp: Path) -> None:
        (tmp / "texts.json").write_text(json.dumps(texts))
        for b in blocks:
            save_array(tmp / f"layer_{b}.npy", vectors[b])  # a full disk says ENOSPC
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / "done.json").write_text(json.dumps({**cost, "files": sizes}))  # the manifest, written last

    atomic_write_dir(target, write)
    atomic_write_text(cost_record, json.dumps(cost))  # outlives cleanup
    return target


def embeddings_ok(path: Path, blocks: list[int]) -> bool:
    """True when the unit's manifest (done.json, written last) lists every file at its size."""
    try:
        files = json.loads((path / "done.json").read_text())["files"]
        return all(
            (path / name).stat().st_size == files[name]
            for name in ["texts.json", *(f"layer_{b}.npy" for b in blocks)]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_embeddings(path: Path, block: int) -> tuple[list[str], np.ndarray]:
    return json.loads((path / "texts.json").read_text()), np.load(path / f"layer_{block}.npy")


def read_record(path: Path) -> list[dict] | None:
    """The rows of a completion record; None when there is none, or it is damaged (then it is removed,
    so the unit is computed again instead of merged half-read)."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    return rows if isinstance(rows, list) else None


def score_unit(
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    task: str,
    blocks: list[int],
    embeddings: Path | None,
    aggregation: str,
    num_blocks: int,
    hf_cache: Path | None = None,
    spec_digest: str | None = None,
) -> dict[int, list[dict]]:
    """Rows per layer of one unit: recorded layers are read back, the others scored with mteb.

    Each newly scored layer gets its completion record, written last, stamped with `provenance`.
    Rows carry the measured cost: mteb's evaluation seconds and the scoring process's peak memory.
    """
    from layertime.bridge import model_meta, score_layers

    recorded = {b: read_record(run.score_record(settings.id, ckpt, task, b)) for b in blocks}
    rows = {b: r for b, r in recorded.items() if r is not None}
    todo = [b for b in blocks if b not in rows]
    if not todo:
        return rows
    if embeddings is None or not embeddings_ok(embeddings, todo):
        raise FileNotFoundError(
            f"embeddings of {ckpt.revision} · {task} are missing or damaged at {embeddings}"
        )

    def meta(block: int) -> Any:
        dim = int(np.load(embeddings / f"layer_{block}.npy", mmap_mode="r").shape[1])
        return model_meta(ckpt.model, ckpt.key, dim, {"layer": block, **settings.as_dict()})

    layers = ((b, load_embeddings(embeddings, b)) for b in todo)
    for block, subsets in score_layers(task, layers, meta, run.mteb_results, aggregation, hf_cache).items():
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
        record = {"settings": settings.as_dict(), "provenance": provenance(spec_digest), "rows": rows[block]}
        atomic_write_text(run.score_record(settings.id, ckpt, task, block), json.dumps(record))
    return rows


def metrics_prompts(spec: ExperimentSpec, run: RunDir) -> tuple[str, list[str]]:
    """(corpus label, prompts) of the spec's metrics corpus (DESIGN §5)."""
    from layertime import metrics_corpus

    m = spec.metrics
    if m.corpus == "wikitext-103":
        return f"wikitext-103[:{m.lines}]", metrics_corpus.wikitext_prompts(m.lines)
    if m.corpus == "tasks":
        prompts = [
            text
            for task in spec.tasks
            for text in metrics_corpus.task_sample(
                task_texts(task, run, spec.aggregation, spec.hf_cache).texts, m.sample, m.seed
            )
        ]
        return f"tasks[{m.sample}/task]", list(dict.fromkeys(prompts))
    path = Path(m.corpus)
    if not path.is_file():
        raise FileNotFoundError(f"metrics.corpus: {m.corpus!r} is neither wikitext-103, tasks nor a file")
    return path.name, metrics_corpus.file_prompts(path)


def metrics_blocks(spec: ExperimentSpec, plan: Plan) -> list[int]:
    return list(range(plan.num_blocks)) if spec.metrics.all_layers else plan.blocks


def gpu_blocks(spec: ExperimentSpec, plan: Plan) -> list[int]:
    """The blocks one model load serves for both embedding and metrics (the metrics' blocks include
    the plan's): a checkpoint's GPU work loads it once."""
    return metrics_blocks(spec, plan) if spec.metrics is not None else list(plan.blocks)


def metrics_key(spec: ExperimentSpec, plan: Plan) -> str:
    """What decides a checkpoint's metric values besides its commit and settings: metrics spec, layers."""
    return settings_id({**spec.metrics.model_dump(), "blocks": metrics_blocks(spec, plan)})


def measure_unit(
    spec: ExperimentSpec,
    plan: Plan,
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    device: str | None = None,
    encoder: Any = None,
) -> list[dict]:
    """Metric rows of one checkpoint, all its layers from one streamed pass; recorded, so done once.

    `encoder`: a loaded model of this checkpoint to reuse (`gpu_blocks`); else one is loaded here.
    """
    from layertime.measure import measure

    m = spec.metrics
    blocks = metrics_blocks(spec, plan)
    record = run.metrics_record(settings.id, ckpt, metrics_key(spec, plan))
    if (rows := read_record(record)) is not None:
        return rows
    corpus, prompts = metrics_prompts(spec, run)
    start = time.perf_counter()
    if encoder is None:
        encoder = load_encoder(spec, ckpt, blocks, settings, device)
    elif encoder.layers != blocks:
        raise ValueError(f"measure: the encoder returns blocks {encoder.layers}, the metrics need {blocks}")
    with memory.peak(encoder.device) as used:
        rows = [
            {"model": ckpt.model, "commit": ckpt.commit, "depth": (r["layer"] + 1) / plan.num_blocks, **r}
            for r in measure(encoder, prompts, m.views, m.lidar_views, m.seed, corpus)
        ]
    cost = {"phase": "measure", "task": None, "seconds": time.perf_counter() - start, "device": str(encoder.device),
            "texts": len(prompts) * (1 + max(m.views, m.lidar_views)), **used}  # fmt: skip
    atomic_write_text(run.cost_record(settings.id, ckpt, "measure"), json.dumps(cost))
    stamp = {"settings": settings.as_dict(), "metrics": m.model_dump(), "provenance": provenance(spec.digest)}
    atomic_write_text(record, json.dumps({**stamp, "rows": rows}))
    return rows


def recorded_rows(plan: Plan, run: RunDir, settings: Settings) -> dict[tuple[str, str, int], list[dict]]:
    """Rows of every completion record of the plan, by (checkpoint key, task, layer)."""
    rows = {}
    for ckpt in plan.distinct_checkpoints():
        for task in plan.tasks:
            for block in plan.blocks:
                record = run.score_record(settings.id, ckpt, task, block)
                if (found := read_record(record)) is not None:
                    rows[(ckpt.key, task, block)] = found
    return rows


def recorded_metrics(plan: Plan, run: RunDir, settings: Settings) -> dict[str, list[dict]]:
    """Metric rows of every checkpoint of the plan measured so far, by checkpoint key."""
    spec = plan.spec
    if spec.metrics is None:
        return {}
    key = metrics_key(spec, plan)
    found = {}
    for ckpt in plan.distinct_checkpoints():
        record = run.metrics_record(settings.id, ckpt, key)
        if (rows := read_record(record)) is not None:
            found[ckpt.key] = rows
    return found


def merge(
    plan: Plan,
    run: RunDir,
    settings: Settings,
    rows: dict[tuple[str, str, int], list[dict]] | None = None,
    metric_rows: dict[str, list[dict]] | None = None,
) -> dict[str, Path]:
    """Write the tables from `rows` and `metric_rows` (default: the completion records).

    Revisions sharing a commit (main and step143000) share rows but both appear, under their names.
    """
    from layertime import tables

    rows = recorded_rows(plan, run, settings) if rows is None else rows
    metric_rows = recorded_metrics(plan, run, settings) if metric_rows is None else metric_rows
    flat = [
        {**row, "revision": ckpt.revision, "step": ckpt.step}
        for ckpt in plan.checkpoints
        for task in plan.tasks
        for block in plan.blocks
        for row in rows.get((ckpt.key, task, block), [])
    ]
    scores = tables.scores_frame(flat)
    measured = tables.metrics_frame(
        [
            {**r, "revision": c.revision, "step": c.step}
            for c in plan.checkpoints
            for r in metric_rows.get(c.key, [])
        ]
    )
    out: dict[str, Path] = {}
    out["scores"] = tables.write_table(scores, run.tables, "scores")[0]
    out["metrics"] = tables.write_table(measured, run.tables, "metrics")[0]
    costs = [
        {**json.loads(p.read_text()), "model": ckpt.model, "commit": ckpt.commit, "revision": ckpt.revision}
        for ckpt in plan.distinct_checkpoints()  # GPU work is per commit: counted once
        for p in run.cost_records(settings.id, ckpt)
    ]
    out["costs"] = tables.write_table(tables.costs_frame(costs), run.tables, "costs")[0]
    layers = tables.with_metrics(tables.layers_frame(scores, len(plan.tasks)), measured)
    out["layers"] = tables.write_table(layers, run.tables, "layers")[0]
    summary = tables.summary_frame(scores, str(run.root))
    out["summary"] = atomic_write(run.tables / "summary.csv", lambda tmp: summary.write_csv(tmp))
    return out


@dataclass
class RunResult:
    run_root: Path
    tables: dict[str, Path]
    scored: int  # (checkpoint, task, layer) units computed now
    skipped: int  # units already done before this run
    texts_requested: int  # texts mteb asks for, per evaluation of every task once
    texts_embedded: int  # texts forwarded through the model, all checkpoints


def run_spec(
    spec: ExperimentSpec, progress: Progress | None = None, device: str | None = None, force: bool = False
) -> RunResult:
    """Run a whole spec in this process: plan, record texts, embed and score each unit, merge.

    Resumable: units with completion records are skipped; embeddings are deleted once every layer
    of their unit is scored, unless `keep_embeddings`. A run root another code version wrote is
    refused unless `force` (`claim_run_root`).
    """
    prepare_world(spec)
    plan = make_plan(spec, strict=True)  # a missing checkpoint fails here, before any work
    run = RunDir.of(spec.run_root, spec.store)
    with run.lock():
        claim_run_root(run, spec, force)
        return _run_locked(spec, plan, run, progress, device)


def _run_locked(
    spec: ExperimentSpec, plan: Plan, run: RunDir, progress: Progress | None, device: str | None
) -> RunResult:
    settings = Settings.of(spec, device)
    write_snapshot(plan, run, settings)
    texts = {t: task_texts(t, run, spec.aggregation, spec.hf_cache) for t in plan.tasks}
    units = [(c, t) for c in plan.distinct_checkpoints() for t in plan.tasks]
    scored = skipped = embedded = 0
    for i, ckpt in enumerate(plan.distinct_checkpoints()):
        encoder = None
        for task in plan.tasks:
            todo = missing_layers(run, settings, ckpt, task, plan.blocks)
            skipped += len(plan.blocks) - len(todo)
            if todo:
                if encoder is None:  # load a checkpoint only when it has work left
                    encoder = load_encoder(spec, ckpt, plan.blocks, settings, device)
                path = embed_unit(encoder, run, settings, ckpt, task, texts[task].texts, plan.blocks)
                embedded += len(texts[task].texts)
                num_blocks = encoder.anatomy.num_blocks
                score_unit(run, settings, ckpt, task, todo, path, spec.aggregation, num_blocks, spec.hf_cache,
                           spec.digest)  # fmt: skip
                scored += len(todo)
                if not spec.keep_embeddings:
                    shutil.rmtree(path, ignore_errors=True)
            if progress:
                progress("units", i * len(plan.tasks) + plan.tasks.index(task) + 1, len(units))
    if spec.metrics is not None:
        for ckpt in plan.distinct_checkpoints():
            measure_unit(spec, plan, run, settings, ckpt, device)
    paths = merge(plan, run, settings)
    return RunResult(run.root, paths, scored, skipped, sum(v.requested for v in texts.values()), embedded)
