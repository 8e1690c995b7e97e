"""The phases of a run as plain functions: record texts, embed a unit, score it, merge the tables.

Each phase reads and writes files under the run root and can be called from a notebook, a test,
the sequential `run_spec` below, or a Prefect task (tasks/). A (checkpoint, task) unit is done when
every layer has its completion record; finished layers are skipped on re-runs, so a run resumes
where it stopped and never computes a unit twice. The completion records are the only truth for
"done": the tables are merged from them, whoever ran the units.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from layertime import CODE_VERSION, claims, memory, suite
from layertime.checkpoints import Checkpoint
from layertime.demo.world import prepare_world
from layertime.errors import Permanent
from layertime.io import atomic_add_files, atomic_write, atomic_write_text, save_array
from layertime.plan import Plan, make_plan
from layertime.rundir import RunDir, read_cost, settings_id
from layertime.spec import ExperimentSpec

Progress = Callable[[str, int, int], None]  # (phase, done, total)
Logger = logging.Logger | logging.LoggerAdapter  # a Prefect task passes its run logger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything that changes a number beside the checkpoint, task and layer: a unit's identity.

    Embedding: final norm, pooling, normalisation, max length, the resolved dtype, the token budget
    (it sets the batches, and a batch's shape moves float32 results by ~1e-7) and the device type
    (float32 on a GPU gives other bits than on a CPU). Scoring: the aggregation rule (the subsets
    scored) and the mteb version (its tasks' dataset revisions, subsets, splits and scoring code).
    Both: our code version. `tests/test_keys.py` places every spec field: a new one fails it until
    it is either in here or in the unit's path.
    """

    final_norm: str
    pooling: str
    normalize: bool
    max_length: int
    dtype: str  # resolved: 'float32' on CPU for 'auto'
    tokens_per_batch: int
    device: str  # 'cpu' or 'cuda': where the embeddings are computed
    aggregation: str  # 'rule-a' or 'mteb-v1': which subsets are scored
    mteb: str  # mteb's version
    code_version: str = CODE_VERSION  # a new code version never reads an older one's records

    @classmethod
    def of(cls, spec: ExperimentSpec, device: str | None = None) -> Settings:
        import torch

        from layertime.encoder import resolve_dtype

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = str(resolve_dtype(spec.dtype, dev)).removeprefix("torch.")
        return cls(spec.final_norm, spec.pooling, spec.normalize, spec.max_length, dtype, spec.tokens_per_batch,
                   dev.type, spec.aggregation, _packages()["mteb"] or "none", CODE_VERSION)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def id(self) -> str:
        """Scores, embeddings (their texts depend on the subsets) and costs are stored under it."""
        return settings_id(self.as_dict())

    @property
    def encoder_id(self) -> str:
        """What decides a vector: metrics are stored under it (they never see mteb or the subsets)."""
        return settings_id({k: v for k, v in self.as_dict().items() if k not in ("aggregation", "mteb")})


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


class MissingEmbeddings(Permanent, FileNotFoundError):
    """A unit's embeddings are not on disk (or damaged) when it is scored: scoring again cannot make them."""


class IncompatibleRun(RuntimeError):
    """The run root holds results of another code or mteb version."""


RUN_STAMP = "layertime-run.json"  # which code version writes this run root's tables


