"""The mteb bridge: score precomputed embeddings with `mteb.evaluate`, never loading a model (docs/design.md §4).

Two encoders that mteb drives like any model:
- `RecordingEncoder` returns cheap deterministic vectors and records every text mteb asks for.
  mteb's sampling is seeded, so one recording pass per task gives the exact set of texts every
  checkpoint and layer will need: the GPU step embeds exactly those, once each.
- `LookupEncoder` answers `encode` from a table of embeddings of one layer. A text it does not
  have is an error (`LookupMiss`), never a silent zero vector.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import mteb
import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from layertime import CODE_VERSION, fastmteb, memory, records, suite
from layertime.errors import Permanent
from layertime.hub.cache import is_offline, use_local_snapshot
from layertime.io import atomic_write

ENCODE_BATCH = 4096  # texts per mteb DataLoader batch; lookups are cheap, so large batches cut overhead


class LookupMiss(Permanent, KeyError):
    """mteb asked for a text the embedding step did not embed."""


class UnexpectedScores(Permanent, ValueError):
    """mteb returned other splits or subsets than the task asks for (the same on every try)."""


def model_meta(model: str, revision: str, dim: int, experiment: Mapping[str, Any]) -> Any:
    """mteb ModelMeta for one (checkpoint, layer, settings); experiment_kwargs namespace the results.

    The export of a scored layer lands in
    `<export>/results/<org>__<name>/<revision>/experiments/<experiment>/<Task>.json`, where mteb names
    the experiment after every key of `experiment` (the layer and every setting of `Settings`).
    """
    name = model if "/" in model.strip("/") and not Path(model).is_dir() else f"local/{Path(model).name}"
    return ModelMeta.create_empty(
        {
            "name": name,
            "revision": revision,
            "embed_dim": dim,
            "similarity_fn_name": ScoringFunction.COSINE,  # the enum: a plain string fails
            "framework": ["PyTorch"],
            "experiment_kwargs": dict(experiment),
            "use_instructions": False,
        }
    )


def batch_texts(inputs: Any) -> list[str]:
    """The texts of an mteb DataLoader, read from its dataset column when there is one (fast path)."""
    dataset = getattr(inputs, "dataset", None)
    names = getattr(dataset, "column_names", None) or []
    if "text" in names:
        texts = dataset["text"]
        return texts if isinstance(texts, list) else texts[:]  # a datasets Column: one batched read
    return [text for batch in inputs for text in batch["text"]]


class _BridgeEncoder(AbsEncoder):
    """Shared mteb plumbing; subclasses define `vectors(texts)`."""

    model = None

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        return self.vectors(batch_texts(inputs))

    def vectors(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class LookupEncoder(_BridgeEncoder):
    """Answers `encode` by looking each text up in (`texts`, `vectors`: float32 [n, d])."""

    def __init__(self, texts: Sequence[str], vectors: np.ndarray, meta: ModelMeta) -> None:
        if len(texts) != len(vectors):
            raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
        self.mteb_model_meta = meta
        self.row = {t: i for i, t in enumerate(texts)}
        self.matrix = vectors

    def vectors(self, texts: list[str]) -> np.ndarray:
        return self.matrix[self.rows(texts)]

    def rows(self, texts: list[str]) -> list[int]:
        """The matrix row of each text."""
        try:
            return [self.row[t] for t in texts]
        except KeyError as e:
            raise LookupMiss(
                f"mteb asked for a text that was not embedded: {str(e.args[0])[:80]!r} "
                f"({len(self.row)} texts embedded); the recorded text set is stale"
            ) from None

    def encode_rows(self, inputs: Any) -> list[int]:
        """The matrix rows `encode(inputs)` returns, without copying them (`fastmteb` reranks on rows)."""
        return self.rows(batch_texts(inputs))


class RecordingEncoder(_BridgeEncoder):
    """Records the texts mteb asks for and returns seeded per-text vectors (cheap, deterministic)."""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.mteb_model_meta = model_meta("layertime/recorder", "record", dim, {})
        self.seen: dict[str, None] = {}
        self.requested = 0

    def vectors(self, texts: list[str]) -> np.ndarray:
        self.requested += len(texts)
        self.seen.update(dict.fromkeys(texts))
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([_text_vector(t, self.dim) for t in texts])


def _text_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


@dataclass(frozen=True)
class TaskTexts:
    """The exact texts mteb asks for when scoring one task, and how many requests that was."""

    task: str
    dataset_revision: str
    mteb_version: str
    texts: list[str]
    requested: int


class _ListColumns(datasets.Dataset):
    """A Dataset whose `ds["col"]` is a list, as in datasets 3.x, read in one batch.

    datasets >= 4 returns a lazy Column that sklearn and mteb's sampling read row by row: scoring a
    classification task took 10-80x longer (docs/design.md §10) for the same numbers. `select` keeps the
    class, since mteb scores the undersampled training split it selects.
    """

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        return value[:] if isinstance(key, str) else value

    def select(self, *args: Any, **kwargs: Any) -> Any:
        return _as_list_columns(super().select(*args, **kwargs))


def _as_list_columns(data: Any) -> Any:
    """Every Dataset inside a task's loaded data (nested dicts, DatasetDicts, split objects) as _ListColumns."""
    if isinstance(data, datasets.Dataset):
        data.__class__ = _ListColumns
    elif isinstance(data, Mapping):
        for value in data.values():
            _as_list_columns(value)
    elif hasattr(data, "__dict__") and not isinstance(data, type):
        for value in vars(data).values():
            if isinstance(value, datasets.Dataset | Mapping):
                _as_list_columns(value)
    return data


