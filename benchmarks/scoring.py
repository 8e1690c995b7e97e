"""Benchmark of mteb scoring at scale: per-task cost, before/after layertime's fixes, a local pool, exp2's schedule.

Synthetic tasks of the 32 tasks' real shapes are built from mteb 2.26's shipped descriptive statistics
(no download): the real task classes (their evaluators, seeds, undersampling, subsets) with synthetic
data of the real sizes set as their loaded data, and synthetic float32 embeddings at d=1024 (a class
centroid plus noise where there are labels, so classifiers and k-means have work to do).

What it measures (figures go to ``benchmarks/RESULTS.md``, machine named; the cost table to
``layertime/task_costs.csv``):

1. **Per task, one layer, before vs after** — each in a fresh process:
   *before* = datasets' lazy columns and the default BLAS threads (mteb as it comes);
   *after* = ``bridge.prepare_scoring_process(dedicated=True)`` (one BLAS, OpenMP and torch thread, no
   GPU), list columns (``fastmteb.as_list_columns``) and ``layertime.fastmteb``'s reranking and metrics,
   i.e. what ``bridge.score_layers`` does. CPU-seconds, wall seconds, peak memory (ru_maxrss) of the
   scoring process, and whether every main score (and every other score mteb writes) is bit-identical.
2. **The cost table** — the *after* figures per task, with unique texts and mean text length.
3. **A local pool** — 4 layers × 32 tasks through a ``ProcessPoolExecutor`` of one-thread processes (as
   many as cores, ``bridge.prepare_scoring_process`` as initializer, as the local profile does).
4. **exp2's schedule** — ``layertime.costs.simulate`` of 50 checkpoints × 4 layers × 32 tasks on
   8 GPU jobs and 64 CPU jobs (2 or 8 big-memory jobs; one or two models per GPU worker): the
   fraction of the GPUs' held time they compute (target ≥ 90%) and per (checkpoint, layer)
   scoring CPU-seconds (target ≤ 550 CPU-s on this machine).

MindSmallReranking (2.36M sub-queries, ~43 GiB) does not fit a 24 GB machine: it is measured at
``--mind-scale`` of its queries (default 0.1) and its seconds and memory above the process baseline are extrapolated
linearly to 1.0 (the table's ``scale`` and ``note`` columns say so).

Run (2-core CPU: ~1 hour, half of it the "before" runs)::

    .venv/bin/python benchmarks/scoring.py                       # all parts; writes the table and RESULTS.md
    .venv/bin/python benchmarks/scoring.py --tasks STS12 SciDocsRR --parts tasks --out /tmp/r.md --table /tmp/t.csv
    .venv/bin/python benchmarks/scoring.py --before-tasks none   # skip the slow "before" runs

It needs no network: ``HF_HUB_OFFLINE=1`` and ``MTEB_CACHE`` point at a temporary directory before
mteb is imported.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import load_average, machine_info  # noqa: E402 (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS.md"
DIM = 1024
SEED = 0
POOL_LAYERS = 4
MIND = "MindSmallReranking"
# Cluster sets per legacy clustering task (from the tasks' mteb descriptions; the stats give only totals).
CLUSTER_SETS = {
    "ArxivClusteringS2S": 30,
    "BiorxivClusteringS2S": 10,
    "MedrxivClusteringS2S": 10,
    "RedditClustering": 25,
    "StackExchangeClustering": 25,
    "TwentyNewsgroupsClustering": 10,
}
MAX_CLUSTERS_PER_SET = 50  # "each with 10-50 classes" (Reddit, StackExchange); an assumption for Arxiv
MIND_SUBQUERIES_PER_QUERY = 32  # sub-query ids are "<query>_<n>": mteb takes the max over them
CENTROID_SCALE = 0.05  # per-dimension class signal against unit noise: separable, not trivially
# Hidden states have a few dimensions of huge magnitude ("massive activations"): they make logistic
# regression take ~88 iterations instead of 5 (issue 22), so the costs are measured with them.
OUTLIER_DIMS = (3, 100, 600)
OUTLIER_SCALE = 45.0  # their magnitude against unit noise, ±20% per text
MIND_PARTS = 8  # processes a MindSmallReranking layer is split over (the cost table's `parts`)


def log(message: str) -> None:
    print(f"[scoring-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- shapes


def stats(name: str) -> dict[str, Any]:
    """mteb's shipped descriptive statistics of one of the 32 tasks (all splits)."""
    import mteb

    from layertime import suite

    path = Path(mteb.__file__).parent / "descriptive_stats" / suite.task_type(name) / f"{name}.json"
    return json.loads(path.read_text())


def subset_stats(split: dict[str, Any], subset: str) -> dict[str, Any]:
    per = split.get("hf_subset_descriptive_stats") or {}
    return per[subset] if subset in per else split


def mean_text_chars(name: str, subsets: Sequence[str]) -> float:
    """Mean characters per text of the test split (queries and documents, or both pair columns)."""
    total = count = 0.0
    for subset in subsets:
        s = subset_stats(stats(name)["test"], subset)
        for key in ("text_statistics", "text1_statistics", "text2_statistics",
                    "queries_text_statistics", "documents_text_statistics"):  # fmt: skip
            if s.get(key):
                total += s[key]["total_text_length"]
                count += s[key]["total_text_length"] / s[key]["average_text_length"]
    return total / count if count else 0.0