def claim_run_root(run: RunDir, spec: ExperimentSpec, force: bool = False, plan: Plan | None = None) -> dict:
    """Stamp the run root with this code and mteb version and the spec's grid, refusing a run root that
    another version or another grid wrote.

    Records live under a settings id that includes CODE_VERSION, so versions never share a record;
    the stamp keeps one run root's tables and report from silently switching to other numbers, or to
    another grid: a spec (or a flow's `overrides`) that drops revisions, layers or tasks, or changes a
    setting, is refused with the fix; one that only adds to the grid goes ahead (its tables grow).
    `force` re-stamps it: the tables are then rebuilt from this version's results and this grid only.
    """
    path = run.root / RUN_STAMP
    grid = _grid(spec, plan or make_plan(spec, resolve=False))
    mine = {"code_version": CODE_VERSION, "mteb": _packages()["mteb"], "layertime": _packages()["layertime"]}
    try:
        theirs = json.loads(path.read_text())
    except FileNotFoundError:
        theirs = None
    except (OSError, ValueError) as e:
        raise IncompatibleRun(f"run root {run.root}: cannot read {path}: {e}; fix or remove it") from e
    if theirs is not None and not isinstance(theirs, dict):
        raise IncompatibleRun(f"run root {run.root}: {path} is not a run stamp; fix or remove it")
    differs = [k for k in ("code_version", "mteb") if theirs.get(k) != mine[k]] if theirs is not None else []
    if differs and not force:
        found = ", ".join(f"{k} {theirs.get(k)}" for k in differs)
        want = ", ".join(f"{k} {mine[k]}" for k in differs)
        raise IncompatibleRun(
            f"run root {run.root} holds results of {found}; this is {want}, whose numbers may "
            f"differ. Give this run another run_root, or pass --force to recompute every unit "
            f"here with this version (the tables then hold this version's results only)"
        )
    changes = _grid_changes(theirs.get("grid"), grid) if theirs is not None and not differs else []
    if changes and not force:
        raise IncompatibleRun(
            f"run root {run.root} holds another grid: {'; '.join(changes)}. Running here would replace "
            f"its tables and spec.yaml. Give this run a run_root of its own (the spec's run_root, or "
            f'the flow\'s overrides {{"run_root": "{run.root}-{settings_id(grid)[:6]}"}}): units already '
            f"in the store are reused, not computed again. Or pass --force (flow parameter force=true) "
            f"to replace this run root's tables with this spec's"
        )
    same = theirs is not None and not differs
    since = theirs.get("since") if same else time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stamp = {**mine, "spec": spec.digest, "since": since, "grid": grid}
    atomic_write_text(path, json.dumps(stamp, indent=2))
    return stamp


_GROWS = ("checkpoints", "layers", "tasks")  # a spec may add rows to a run root's tables, never drop any
_MEANING = (
    "model",
    "final_norm",
    "pooling",
    "normalize",
    "max_length",
    "dtype",
    "tokens_per_batch",
    "aggregation",
)


def _grid(spec: ExperimentSpec, plan: Plan) -> dict[str, Any]:
    """What a run root's tables hold: their rows (revisions, blocks, tasks) and what each number means."""
    return {
        "checkpoints": list(spec.checkpoints),
        "layers": list(plan.blocks),
        "tasks": list(spec.tasks),
        **{k: getattr(spec, k) for k in _MEANING},
        "metrics": spec.metrics.model_dump() if spec.metrics is not None else None,
    }