def load_task(name: str, aggregation: str = "rule-a", hf_cache: Path | None = None, load: bool = True) -> Any:
    """A fresh task of the suite with its data loaded.

    Offline, real tasks read their dataset's local snapshot in the HF cache: through the datasets
    cache, reranking tasks silently lose their per-query candidate lists (docs/design.md §4).
    """
    task = suite.build_task(name, aggregation)
    if is_offline():
        use_local_snapshot(task, hf_cache)
    if load:
        task.load_data()
        _as_list_columns(task.dataset)
    return task


def recorded_texts(
    task_name: str, cache_dir: Path, aggregation: str = "rule-a", hf_cache: Path | None = None
) -> TaskTexts:
    """The texts `task_name` will ask for; one recording pass, cached per (task, dataset revision, mteb
    version, code version, aggregation rule).

    The cached file is checked before it is used (records.read_texts: its version, fields and digests,
    and that it is this task's); a damaged one (a crash, a full disk, a stray edit) is recorded
    again and replaced, never an error.
    """
    task = load_task(task_name, aggregation, hf_cache, load=False)
    # the rule last: report.load.texts_info finds a task's texts by `<task>__*__<aggregation>.json`
    key = (
        f"{task_name}__{task.metadata.revision}__mteb-{mteb.__version__}__code-{CODE_VERSION}__{aggregation}"
    )
    path = Path(cache_dir) / f"{key}.json"
    if (found := records.read_texts(path, task_name, task.metadata.revision, mteb.__version__)) is not None:
        return TaskTexts(
            found.task, found.dataset_revision, found.mteb_version, list(found.texts), found.requested
        )
    encoder = RecordingEncoder()
    _evaluate(encoder, task, None)
    found = TaskTexts(
        task_name, task.metadata.revision, mteb.__version__, list(encoder.seen), encoder.requested
    )
    records.write_texts(
        path, found.task, found.dataset_revision, found.mteb_version, found.texts, found.requested
    )
    return found


def reseed(task: Any) -> Any:
    """Reset a task's RNGs to its seed, exactly as a fresh instance has them (docs/design.md §4)."""
    from mteb._set_seed import _set_seed

    task.rng_state, task.np_rng = _set_seed(task.seed)
    return task


def _evaluate(encoder: Any, task: Any, export: Path | None, fast: bool = True) -> Any:
    """`mteb.evaluate` of one task, always computed; `fast`: through `fastmteb`'s bit-identical
    reranking and metrics (`fast=False` is mteb as shipped: the benchmark's "before", tests' reference).

    mteb never reads its result cache here: a cached result came back whole (every subset scored
    into the folder before, not only those asked for) and rounded to 6 decimals, and mteb wrote it in
    place (a full disk left empty files that failed every later run). Our completion records are the
    one truth. With `export`, the result is also written there in mteb's format for people (atomically;
    it is never read back).
    """
    model = fastmteb.search_model(encoder, task) if fast else encoder
    with fastmteb.installed() if fast else contextlib.nullcontext():
        result = mteb.evaluate(
            model,
            reseed(task),
            cache=None,
            show_progress_bar=False,
            encode_kwargs={"batch_size": ENCODE_BATCH, "show_progress_bar": False},
        ).task_results[0]
    _check_asked(task, result)
    if export is not None:
        meta = encoder.mteb_model_meta
        path = mteb.ResultCache(cache_path=export).get_task_result_path(task.metadata.name, meta)
        atomic_write(path, result.to_disk)
    return result