@dataclass
class Built:
    """A real task object with synthetic data, and the embeddings of its texts."""

    task: Any
    texts: list[str]
    vectors: Any  # float32 [n, DIM]
    build_s: float


def _vectors(rng: Any, labels: Sequence[int] | None, n: int) -> Any:
    import numpy as np

    noise = rng.standard_normal((n, DIM), dtype=np.float32)
    if labels is not None:
        centroids = CENTROID_SCALE * rng.standard_normal((max(labels) + 1, DIM), dtype=np.float32)
        noise += centroids[np.asarray(labels)]
    spread = rng.standard_normal((n, len(OUTLIER_DIMS)), dtype=np.float32)
    noise[:, list(OUTLIER_DIMS)] = OUTLIER_SCALE * (1 + 0.2 * spread)
    return noise


def _label_list(counts: Sequence[int]) -> list[int]:
    """Labels 0..k-1 repeated by their counts, interleaved (real splits are not sorted by label)."""
    import numpy as np

    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(SEED).shuffle(labels)
    return labels.tolist()


def classification_data(task: Any, name: str) -> tuple[dict, list[str], list[int]]:
    from datasets import Dataset, DatasetDict

    data, texts, labels = {}, [], []
    for subset in task.hf_subsets:
        splits = {}
        for split in (task.train_split, "test"):
            s = subset_stats(stats(name)[split], subset)
            counts = [c["count"] for c in s["label_statistics"]["labels"].values()]
            ys = _label_list(counts)
            xs = [f"{subset}/{split}/{i}" for i in range(len(ys))]
            splits[split] = Dataset.from_dict({task.input_column_name: xs, task.label_column_name: ys})
            texts += xs
            labels += ys
        data[subset] = DatasetDict(splits)
    return data, texts, labels


def clustering_data(task: Any, name: str) -> tuple[dict, list[str], list[int]]:
    from datasets import Dataset, DatasetDict

    s = stats(name)["test"]
    n, unique = s["num_samples"], s["text_statistics"]["unique_texts"]
    sets = CLUSTER_SETS[name]
    k = min(s["label_statistics"]["unique_labels"], MAX_CLUSTERS_PER_SET)
    size = n // sets
    ids = _label_list([1] * unique)  # a permutation: which unique text each position holds
    sentences, set_labels = [], []
    for j in range(sets):
        positions = range(j * size, (j + 1) * size)
        sentences.append([f"t{ids[p % unique]}" for p in positions])
        set_labels.append([ids[p % unique] % k for p in positions])
    texts = [f"t{i}" for i in range(unique)]
    ds = Dataset.from_dict({task.input_column_name: sentences, task.label_column_name: set_labels})
    return {"default": DatasetDict({"test": ds})}, texts, [i % k for i in range(unique)]


def pair_data(task: Any, name: str, kind: str) -> tuple[dict, list[str], None]:
    import numpy as np
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(SEED)
    data, texts = {}, []
    for subset in task.hf_subsets:
        s = subset_stats(stats(name)["test"], subset)
        n, u1, u2 = (
            s["num_samples"],
            s["text1_statistics"]["unique_texts"],
            s["text2_statistics"]["unique_texts"],
        )
        a = [f"{subset}/a{i % u1}" for i in range(n)]
        b = [f"{subset}/b{i % u2}" for i in range(n)]
        if kind == "STS":
            c1, c2 = task.column_names
            cols = {c1: a, c2: b, "score": rng.uniform(task.min_score, task.max_score, n).round(2).tolist()}
        else:
            cols = {task.input1_column_name: a, task.input2_column_name: b,
                    task.label_column_name: rng.integers(0, 2, n).tolist()}  # fmt: skip
        data[subset] = DatasetDict({"test": Dataset.from_dict(cols)})
        texts += [f"{subset}/a{i}" for i in range(min(n, u1))] + [f"{subset}/b{i}" for i in range(min(n, u2))]
    return data, texts, None