def _grid_changes(theirs: dict[str, Any] | None, mine: dict[str, Any]) -> list[str]:
    """How `mine` departs from the grid a run root holds, beyond adding rows (none for an older stamp)."""
    if not isinstance(theirs, dict):
        return []
    changes = []
    for k, want in mine.items():
        held = theirs.get(k)
        if k in _GROWS:
            grows = isinstance(held, list) and set(held) <= set(want)
        else:
            grows = held == want or (k == "metrics" and held is None)  # metrics added: the tables gain them
        if not grows:
            changes.append(f"it holds {k} {_show(held)}, this spec asks for {k} {_show(want)}")
    return changes


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | str) else str(value)


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
    encoder: Any,
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    task: str,
    texts: list[str],
    blocks: list[int],
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
    target = run.embeddings(settings.id, ckpt, task)
    cost_record = run.cost_record(settings.id, ckpt, f"embed__{task}")
    if not embeddings_ok(target, blocks):
        with claims.writing(target):
            if not embeddings_ok(target, blocks):  # another run may have written them meanwhile
                cost = _embed_beside(encoder, target, task, texts, blocks)
                atomic_write_text(cost_record, json.dumps(cost))  # outlives cleanup
                return target
    if read_cost(cost_record) is None:  # killed between the two writes, or damaged: the manifest has it
        manifest = json.loads((target / "done.json").read_text())
        atomic_write_text(cost_record, json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    return target


def _embed_beside(encoder: Any, target: Path, task: str, texts: list[str], blocks: list[int]) -> dict:
    """Encode `texts` and write the files of `blocks` that `target` lacks, then the manifest; the cost."""
    valid = valid_files(target)
    if not _same_texts(target / "texts.json", texts):
        valid = {}  # another text set under this key: every file is rewritten
    # A layer file of the right size with a damaged header is rewritten too.
    valid = {
        n: size for n, size in valid.items() if not n.endswith(".npy") or _array_ok(target / n, len(texts))
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


def valid_files(path: Path) -> dict[str, int]:
    """{name: size} of the files the unit's manifest (done.json, written last) lists that are on disk
    at that size; {} without a readable manifest."""
    try:
        files = dict(json.loads((path / "done.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: size for name, size in files.items() if _size(path / name) == size}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _same_texts(path: Path, texts: list[str]) -> bool:
    try:
        return json.loads(path.read_text()) == texts
    except (OSError, ValueError):
        return False


def embeddings_ok(path: Path, blocks: list[int]) -> bool:
    """True when the unit's manifest (done.json, written last) lists every file at its size, the texts
    read back as a list of texts and each layer's array header is a float32 matrix with a row per text.

    Checked, not trusted: a file of the right size with a damaged header would fail its unit at
    scoring on every run; here it only sends the unit back to be embedded.
    """
    valid = valid_files(path)
    if not all(name in valid for name in ["texts.json", *(f"layer_{b}.npy" for b in blocks)]):
        return False
    try:
        texts = json.loads((path / "texts.json").read_text())
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return False
    except (OSError, ValueError):
        return False
    return all(_array_ok(path / f"layer_{b}.npy", len(texts)) for b in blocks)


def _array_ok(path: Path, rows: int) -> bool:
    """True when `path` reads back as a float32 matrix of `rows` rows (its header, memory-mapped)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return array.dtype == np.float32 and array.ndim == 2 and array.shape[0] == rows


def load_embeddings(path: Path, block: int) -> tuple[list[str], np.ndarray]:
    return json.loads((path / "texts.json").read_text()), np.load(path / f"layer_{block}.npy")


_ROW_FIELDS = {
    "scores": {"layer": int, "task": str, "subset": str, "split": str, "main_score": float | int},
    "metrics": {"layer": int, "metric": str, "normalization": str, "value": float | int},
}


def read_record(path: Path) -> list[dict] | None:
    """The rows of a completion record; None when there is none, or it is damaged (then it is removed,
    so the unit is computed again instead of merged half-read).

    Checked, not trusted: a JSON object whose `rows` are a non-empty list of rows with the fields of
    their kind (scores or metrics, by the record's place in the store), of the layer its name says
    (`layer_<b>.json`) and, for scores, of the task its folder names.
    """
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = None
    rows = record.get("rows") if isinstance(record, dict) else None
    if _rows_ok(path, rows):
        return rows
    path.unlink(missing_ok=True)
    return None


def _rows_ok(path: Path, rows: Any) -> bool:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return False
    # <store>/<kind>/<settings>/<model>/<commit>/<task or metrics key>/layer_<b>.json (rundir)
    kind = path.parts[-6] if len(path.parts) >= 6 else None
    fields = _ROW_FIELDS.get(kind, {"layer": int})
    if not all(
        isinstance(r.get(k), t) and not isinstance(r.get(k), bool) for r in rows for k, t in fields.items()
    ):
        return False
    name = path.stem.removeprefix("layer_")
    if path.stem.startswith("layer_") and name.isdigit() and any(r["layer"] != int(name) for r in rows):
        return False
    return kind != "scores" or all(r["task"] == path.parent.name for r in rows)


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
        raise MissingEmbeddings(
            f"embeddings of {ckpt.revision} · {task} are missing or damaged at {embeddings}"
        )

    def meta(block: int) -> Any:
        dim = int(np.load(embeddings / f"layer_{block}.npy", mmap_mode="r").shape[1])
        return model_meta(ckpt.model, ckpt.key, dim, {"layer": block, **settings.as_dict()})

    layers = ((b, load_embeddings(embeddings, b)) for b in todo)
    for block, subsets in score_layers(task, layers, meta, run.mteb_results, aggregation, hf_cache).items():
        rows[block] = record_scores(run, settings, ckpt, task, block, subsets, num_blocks, spec_digest)
    return rows


def record_scores(
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    task: str,
    block: int,
    subsets: list[Any],
    num_blocks: int,
    spec_digest: str | None,
) -> list[dict]:
    """One scored layer's rows (`subsets`: bridge.SubsetScore), written as its completion record (last)."""
    rows = [
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
    record = {"settings": settings.as_dict(), "provenance": provenance(spec_digest), "rows": rows}
    atomic_write_text(run.score_record(settings.id, ckpt, task, block), json.dumps(record))
    return rows


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
                task_texts(task, run, spec.aggregation, spec.hf_cache).texts, m.sample, m.seed
            )
        ]
        return f"tasks[{m.sample}/task]", list(dict.fromkeys(prompts))
    path = Path(m.corpus)
    if not path.is_file():
        raise metrics_corpus.CorpusError(
            f"metrics.corpus: {m.corpus!r} is neither wikitext-103, tasks nor a file"
        )
    return path.name, metrics_corpus.file_prompts(path)


def metrics_blocks(spec: ExperimentSpec, plan: Plan) -> list[int]:
    return list(range(plan.num_blocks)) if spec.metrics.all_layers else plan.blocks


def gpu_blocks(spec: ExperimentSpec, plan: Plan) -> list[int]:
    """The blocks one model load serves for both embedding and metrics (the metrics' blocks include
    the plan's): a checkpoint's GPU work loads it once."""
    return metrics_blocks(spec, plan) if spec.metrics is not None else list(plan.blocks)


def metrics_key(spec: ExperimentSpec, plan: Plan | None = None) -> str:
    """What decides a layer's metric values besides its commit and encoder settings: the prompts (the
    corpus: for `tasks`, which tasks under which rule and mteb version; for a file, its content) and
    the views. Not the layer list: each layer's metrics are recorded on their own (`measure_unit`)."""
    m = spec.metrics
    corpus: dict[str, Any] = {"corpus": m.corpus, "seed": m.seed}
    if m.corpus == "wikitext-103":
        corpus["lines"] = m.lines
    elif m.corpus == "tasks":
        corpus.update(sample=m.sample, tasks=list(spec.tasks), aggregation=spec.aggregation,
                      mteb=_packages()["mteb"])  # fmt: skip
    elif Path(m.corpus).is_file():
        corpus["sha256"] = hashlib.sha256(Path(m.corpus).read_bytes()).hexdigest()
    return settings_id({**corpus, "views": m.views, "lidar_views": m.lidar_views})


def measure_unit(
    spec: ExperimentSpec,
    plan: Plan,
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    device: str | None = None,
    encoder: Any = None,
) -> list[dict]:
    """Metric rows of one checkpoint's layers, from one streamed pass over the layers not yet recorded.

    Each layer's rows are a completion record of their own, so a layer measured for any layer list
    (another spec, an override) is reused. `encoder`: a loaded model of this checkpoint to reuse
    (`gpu_blocks`); else one is loaded here with the missing layers only.
    """
    from layertime.measure import measure

    m = spec.metrics
    blocks = metrics_blocks(spec, plan)
    key = metrics_key(spec, plan)
    found = {b: read_record(run.metrics_record(settings.encoder_id, ckpt, key, b)) for b in blocks}
    missing = [b for b in blocks if found[b] is None]
    if not missing:
        return [row for b in blocks for row in found[b]]
    corpus, prompts = metrics_prompts(spec, run)
    start = time.perf_counter()
    if encoder is None:
        encoder = load_encoder(spec, ckpt, missing, settings, device)
    elif not set(missing) <= set(encoder.layers):
        raise ValueError(f"measure: the encoder returns blocks {encoder.layers}, the metrics need {missing}")
    with memory.peak(encoder.device) as used:
        rows = [
            {"model": ckpt.model, "commit": ckpt.commit, "depth": (r["layer"] + 1) / plan.num_blocks, **r}
            for r in measure(encoder, prompts, m.views, m.lidar_views, m.seed, corpus)
        ]
    cost = {"phase": "measure", "task": None, "seconds": time.perf_counter() - start, "device": str(encoder.device),
            "texts": len(prompts) * (1 + max(m.views, m.lidar_views)), **used}  # fmt: skip
    atomic_write_text(run.cost_record(settings.id, ckpt, "measure"), json.dumps(cost))
    stamp = {"settings": settings.as_dict(), "metrics": m.model_dump(), "metrics_key": key,
             "provenance": provenance(spec.digest)}  # fmt: skip
    for b in missing:
        found[b] = [r for r in rows if r["layer"] == b]
        atomic_write_text(
            run.metrics_record(settings.encoder_id, ckpt, key, b), json.dumps({**stamp, "rows": found[b]})
        )
    return [row for b in blocks for row in found[b]]


@dataclass(frozen=True)
class CheckpointDone:
    """What a checkpoint's GPU work produced: embeddings by task (their directories), its metric rows
    (None: not measured) and what failed, by task or "measure", with the error."""

    embeddings: dict[str, str]
    metrics: list[dict] | None
    failed: dict[str, str]


def checkpoint_gpu_work(
    spec: ExperimentSpec,
    plan: Plan,
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    tasks: Sequence[str],
    measure: bool,
    device: str | None = None,
    gpu_lock: contextlib.AbstractContextManager | None = None,
    contain: tuple[type[BaseException], ...] = (),
    logger: Logger = log,
) -> CheckpointDone:
    """A checkpoint's GPU work from ONE model load: its metrics (`measure`), then each of `tasks`'
    embeddings (one forward pass per unique text, all layers). The flow's `gpu` task and `run_spec`
    (`--plain`) both run it, so a checkpoint is loaded once either way.

    The model is read from storage before `gpu_lock` is taken: a GPU worker running two checkpoints
    loads the next while the current one computes, and only the one computing is on the GPU (model
    loads, not scoring, idled the GPUs: benchmarks/RESULTS.md). An error of a `contain` type fails
    only its unit and the others go on; any other error (a full disk, a lost device) propagates.
    """
    blocks = gpu_blocks(spec, plan)
    logger.info(f"loading checkpoint {ckpt.model}@{ckpt.revision} ({ckpt.commit}), blocks {blocks}")
    encoder = load_encoder(spec, ckpt, blocks, settings, device)
    with gpu_lock if gpu_lock is not None else contextlib.nullcontext():
        try:
            encoder.to_device()
            return _measure_and_embed(
                spec, plan, run, settings, ckpt, tasks, measure, encoder, contain, logger
            )
        finally:
            del encoder  # this checkpoint's GPU memory is free before the next one moves in
            release_gpu_memory()


def _measure_and_embed(
    spec: ExperimentSpec,
    plan: Plan,
    run: RunDir,
    settings: Settings,
    ckpt: Checkpoint,
    tasks: Sequence[str],
    measure: bool,
    encoder: Any,
    contain: tuple[type[BaseException], ...],
    logger: Logger,
) -> CheckpointDone:
    embeddings, failed, metrics = {}, {}, None
    if measure:
        logger.info(
            f"measuring {ckpt.revision}: representation metrics of blocks {metrics_blocks(spec, plan)}"
        )
        try:
            metrics = measure_unit(spec, plan, run, settings, ckpt, encoder=encoder)
        except contain as e:
            failed["measure"] = f"{type(e).__name__}: {e}"
            logger.error(f"measure[{ckpt.revision}] failed: {failed['measure']}")
    for task in tasks:
        try:
            texts = task_texts(task, run, spec.aggregation, spec.hf_cache).texts
            logger.info(f"embedding {task} at {ckpt.revision}: {len(texts):,} texts, blocks {plan.blocks}")
            path = embed_unit(encoder, run, settings, ckpt, task, texts, list(plan.blocks))
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
    """Metric rows of every checkpoint of the plan whose layers are all measured, by checkpoint key."""
    spec = plan.spec
    if spec.metrics is None:
        return {}
    key = metrics_key(spec, plan)
    found = {}
    for ckpt in plan.distinct_checkpoints():
        layers = [
            read_record(run.metrics_record(settings.encoder_id, ckpt, key, b))
            for b in metrics_blocks(spec, plan)
        ]
        if all(rows is not None for rows in layers):
            found[ckpt.key] = [row for rows in layers for row in rows]
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
    layers = tables.with_metrics(tables.layers_frame(scores, plan.tasks), measured)
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
    of their unit is scored, unless `keep_embeddings` or another run on the store still claims them
    (layertime/claims.py). A run root another code version wrote is
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
    """One checkpoint at a time: its GPU work (`checkpoint_gpu_work`, the flow's `gpu` task), then
    the scoring of every layer it embedded; any error stops the run (the flow goes on instead)."""
    settings = Settings.of(spec, device)
    write_snapshot(plan, run, settings)
    texts = {t: task_texts(t, run, spec.aggregation, spec.hf_cache) for t in plan.tasks}
    measured = recorded_metrics(plan, run, settings)
    checkpoints = plan.distinct_checkpoints()
    scored = skipped = embedded = 0
    for i, ckpt in enumerate(checkpoints):
        todo = {t: missing_layers(run, settings, ckpt, t, plan.blocks) for t in plan.tasks}
        skipped += sum(len(plan.blocks) - len(layers) for layers in todo.values())
        to_embed = [t for t in plan.tasks if todo[t]]
        measure = spec.metrics is not None and ckpt.key not in measured
        if to_embed or measure:  # load a checkpoint only when it has work left
            # Claimed while embedded and scored: another run on this store deletes nothing we need.
            with claims.Claims() as held:
                for task in to_embed:
                    held.take(run.embeddings(settings.id, ckpt, task))
                done = checkpoint_gpu_work(spec, plan, run, settings, ckpt, to_embed, measure, device)
                for task in to_embed:
                    path = Path(done.embeddings[task])
                    embedded += len(texts[task].texts)
                    score_unit(run, settings, ckpt, task, todo[task], path, spec.aggregation, plan.num_blocks,
                               spec.hf_cache, spec.digest)  # fmt: skip
                    scored += len(todo[task])
                    held.release(path)
                    if not spec.keep_embeddings:
                        claims.delete_unclaimed(path)  # the last run that needs them deletes them
        if progress:
            progress("units", (i + 1) * len(plan.tasks), len(checkpoints) * len(plan.tasks))
    paths = merge(plan, run, settings)
    return RunResult(run.root, paths, scored, skipped, sum(v.requested for v in texts.values()), embedded)