def _check_asked(task: Any, result: Any) -> None:
    """A result holds exactly the splits and subsets the task asks for (no more, no fewer)."""
    asked = {(split, subset) for split in task.eval_splits for subset in task.hf_subsets}
    got = {(split, s["hf_subset"]) for split, scores in result.scores.items() for s in scores}
    if got != asked:
        raise UnexpectedScores(
            f"{task.metadata.name}: mteb returned splits/subsets {sorted(got)}, the task asks for {sorted(asked)}"
        )


@dataclass(frozen=True)
class SubsetScore:
    """One mteb main score of one split and subset."""

    split: str
    subset: str
    main_score: float
    dataset_revision: str
    mteb_version: str
    seconds: float
    peak_memory_gb: float | None = None  # the scoring process's resident peak (layertime.memory)


class _LoadedTasks:
    """Task objects with their data loaded, kept per process (mteb reloads data on every call otherwise).

    A few at most: MindSmallReranking alone holds gigabytes. Each entry has a lock, because
    evaluating reseeds the task's RNGs and two threads must not share one mid-evaluation.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[str, str], tuple[Any, threading.Lock]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name: str, aggregation: str, hf_cache: Path | None) -> tuple[Any, threading.Lock]:
        key = (name, aggregation)
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        task = load_task(name, aggregation, hf_cache)
        with self.lock:
            entry = self.entries.setdefault(key, (task, threading.Lock()))
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
            return entry


_LOADED = _LoadedTasks()
_PINNED: list[Any] = []


def prepare_scoring_process(dedicated: bool = False) -> None:
    """Score on the CPU with one BLAS and OpenMP thread, for this process's life (docs/design.md §10).

    - One thread: more made scoring slower and moved classification accuracies by up to 2e-3 (BLAS)
      and k-means' sums (OpenMP); with one, every executor (local pool, SLURM jobs, --plain) gives
      the same scores, and one process per core does not oversubscribe the cores. Kept, not a
      context: scoring threads overlap, and a context left by one would lift the limit under another.
      A `dedicated` scoring process (the local pool's) also keeps torch to one thread; in a process
      that embeds too, CPU forward passes use one thread anyway (encoder.CPU_THREADS).
    - No GPU: where CUDA is visible (the local profile on a GPU node) mteb would move every cos_sim to
      the GPU, and torch.compile it, competing with embedding. Its device choice is pinned to the
      inputs' device (our embeddings are CPU arrays); tests/test_bridge.py checks the hook exists.
    """
    if dedicated:
        import torch

        torch.set_num_threads(1)
    if _PINNED:
        return
    from mteb import similarity_functions
    from threadpoolctl import threadpool_limits

    _PINNED.append(threadpool_limits(limits=1))  # every pool threadpoolctl finds: BLAS and OpenMP
    similarity_functions._select_device = lambda a, b: a.device
    similarity_functions._use_torch_compile = lambda: False


def score_layers(
    task_name: str,
    layers: Mapping[int, tuple[Sequence[str], np.ndarray]]
    | Iterable[tuple[int, tuple[Sequence[str], np.ndarray]]],
    meta_for_layer: Any,
    results_dir: Path,
    aggregation: str = "rule-a",
    hf_cache: Path | None = None,
) -> dict[int, list[SubsetScore]]:
    """Score each layer's embeddings on one task: data loaded once, a reseeded evaluation per layer.

    `layers` maps block -> (texts, vectors); `meta_for_layer(block)` gives its mteb ModelMeta.
    Results are also exported in mteb's format under `results_dir` (one experiment per layer and
    settings), never read back.
    """
    prepare_scoring_process()
    task, lock = _LOADED.get(task_name, aggregation, hf_cache)
    items = layers.items() if isinstance(layers, Mapping) else layers
    out: dict[int, list[SubsetScore]] = {}
    for block, (texts, vectors) in items:
        encoder = LookupEncoder(texts, vectors, meta_for_layer(block))
        with lock, memory.peak() as used:
            result = _evaluate(encoder, task, results_dir)
        out[block] = subset_scores(result, used["peak_memory_gb"])
    return out


def subset_scores(result: Any, peak_memory_gb: float | None = None) -> list[SubsetScore]:
    """Flatten an mteb TaskResult into one SubsetScore per (split, subset)."""
    seconds = float(result.evaluation_time or 0.0)
    return [
        SubsetScore(
            split,
            s["hf_subset"],
            float(s["main_score"]),
            result.dataset_revision,
            str(result.mteb_version),
            seconds,
            peak_memory_gb,
        )
        for split, scores in result.scores.items()
        for s in scores
    ]