def reranking_data(
    name: str, scale: float, part: tuple[int, int] | None = None
) -> tuple[dict, list[str], None]:
    """Retrieval format with top_ranked: per query `avg top_ranked` candidates, the first `avg relevant` relevant.

    With `part` = (p, parts), only the queries of part p of a split evaluation (layertime/scoreparts.py),
    with each one's place among all (`layertime_position`), as layertime's part loader gives them.

    Tasks whose documents are per-query candidates (SciDocsRR, ...) get disjoint candidate lists;
    MindSmallReranking's 2.36M sub-queries share 5,277 news documents and 37k query texts, and the
    sub-queries of one query (an impression's history items) share its candidates and qrels, as
    mteb's `max_over_subqueries` assumes ("all the same").
    """
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    s = stats(name)["test"]
    top = round(s["top_ranked_statistics"]["average_top_ranked_per_query"])
    relevant = max(1, round(s["relevant_docs_statistics"]["average_relevant_docs_per_query"]))
    docs = s.get("num_documents") or s["top_ranked_statistics"]["num_top_ranked"]
    n_queries = round((s.get("num_queries") or s["num_samples"] - docs) * scale)
    unique_q = min(n_queries, s["queries_text_statistics"]["unique_texts"])
    shared = name == MIND
    qid = (lambda i: f"q{i // MIND_SUBQUERIES_PER_QUERY}_{i}") if shared else (lambda i: f"q{i}")
    docs = docs if shared else n_queries * top
    mine = range(n_queries)
    if part is not None:
        from layertime.partload import part_of

        mine = [i for i in mine if part_of(qid(i), part[1], shared) == part[0]]
    queries = Dataset.from_dict(
        {"id": [qid(i) for i in mine], "text": [f"query{i % unique_q}" for i in mine]}
    )
    corpus = Dataset.from_dict(
        {"id": [f"d{j}" for j in range(docs)], "text": [f"doc{j}" for j in range(docs)]}
    )
    qrels, top_ranked = {}, {}
    for i in mine:
        start = ((i // MIND_SUBQUERIES_PER_QUERY) * top) % docs if shared else i * top
        ids = [f"d{(start + j) % docs}" for j in range(top)]
        top_ranked[qid(i)] = ids
        qrels[qid(i)] = {d: int(j < relevant) for j, d in enumerate(ids)}
    split = RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=qrels, top_ranked=top_ranked)
    if part is not None:
        split["layertime_position"] = {qid(i): i for i in mine}
    texts = [f"query{i}" for i in range(unique_q)] + [f"doc{j}" for j in range(docs)]
    return {"default": {"test": split}}, texts, None


def build(name: str, scale: float, layer: int = 0, part: tuple[int, int] | None = None) -> Built:
    """The real task `name` with synthetic data of its real shape loaded, and one layer's embeddings.

    Classification tasks are recorded first (as the run does): only the undersampled training texts
    and the test texts are embedded, not the whole training split.
    """
    import numpy as np

    from layertime import bridge, fastmteb, suite

    started = time.perf_counter()
    task = suite.build_task(name)
    kind = suite.task_type(name)
    if kind == "Classification":
        data, texts, labels = classification_data(task, name)
    elif kind == "Clustering":
        data, texts, labels = clustering_data(task, name)
    elif kind == "Reranking":
        data, texts, labels = reranking_data(name, scale, part)
    else:
        data, texts, labels = pair_data(task, name, kind)
    task.dataset, task.data_loaded = data, True
    rng = np.random.default_rng([SEED, layer])
    if kind == "Classification":
        recorder = bridge.RecordingEncoder()
        fastmteb.as_list_columns(task.dataset)  # recording is not what is timed: take the fast path
        bridge._evaluate(recorder, task, None)
        task.dataset = classification_data(task, name)[0]  # fresh lazy columns for the timed run
        label_of = dict(zip(texts, labels, strict=True))
        texts = list(recorder.seen)
        labels = [label_of[t] for t in texts]
    vectors = _vectors(rng, labels, len(texts))
    return Built(task, texts, vectors, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- one task


def peak_gib() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def warm_up(name: str) -> None:
    """Score the demo task of `name`'s type once: the first evaluation in a process imports sklearn,
    pytrec_eval and mteb's evaluators (~3 s), which a long-lived scoring process pays once, not per task."""
    from layertime import bridge, suite
    from layertime.demo.tasks import demo_task

    task = demo_task(f"Demo{suite.task_type(name)}")
    task.load_data()
    bridge._evaluate(bridge.RecordingEncoder(), task, None)


def measure_task(
    name: str, mode: str, scale: float, part: tuple[int, int] | None = None, workdir: str | None = None
) -> dict[str, Any]:
    """Score `name` in this (fresh) process, `mode` 'before' (mteb as shipped: one layer), 'previous'
    (layertime before issue 22: one thread, list columns, `fastmteb`'s reranking and metrics, no arrays
    path, no clustering lists; one layer) or 'after' (as a scoring process of the flow runs it: two
    layers of a task run, results written).

    after: `cpu_s` is the second layer's CPU-seconds (warm: the task loaded and prepared), `load_cpu_s`
    what the task run paid once (building the task's synthetic data, which stands in for mteb's
    load, plus the first layer's extra: preparing it). With `part`, part p of a split layer
    (layertime/scoreparts.py): its part files go to `workdir`.
    """
    from layertime import bridge, fastmteb, scoreparts
    from layertime.io import atomic_write_text

    if mode == "previous":  # what issue 22 changed, turned off
        import contextlib

        import datasets

        from layertime import reranking

        reranking.on_arrays = lambda task, active=True: contextlib.nullcontext()
        fastmteb.ListColumns.from_dict = classmethod(lambda cls, *a, **k: datasets.Dataset.from_dict(*a, **k))
    if mode in ("after", "previous"):
        bridge.prepare_scoring_process(dedicated=True)
    warm_up(name)
    baseline = peak_gib()
    cpu = time.process_time()
    built = build(name, scale, part=part)
    if mode in ("after", "previous"):
        fastmteb.as_list_columns(built.task.dataset)
    load = time.process_time() - cpu
    meta = bridge.model_meta("bench/synthetic", "r", DIM, {})
    out = {"task": name, "mode": mode, "scale": scale, "baseline_gb": baseline, "build_s": built.build_s,
           "unique": len(built.texts), "part": part}  # fmt: skip
    if mode in ("before", "previous"):
        encoder = bridge.LookupEncoder(built.texts, built.vectors, meta)
        wall, cpu = time.perf_counter(), time.process_time()
        result = bridge._evaluate(encoder, built.task, None, fast=mode == "previous")
        out.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)
        return {**out, **_scores(result), "peak_gb": peak_gib()}
    import numpy as np

    seconds, walls, first = [], [], None
    with tempfile.TemporaryDirectory(prefix="layertime-bench-export-") as export:
        for layer in (0, 1):
            vectors = built.vectors if layer == 0 else np.roll(built.vectors, 1, axis=1)  # another layer
            encoder = bridge.LookupEncoder(built.texts, vectors, meta)
            wall, cpu = time.perf_counter(), time.process_time()
            if part is not None:
                record = Path(workdir) / f"layer_{layer}.json"
                scoreparts.compute_part(built.task, encoder, *part, scoreparts.part_file(record, *part))
            else:
                result = bridge._evaluate(encoder, built.task, Path(export))  # mteb's export written
                rows = [s.__dict__ for s in bridge.subset_scores(result)]
                atomic_write_text(Path(export) / f"record_{layer}.json", json.dumps({"rows": rows}))
                first = first or result
            seconds.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
    out.update(
        cpu_s=seconds[1], wall_s=walls[1], load_cpu_s=load + seconds[0] - seconds[1], peak_gb=peak_gib()
    )
    return out if first is None else {**out, **_scores(first)}


def _scores(result: Any) -> dict[str, Any]:
    from layertime import bridge

    return {
        "scores": {f"{s.split}/{s.subset}": s.main_score for s in bridge.subset_scores(result)},
        "all_scores": json.dumps(result.scores, sort_keys=True),  # every metric, floats written exactly
    }


def measure_merge(name: str, parts: int, workdir: str) -> dict[str, Any]:
    """Merge layer 1's parts (in this fresh process): CPU-seconds, peak memory; layer 0's scores."""
    from layertime import bridge, scoreparts, suite

    baseline = peak_gib()
    task = suite.build_task(name)
    cpu = time.process_time()
    scoreparts.merged_result(task, Path(workdir) / "layer_1.json", parts)
    merge = time.process_time() - cpu
    first, _ = scoreparts.merged_result(task, Path(workdir) / "layer_0.json", parts)
    bridge._check_asked(task, first)
    return {"cpu_s": merge, "peak_gb": peak_gib(), "baseline_gb": baseline, **_scores(first)}


def measure_split(name: str, scale: float, parts: int) -> dict[str, Any]:
    """A split task (MindSmallReranking) as the flow scores it: each part in a fresh process (two layers
    of a task run), then the merge in another. One row: CPU-seconds of a layer summed over the parts,
    a part's load, the merge's CPU, the largest process's peak memory."""
    with tempfile.TemporaryDirectory(prefix="layertime-bench-parts-") as workdir:
        rows = []
        for p in range(parts):
            log(f"{name}: part {p + 1}/{parts} at scale {scale:g}")
            rows.append(in_fresh_process(name, "after", scale, (p, parts), workdir))
        with ProcessPoolExecutor(max_workers=1, max_tasks_per_child=1) as pool:
            merge = pool.submit(measure_merge, name, parts, workdir).result()
    return {
        "task": name, "mode": "after", "scale": scale, "parts": parts,
        "cpu_s": sum(r["cpu_s"] for r in rows), "wall_s": max(r["wall_s"] for r in rows),
        "load_cpu_s": sum(r["load_cpu_s"] for r in rows) / parts, "merge_cpu_s": merge["cpu_s"],
        "peak_gb": max([*(r["peak_gb"] for r in rows), merge["peak_gb"]]),
        "part_peaks_gb": [r["peak_gb"] for r in rows], "merge_peak_gb": merge["peak_gb"],
        "baseline_gb": min(r["baseline_gb"] for r in rows), "unique": rows[0]["unique"],
        "scores": merge["scores"], "all_scores": merge["all_scores"],
    }  # fmt: skip


def measure_mind(args: argparse.Namespace, with_before: bool, report: Report) -> dict[str, Any]:
    """MindSmallReranking: mteb as shipped and layertime whole at `--mind-scale` (mteb's 43 GiB at full
    size do not fit here; seconds and memory extrapolated), their scores compared, and layertime's
    parts at that scale merged and compared too; then the parts at `--mind-split-scale` (full size by
    default): the row of the cost table."""
    small = args.mind_scale
    log(f"{MIND}: after, whole, at {small:g}")
    whole = in_fresh_process(MIND, "after", small)
    log(f"{MIND}: after, {args.mind_parts} parts, at {small:g}")
    split_small = measure_split(MIND, small, args.mind_parts)
    checks = [("parts = whole", identical(whole, split_small))]
    if with_before:
        log(f"{MIND}: before at {small:g}")
        before = in_fresh_process(MIND, "before", small)
        checks.insert(0, ("whole = mteb", identical(before, whole)))
        report.before[MIND] = extrapolate(before)
    row = (
        split_small
        if args.mind_split_scale == small
        else measure_split(MIND, args.mind_split_scale, args.mind_parts)
    )
    report.settings[f"{MIND} at {small:g}, whole (CPU s per layer, extrapolated)"] = (
        f"{extrapolate(whole)['cpu_s']:.1f}"
    )
    return {**extrapolate(row), "identical": "; ".join(f"{k}: {v}" for k, v in checks)}


def in_fresh_process(
    name: str, mode: str, scale: float, part: tuple[int, int] | None = None, workdir: str | None = None
) -> dict[str, Any]:
    """`measure_task` in a process of its own: a clean peak memory, and 'before' threads unpinned."""
    with ProcessPoolExecutor(max_workers=1, max_tasks_per_child=1) as pool:
        return pool.submit(measure_task, name, mode, scale, part, workdir).result()


def extrapolate(row: dict[str, Any]) -> dict[str, Any]:
    """A scaled-down measurement at full size: seconds × 1/scale, memory above the baseline × 1/scale."""
    if row["scale"] >= 1.0:
        return row
    f = 1.0 / row["scale"]
    scaled = {k: row[k] * f for k in ("wall_s", "cpu_s", "load_cpu_s", "merge_cpu_s") if k in row}
    return {**row, **scaled, "peak_gb": row["baseline_gb"] + (row["peak_gb"] - row["baseline_gb"]) * f}


# ---------------------------------------------------------------------------------------------- pool

_POOL_TASKS: dict[str, Built] = {}


def pool_init() -> None:
    """What the local profile's scoring processes run first: one thread (BLAS, OpenMP, torch), no GPU."""
    from layertime import bridge

    bridge.prepare_scoring_process(dedicated=True)


def pool_unit(name: str, layer: int, scale: float) -> dict[str, Any]:
    """Score one (task, layer) in a pool process; task data kept per process (one at a time), as _LOADED does."""
    from layertime import bridge, fastmteb

    cpu0 = time.process_time()
    if name not in _POOL_TASKS:
        _POOL_TASKS.clear()
        built = build(name, scale, layer)
        fastmteb.as_list_columns(built.task.dataset)
        _POOL_TASKS[name] = built
    built = _POOL_TASKS[name]
    import numpy as np

    vectors = built.vectors if layer == 0 else np.roll(built.vectors, layer, axis=1)  # another layer
    encoder = bridge.LookupEncoder(built.texts, vectors, bridge.model_meta("bench/synthetic", "r", DIM, {}))
    bridge._evaluate(encoder, built.task, None)
    return {"task": name, "layer": layer, "cpu_s": time.process_time() - cpu0, "pid": os.getpid()}


def run_pool(tasks: Sequence[str], layers: int, scale_of: dict[str, float], workers: int) -> dict[str, Any]:
    """Wall time of `layers` × `tasks` scoring units on `workers` one-thread processes (task-major order)."""
    started = time.perf_counter()
    # Spawned, not forked, and prepared by bridge.prepare_scoring_process: as layertime.pool.ScoringPool.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn, initializer=pool_init) as pool:
        futures = [pool.submit(pool_unit, t, layer, scale_of[t]) for t in tasks for layer in range(layers)]
        rows = [f.result() for f in futures]
    wall = time.perf_counter() - started
    return {"wall_s": wall, "workers": workers, "units": len(rows), "cpu_s": sum(r["cpu_s"] for r in rows),
            "scaled": {t: s for t, s in scale_of.items() if s < 1.0 and t in tasks}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- schedule


def exp2_schedule(gpu_jobs: int, cpu_jobs: int, big_memory_jobs: int, models_per_gpu: int) -> dict[str, Any]:
    """layertime.costs.estimate of exp2's grid (50 checkpoints × blocks 20..23 × 32 tasks) on a profile."""
    from layertime import costs, suite

    grid = costs.Grid(checkpoints=50, layers=4, tasks=suite.LAYER_BY_LAYER_32, num_blocks=24, hidden=DIM)
    return costs.estimate(grid, gpu_jobs, cpu_jobs, big_memory_jobs, models_per_gpu=models_per_gpu)


# Every schedule runs a checkpoint's GPU work as one task (one model load), as the flow does.
SCHEDULES: tuple[tuple[str, int, int, int, int], ...] = (
    (
        "exp2, 8 GPU jobs + 64 one-thread scoring processes, as the flow runs (no big-memory jobs)",
        8,
        64,
        0,
        2,
    ),
    ("exp2, 8 GPU jobs + 112 one-thread scoring processes", 8, 112, 0, 2),
    ("exp2, 8 GPU jobs + 32 one-thread scoring processes", 8, 32, 0, 2),
)


# ---------------------------------------------------------------------------------------------- table


def table_rows(after: dict[str, dict[str, Any]], machine: dict[str, str]) -> list[Any]:
    import mteb
    from encode import task_count  # noqa: E402 (benchmarks/ is on sys.path)

    from layertime import costs, suite

    date = machine["date"][:10]
    where = f"{machine['cpu']}, {machine['cores']} cores"
    rows = []
    for name in suite.LAYER_BY_LAYER_32:
        if name not in after:
            continue
        r, count = after[name], task_count(name)
        note = "synthetic data of the real shape, hidden-state-like embeddings (benchmarks/scoring.py)"
        if r["scale"] < 1.0:
            note += f"; measured at {r['scale']:g} of its queries, extrapolated linearly"
        if r.get("parts", 1) > 1:
            note += f"; {r['parts']} parts, each in a process of its own, and a merge"
        rows.append(
            costs.TaskCost(
                task=name,
                task_type=suite.task_type(name),
                score_cpu_s=round(r["cpu_s"], 2),
                peak_memory_gb=round(r["peak_gb"], 2),
                unique_texts=count.unique,
                requested_texts=count.requested,
                mean_text_chars=round(mean_text_chars(name, count.subsets), 1),
                dim=DIM,
                scale=r["scale"],
                machine=where,
                mteb_version=mteb.__version__,
                measured_on=date,
                note=note,
                parts=r.get("parts", 1),
                load_cpu_s=round(r.get("load_cpu_s", 0.0), 2),
                merge_cpu_s=round(r.get("merge_cpu_s", 0.0), 2),
            )  # fmt: skip
        )
    return rows


def merge_table(rows: Sequence[Any], path: Path) -> None:
    """Refresh `path` with `rows`, keeping the rows of tasks this run did not measure."""
    from layertime import costs, suite

    old = costs.read_table(path) if path.is_file() else {}
    new = {**old, **{r.task: r for r in rows}}
    order = [t for t in suite.LAYER_BY_LAYER_32 if t in new] + sorted(set(new) - set(suite.LAYER_BY_LAYER_32))
    costs.write_table([new[t] for t in order], path)


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    machine: dict[str, str]
    settings: dict[str, Any]
    after: dict[str, dict[str, Any]] = field(default_factory=dict)
    before: dict[str, dict[str, Any]] = field(default_factory=dict)
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    pool: dict[str, Any] | None = None
    schedules: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    seconds: float = 0.0


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def identical(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Main scores compared; then every score mteb wrote (rows measured before that was recorded lack it)."""
    if a["scores"] != b["scores"]:
        x, y = a["scores"], b["scores"]
        diff = max(abs(x[k] - y[k]) for k in x if k in y) if set(x) == set(y) else math.inf
        return f"no (max Δ {diff:.1e})"
    if "all_scores" not in a or "all_scores" not in b:
        return "yes"
    return "yes (all scores)" if a["all_scores"] == b["all_scores"] else "main yes, other scores differ"


def render_tasks(report: Report) -> str:
    from layertime import suite

    rows = []
    for name in suite.LAYER_BY_LAYER_32:
        if name not in report.after:
            continue
        a, b = report.after[name], report.before.get(name)
        scale = "" if b is None or b["scale"] >= 1 else f" (before at {b['scale']:g}, ×{1 / b['scale']:g})"
        split = f", {a['parts']} parts + merge {a['merge_cpu_s']:.1f}" if a.get("parts", 1) > 1 else ""
        after = a["cpu_s"] + a.get("merge_cpu_s", 0.0)
        before = ("—", "—", "—") if b is None else (f"{b['cpu_s']:.1f}", f"{b['cpu_s'] / after:.1f}×",
                                                      a.get("identical") or identical(b, a))  # fmt: skip
        p = report.previous.get(name)
        prev = "—" if p is None else f"{p['cpu_s']:.1f}"
        rows.append((name + scale, suite.task_type(name), f"{a['unique']:,}", before[0], prev, f"{after:.1f}{split}",
                     f"{a.get('load_cpu_s', 0.0):.1f}", before[1], f"{a['peak_gb']:.2f}", before[2]))  # fmt: skip
    headers = ("task", "type", "unique texts", "before CPU s (mteb as shipped)", "previous CPU s (layertime before issue 22)",
               "after CPU s (warm layer)", "after load CPU s (per task run)", "before/after",
               "after peak GiB (per process)", "every score bit-identical")  # fmt: skip
    return md_table(headers, rows)


def render_types(report: Report) -> str:
    """Per task type: Σ after (warm) over every task measured, Σ after with each task run's load spread
    over its 4 layers; and where mteb as shipped was measured too (some tasks), Σ before against Σ after
    over those tasks."""
    from layertime import costs, suite

    def after(t: str) -> float:
        return report.after[t]["cpu_s"] + report.after[t].get("merge_cpu_s", 0.0)

    def load(t: str) -> float:
        return report.after[t].get("load_cpu_s", 0.0) * report.after[t].get("parts", 1)

    rows, totals = [], [0.0, 0.0, 0.0, 0.0]
    for kind in dict.fromkeys(suite.task_type(t) for t in suite.LAYER_BY_LAYER_32):
        names = [t for t in report.after if suite.task_type(t) == kind]
        if not names:
            continue
        warm = sum(after(t) for t in names)
        with_loads = warm + sum(load(t) for t in names) / costs.LAYERS_PER_SCORE_TASK
        both = [t for t in names if t in report.before]
        before = sum(report.before[t]["cpu_s"] for t in both)
        after_both = sum(after(t) for t in both)
        totals = [totals[0] + warm, totals[1] + with_loads, totals[2] + before, totals[3] + after_both]
        compared = (
            f"{before:.1f} / {after_both:.1f} = {before / after_both:.1f}× ({len(both)})" if both else "—"
        )
        rows.append((f"{kind} ({len(names)})", f"{warm:.1f}", f"{with_loads:.1f}", compared))
    if rows:
        compared = f"{totals[2]:.0f} / {totals[3]:.1f} = {totals[2] / totals[3]:.1f}×" if totals[3] else "—"
        rows.append(("**Σ**", f"**{totals[0]:.0f}**", f"**{totals[1]:.0f}**", compared))
    headers = (
        "type (tasks measured)",
        "after CPU s (warm)",
        "after with task loads (÷ 4 layers)",
        "before / after CPU s over the tasks measured before too (how many)",
    )
    return md_table(headers, rows)


def render_pool(pool: dict[str, Any]) -> str:
    scaled = ", ".join(f"{t} at {s:g}" for t, s in pool["scaled"].items()) or "none"
    return (
        f"{pool['units']} units ({POOL_LAYERS} layers × {pool['units'] // POOL_LAYERS} tasks) on "
        f"{pool['workers']} one-thread processes: **{pool['wall_s']:.0f} s wall**, {pool['cpu_s']:.0f} CPU-s in "
        f"the workers (incl. building each task's synthetic data once per process: {pool['cpu_s'] / pool['workers']:.0f}"
        f" s ideal wall). Scaled-down tasks: {scaled} (not extrapolated here)."
    )


def render_schedule(label: str, est: dict[str, Any]) -> str:
    h = est["hours"]
    jobs = est["jobs"]
    verdict = "met" if est["gpu_busy"] >= 0.8 else "not met"
    cpu, loaded = est["score_cpu_s_per_checkpoint_layer"], est["score_cpu_s_per_checkpoint_layer_with_loads"]
    wall = "met" if est["wall_hours"] <= 0.6 else "not met"
    return "\n".join([
        f"**{label}** — {jobs['gpu']} GPU jobs, {jobs['cpu']} CPU jobs, {jobs['big_memory']} big-memory jobs:",
        f"- score {h['score']['cpu']:.1f} CPU-h (per checkpoint × layer: **{cpu:.0f} CPU-s** warm, "
        f"{'met' if cpu <= 200 else 'not met'} ≤ 200; {loaded:.0f} with each task run's load); embed "
        f"{h['embed']['gpu']:.2f} GPU-h, measure {h['measure']['gpu']:.2f} GPU-h, waiting for checkpoint loads "
        f"{h['loads']['gpu']:.2f} GPU-h (GPU figures ASSUMED)",
        f"- wall **{est['wall_hours']:.2f} h** ({wall} ≤ 0.6 h); GPU phase {est['gpu_phase_hours']:.2f} h, GPU jobs "
        f"held {est['gpu_held_hours']:.2f} GPU-h in all, computing **{est['gpu_busy']:.0%}** of it ({verdict} ≥ 80%), "
        f"{est['gpu_busy_whole_run']:.0%} of the whole run",
        f"- memory: GPU worker {est['memory_gb']['gpu_worker']} GB, scoring worker "
        f"{est['memory_gb']['scoring_worker']} GB, big-memory worker {est['memory_gb']['big_memory_worker']} GB",
    ])  # fmt: skip


def render_section(report: Report) -> str:
    from layertime import costs

    m = report.machine
    machine = ", ".join(f"{k}: {v}" for k, v in m.items() if k != "date")
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    parts = [
        f"## Scoring — {m['date']} — {m['cpu']}, {m['cores']} cores, no GPU",
        f"Machine — {machine}.  \nSettings — {settings}. Script wall time: {report.seconds:.0f} s.",
    ]
    if report.after:
        parts += [
            "### 1. One layer per task: mteb as shipped vs layertime (d=1024, hidden-state-like embeddings)",
            "*before*: mteb as shipped (lazy `datasets` columns, default BLAS threads, its own reranking and "
            "metrics), one layer; *after*: a scoring process as the flow runs it (one thread, list columns, "
            "reranking on arrays, clustering on lists; a task run's second layer, its results written; the "
            "load column is what the run paid once: the synthetic data build standing in for mteb's load, "
            "and preparing the task). Each in a fresh process, task by task, before and after back to back; "
            "CPU s = the process's CPU time (all threads); peak = ru_maxrss. MindSmallReranking: before and a "
            "whole after at the scale shown (their scores compared), after in parts at full size.",
            render_tasks(report),
            "Per task type:",
            render_types(report),
        ]
    if report.pool:
        n = report.pool["units"] // POOL_LAYERS
        parts += [f"### 2. Local pool: {POOL_LAYERS} layers × {n} tasks", render_pool(report.pool)]
    if report.schedules:
        parts.append("### 3. Simulated schedules (`layertime.costs.estimate`, this run's cost table)")
        parts += [render_schedule(label, est) for label, est in report.schedules]
        parts.append("Assumptions: " + "; ".join(costs.assumptions()) + ".")
    return "\n\n".join(parts) + "\n"


EXPLANATION_TITLE = "## Scoring benchmark (`benchmarks/scoring.py`, since issue 22): what the numbers mean"
EXPLANATION = f"""{EXPLANATION_TITLE}

Synthetic tasks of the 32 tasks' real shapes (mteb 2.26's shipped descriptive statistics; the real
task classes with synthetic data and d=1024 synthetic embeddings with a few huge-magnitude dimensions,
as hidden states have). Per task: *before*, mteb as shipped (lazy `datasets` columns, default BLAS
threads, mteb's own reranking and metrics) on one layer; *after*, a scoring process as the flow runs
it (one thread, list columns, reranking on arrays, clustering on lists): the CPU-seconds of a task
run's second layer with its results written (warm), and what the run paid once (`load`: the synthetic
data build, standing in for mteb's load, and the first layer's extra: preparing the task). Both in
fresh processes, task by task, back to back, so the machine's load affects both alike. Every score key
of the two is compared. MindSmallReranking (43 GiB for mteb as shipped) is compared at a fraction of
its queries, and measured after in parts at full size: the row of the cost table, which `layertime
plan` and `costs.scoring_memory_gb` read. Then exp2's simulated schedule on that table.
"""


def write_report(report: Report, out: Path) -> None:
    """Append the run's section to `out` (other benchmarks write there too); the explanation once."""
    existing = out.read_text(encoding="utf-8") if out.is_file() else "# Benchmarks\n"
    parts = [] if EXPLANATION_TITLE in existing else [EXPLANATION]
    parts.append(render_section(report))
    with open(out, "a" if out.is_file() else "w", encoding="utf-8") as f:
        f.write(("" if out.is_file() else existing) + "\n" + "\n".join(parts))


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", nargs="+", help="tasks to measure (default: the 32)")
    parser.add_argument("--before-tasks", nargs="+", default=["all"],
                        help="tasks measured 'before' too: all (default), none, or names")  # fmt: skip
    parser.add_argument(
        "--previous-tasks",
        nargs="+",
        default=["none"],
        help="tasks measured as layertime scored them before issue 22 too: all, none (default), or names",
    )
    parser.add_argument(
        "--mind-scale",
        type=float,
        default=0.1,
        help="fraction of MindSmall's queries mteb as shipped is measured at (and compared)",
    )
    parser.add_argument(
        "--mind-split-scale",
        type=float,
        default=1.0,
        help="fraction of MindSmall's queries its parts are measured at (the cost table's row)",
    )
    parser.add_argument("--mind-parts", type=int, default=MIND_PARTS, help="parts MindSmall is split in")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("tasks", "pool", "schedule"),
        default=["tasks", "pool", "schedule"],
        help="what to run: per-task before/after (writes the table), the local pool, exp2's schedule",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pool processes (default: cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to append to")
    parser.add_argument(
        "--table", type=Path, default=None, help="cost table to refresh (default: the package's)"
    )
    parser.add_argument(
        "--save", type=Path, default=None, help="the figures so far, as JSON, rewritten after each task"
    )
    parser.add_argument(
        "--render-saved",
        type=Path,
        default=None,
        help="measure nothing: append the figures a --save file holds (a run stopped early) to --out",
    )
    return parser.parse_args(argv)


def isolate_environment(tmp: Path) -> None:
    """No network, no writes to ~/.cache: before mteb or datasets load (children inherit it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["MTEB_CACHE"] = str(tmp / "mteb")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def save(report: Report, path: Path) -> None:
    """The figures so far: a run stopped early still leaves what it measured (`--render-saved`)."""
    import dataclasses

    from layertime.io import atomic_write_text

    atomic_write_text(path, json.dumps(dataclasses.asdict(report)))


def render_saved(args: argparse.Namespace) -> int:
    """Append the section of a saved (maybe partial) run to `--out`, with the schedules on the table."""
    from layertime import costs, suite

    report = Report(**json.loads(args.render_saved.read_text()))
    report.settings["rendered from"] = f"{args.render_saved.name} ({len(report.after)} tasks measured)"
    if "schedule" in args.parts and set(suite.LAYER_BY_LAYER_32) <= set(costs.table()):
        report.schedules = [(label, exp2_schedule(*jobs)) for label, *jobs in SCHEDULES]
    write_report(report, args.out)
    print(render_section(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_saved:
        return render_saved(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layertime-scoring-bench-") as tmp:
        isolate_environment(Path(tmp))
        import torch

        from layertime import costs, suite

        tasks = list(args.tasks or suite.LAYER_BY_LAYER_32)
        before = {"all": tasks, "none": []}.get(args.before_tasks[0], args.before_tasks)
        previous = {"all": tasks, "none": []}.get(args.previous_tasks[0], args.previous_tasks)
        scale_of = {t: (args.mind_scale if t == MIND else 1.0) for t in tasks}
        report = Report(machine_info(torch.device("cpu")), {
            "tasks": len(tasks), "before_tasks": len(before), "mind_scale": args.mind_scale,
            "pool_workers": args.workers, "dim": DIM})  # fmt: skip
        table = args.table or costs.TABLE
        for name in tasks if "tasks" in args.parts else []:
            if name == MIND:
                report.after[name] = measure_mind(args, name in before, report)
            else:
                log(f"{name}: after")
                report.after[name] = in_fresh_process(name, "after", 1.0)
                if name in before:
                    log(f"{name}: before")
                    report.before[name] = in_fresh_process(name, "before", 1.0)
            if name in previous:
                scale = args.mind_scale if name == MIND else 1.0
                log(f"{name}: previous, at {scale:g}")
                report.previous[name] = extrapolate(in_fresh_process(name, "previous", scale))
            merge_table(table_rows({name: report.after[name]}, report.machine), table)  # refreshed as we go
            if args.save:
                report.seconds = time.perf_counter() - started
                save(report, args.save)
            log(f"{name}: after {report.after[name]['cpu_s']:.1f} CPU-s, "
                f"before {report.before.get(name, {}).get('cpu_s', float('nan')):.1f}")  # fmt: skip
        costs.table.cache_clear()
        if "pool" in args.parts:
            log(f"pool: {POOL_LAYERS} layers × {len(tasks)} tasks on {args.workers} processes")
            report.pool = run_pool(tasks, POOL_LAYERS, scale_of, args.workers)
        if (
            "schedule" in args.parts
            and table == costs.TABLE
            and set(suite.LAYER_BY_LAYER_32) <= set(costs.table())
        ):
            report.schedules = [(label, exp2_schedule(*jobs)) for label, *jobs in SCHEDULES]
        report.seconds = time.perf_counter() - started
        report.machine["load avg (1 min) at end"] = load_average()
        if args.save:
            save(report, args.save)
        write_report(report, args.out)
    print(render_section(report))
    log(f"done in {report.seconds:.0f} s; appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
