"""Benchmark of the embedding step: deduplication, padding, encode throughput, and exp2's forward passes.

What it measures (figures go to ``benchmarks/RESULTS.md``, one section per run, machine named):

1. **Requested vs unique texts** on the 5 local demo mteb tasks (a recording pass through
   ``layertime.bridge.recorded_texts``).
2. **Real vs padded tokens** of ``MultiLayerEncoder.encode`` (its ``last_stats``) on a corpus of demo
   sentences joined and cut to lengths from ~5 to ~300 tokens, 20% duplicates. Target: padded ≤ 1.10 × real.
3. **Encode throughput** of ``MultiLayerEncoder.encode`` (dedup, tokenization, batching, forward,
   final norm and mean pooling of every requested layer, copy to numpy) against a bare batched forward
   (tokenizer + ``model(..., output_hidden_states=True)``, no pooling) of the same unique texts in the
   same length-sorted batches, same model object, dtype and device. Target: pipeline/bare ≥ 0.85.
   For the tiny demo model and for a random-weight model with Pythia-410m's exact config, loaded from a
   fabricated hub cache by repo id like a real checkpoint. A stage breakdown says where the time goes.
4. **Forward passes of exp2** (50 checkpoints × 4 layers × 32 tasks): the old approach (one pass per
   layer per task over every text mteb passes) against ours (each task's unique texts once per
   checkpoint, all layers at once), from mteb 2.26's descriptive statistics of the 32 tasks.

Run (CPU: ~4 minutes on 2 cores; on a CUDA machine it uses bf16 and bigger sizes)::

    . .venv/bin/activate
    python benchmarks/encode.py                 # default sizes, appends to benchmarks/RESULTS.md
    python benchmarks/encode.py --quick --out /tmp/results.md    # a smoke run (~2 minutes)
    python benchmarks/encode.py --device cuda --texts 20000 --big-texts 8192

On a CPU device torch runs one thread unless ``--threads`` says otherwise: on a shared 2-core machine
two OpenMP threads slow down 3-6x, erratically, whenever another process runs; one thread gives
steady figures (wall ≈ CPU time), and the pipeline/bare ratio is what the benchmark is about.

It needs no network: ``HF_HUB_OFFLINE=1`` and ``MTEB_CACHE`` point at a temporary directory before
mteb is imported; the models are written into a temporary hub cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import load_average, machine_info  # noqa: E402 (benchmarks/ is on sys.path)

if TYPE_CHECKING:
    import torch

    from layertime.encoder import MultiLayerEncoder

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS.md"
PYTHIA_RANDOM_REPO = "bench/pythia-410m-random"
PADDING_TARGET = 1.10
RATIO_TARGET = 0.85
EXP2_CHECKPOINTS, EXP2_LAYERS = 50, 4
EXP1_CHECKPOINTS, EXP1_LAYERS = 1, 9
DUPLICATE_FRACTION = 0.2
SEED = 0


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    """How big each part of a run is."""

    corpus_texts: int  # length-distribution corpus: padding, demo-model throughput
    big_texts: int  # unique texts of the Pythia-410m-shaped throughput run
    big_token_range: tuple[int, int]  # token lengths the 410m texts are drawn from
    big_tokens_per_batch: int
    big_layer_sets: tuple[tuple[int, ...], ...]  # 410m layer sets timed against the bare forward
    big_stage_layer_sets: tuple[tuple[int, ...], ...]  # 410m layer sets only broken down into stages
    repeats: int  # timed repeats, demo model
    big_repeats: int  # timed repeats, 410m model


EXP2_BLOCKS = (20, 21, 22, 23)
ALL_BLOCKS = tuple(range(24))
SIZES: dict[str, Sizes] = {
    "quick": Sizes(400, 8, (16, 48), 2048, (EXP2_BLOCKS,), (), 2, 1),
    "cpu": Sizes(3000, 48, (16, 64), 2048, (EXP2_BLOCKS,), (ALL_BLOCKS,), 5, 3),
    "cuda": Sizes(20000, 8192, (5, 300), 16384, (EXP2_BLOCKS, ALL_BLOCKS), (), 5, 5),
}


@dataclass
class Report:
    """Everything a run found, rendered to markdown at the end."""

    machine: dict[str, str]
    settings: dict[str, Any]
    dedup: list[dict[str, Any]] = field(default_factory=list)
    padding: list[dict[str, Any]] = field(default_factory=list)
    corpus: dict[str, Any] = field(default_factory=dict)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- machine


def machine_title(machine: dict[str, str]) -> str:
    where = machine["gpu"] if machine["gpu"] != "none" else f"{machine['cpu']}, {machine['cores']} cores"
    return f"{machine['date']} — {where}"


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall seconds (perf_counter) and this process's CPU seconds (all threads) of one call."""

    wall: float
    cpu: float


def timed(fn: Callable[[], object], device: torch.device) -> Timing:
    """Time `fn()`, with the device drained before and after.

    CPU seconds matter on a shared CPU machine: other processes stretch wall time, not the CPU time
    this process spends (`process_time`). On a GPU, wall time is the figure (CPU time then includes
    waiting on the device).
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def stage_clock(device: torch.device) -> Callable[[], float]:
    """The clock of the stage breakdown: process CPU time on a CPU device, wall time on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


# ---------------------------------------------------------------------------------------------- 1. dedup


def measure_dedup(cache: Path) -> list[dict[str, Any]]:
    """Texts mteb requests vs unique texts, per demo task (one recording pass each)."""
    from layertime import bridge, suite

    rows = []
    for name in suite.SUITES[suite.SUITE_DEMO]:
        found = bridge.recorded_texts(name, cache)
        rows.append(
            {
                "task": name,
                "type": suite.task_type(name),
                "requested": found.requested,
                "unique": len(found.texts),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- corpus


def length_corpus(n: int, seed: int = SEED, duplicates: float = DUPLICATE_FRACTION) -> list[str]:
    """`n` texts of demo sentences joined and cut to a log-uniform 3..220 words (~5..300 tokens).

    Short texts dominate, as in MTEB (most s2s texts are a sentence), with a long tail; a fraction
    `duplicates` of the entries repeat earlier ones, as mteb's requests do.
    """
    from layertime.demo.corpus import labelled_sentences

    rng = random.Random(seed)
    sentences = [text for text, _ in labelled_sentences(2000, seed=seed + 7)]
    texts: list[str] = []
    while len(texts) < n:
        if texts and rng.random() < duplicates:
            texts.append(rng.choice(texts))
            continue
        words_wanted = round(math.exp(rng.uniform(math.log(3), math.log(220))))
        words: list[str] = []
        while len(words) < words_wanted:
            words.extend(rng.choice(sentences).split())
        texts.append(" ".join(words[:words_wanted]))
    return texts


def length_summary(lengths: Sequence[int]) -> dict[str, Any]:
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "median": ordered[len(ordered) // 2],
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


# ---------------------------------------------------------------------------------------------- models


def demo_model(cache: Path) -> tuple[str, str]:
    """The tiny demo GPT-NeoX in `cache`: (repo id, revision)."""
    from layertime.demo.model import DEMO_REPO, ensure_demo_model

    ensure_demo_model(cache)
    return DEMO_REPO, "main"


def pythia_random_model(cache: Path) -> tuple[str, str]:
    """A random-weight model with Pythia-410m's exact config, written as a hub snapshot: (repo, revision).

    Weights are stored in float16 as Pythia's are; the tokenizer is the demo one (vocabulary ~500 of
    the 50304 embedding rows: only the speed matters here).
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from layertime.demo.model import DEMO_REPO, TOKENIZER_FILES
    from layertime.hub.cache import cached_commit, snapshot_dir
    from layertime.hub.fake import PYTHIA_410M_CONFIG, write_snapshot

    snapshot = snapshot_dir(DEMO_REPO, cached_commit(DEMO_REPO, "main", cache), cache)
    files = {name: (snapshot / name).read_bytes() for name in TOKENIZER_FILES}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_410M_CONFIG)).to(torch.float16)
    with tempfile.TemporaryDirectory(prefix="layertime-bench-410m-") as tmp:
        model.save_pretrained(tmp)
        del model
        files.update({p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()})
    write_snapshot(cache, PYTHIA_RANDOM_REPO, files, ["main"])
    return PYTHIA_RANDOM_REPO, "main"


def load_encoder(
    repo: str, revision: str, cache: Path, layers: Sequence[int], device: torch.device, tokens_per_batch: int
) -> MultiLayerEncoder:
    from layertime.encoder import MultiLayerEncoder

    return MultiLayerEncoder(
        repo,
        revision=revision,
        layers=list(layers),
        device=device,
        tokens_per_batch=tokens_per_batch,
        cache_dir=str(cache),
    )


def bare_tokenizer(repo: str, revision: str, cache: Path) -> Any:
    """A fresh tokenizer of `repo` that pads on the right with EOS, for the bare baseline."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo, revision=revision, cache_dir=str(cache), local_files_only=True)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ---------------------------------------------------------------------------------------------- 2. padding


def padding_by_budget(lengths: Sequence[int], budgets: Sequence[int]) -> list[dict[str, Any]]:
    """Padded/real tokens of the encoder's batch planner at other token budgets (no forward pass)."""
    from layertime.encoder import token_budget_batches

    real = sum(lengths)
    rows = []
    for budget in budgets:
        batches = token_budget_batches(lengths, budget)
        padded = sum(len(b) * lengths[b[0]] for b in batches)
        rows.append(
            {
                "source": f"planner, {budget} tokens/batch",
                "texts": len(lengths),
                "real": real,
                "padded": padded,
                "batches": len(batches),
            }
        )
    return rows


def stats_row(source: str, encoder: MultiLayerEncoder) -> dict[str, Any]:
    s = encoder.last_stats
    assert s is not None
    return {
        "source": source,
        "texts": s.texts,
        "unique": s.unique_texts,
        "real": s.real_tokens,
        "padded": s.padded_tokens,
        "batches": s.batches,
    }


# ---------------------------------------------------------------------------------------------- 3. throughput


def bare_forward(
    model: Any, tokenizer: Any, batches: list[list[str]], device: torch.device, max_length: int
) -> None:
    """Tokenize each batch, run the model with output_hidden_states=True, keep nothing."""
    import torch

    with torch.inference_mode():
        for texts in batches:
            enc = tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
                return_tensors="pt",
            )
            model(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                output_hidden_states=True,
            )


def planned_batches(encoder: MultiLayerEncoder, unique: list[str]) -> list[list[str]]:
    """The encoder's own length-sorted token-budget batches of `unique`, as lists of texts."""
    from layertime.encoder import token_budget_batches

    ids = encoder.tokenize(unique)
    plan = token_budget_batches([len(r) for r in ids], encoder.tokens_per_batch)
    return [[unique[i] for i in batch] for batch in plan]


def measure_throughput(
    label: str, encoder: MultiLayerEncoder, tokenizer: Any, texts: list[str], repeats: int
) -> dict[str, Any]:
    """Pipeline `encode(texts)` vs a bare forward of the same unique texts in the same batches.

    One warm-up of each, then `repeats` interleaved timings (so drift hits both alike).
    """
    device = encoder.device
    unique = list(dict.fromkeys(texts))
    batches = planned_batches(encoder, unique)

    def pipeline() -> None:
        encoder.encode(texts)

    def bare() -> None:
        bare_forward(encoder.model, tokenizer, batches, device, encoder.max_length)

    pipeline()
    bare()
    pipe: list[Timing] = []
    base: list[Timing] = []
    for _ in range(repeats):
        pipe.append(timed(pipeline, device))
        base.append(timed(bare, device))
    stats = encoder.last_stats
    assert stats is not None
    best_pipe, best_bare = min(t.wall for t in pipe), min(t.wall for t in base)
    return {
        "model": label,
        "layers": _layer_label(encoder.layers),
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "device": device.type,
        "texts": len(texts),
        "unique": len(unique),
        "real_tokens": stats.real_tokens,
        "padded_tokens": stats.padded_tokens,
        "batches": stats.batches,
        "pipeline_s": best_pipe,
        "pipeline_median_s": statistics.median(t.wall for t in pipe),
        "pipeline_cpu_s": min(t.cpu for t in pipe),
        "bare_s": best_bare,
        "bare_median_s": statistics.median(t.wall for t in base),
        "bare_cpu_s": min(t.cpu for t in base),
        "pipeline_texts_per_s": len(texts) / best_pipe,
        "pipeline_unique_per_s": len(unique) / best_pipe,
        "pipeline_tokens_per_s": stats.real_tokens / best_pipe,
        "bare_unique_per_s": len(unique) / best_bare,
        "bare_tokens_per_s": stats.real_tokens / best_bare,
        "ratio": best_bare / best_pipe,
        "ratio_median": statistics.median(t.wall for t in base) / statistics.median(t.wall for t in pipe),
        "ratio_cpu": min(t.cpu for t in base) / min(t.cpu for t in pipe),
    }


def _layer_label(layers: Sequence[int]) -> str:
    layers = list(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}–{layers[-1]} ({len(layers)})"
    return ",".join(map(str, layers))


def stage_breakdown(label: str, encoder: MultiLayerEncoder, texts: list[str]) -> dict[str, Any]:
    """Seconds per stage of one `encode(texts)`, mirroring `MultiLayerEncoder.encode` step by step.

    dedup+tokenize: `dict.fromkeys` and the encoder's own `tokenize`; build: the per-row tensor
    filling of `_forward`; forward: the model call; post: final norm, pooling, finiteness check and
    the copy to numpy of every requested layer; scatter: writing rows into the output arrays and the
    reorder for duplicates.
    """
    import numpy as np
    import torch

    from layertime.encoder import token_budget_batches

    device = encoder.device
    now = stage_clock(device)
    clock: dict[str, float] = dict.fromkeys(("dedup+tokenize", "build", "forward", "post", "scatter"), 0.0)
    start = now()
    unique = list(dict.fromkeys(texts))
    ids = encoder.tokenize(unique)
    batches = token_budget_batches([len(r) for r in ids], encoder.tokens_per_batch)
    clock["dedup+tokenize"] = now() - start
    out = {b: np.empty((len(unique), encoder.dim), dtype=np.float32) for b in encoder.layers}
    L = encoder.anatomy.num_blocks
    with torch.inference_mode():
        for batch in batches:
            t0 = now()
            rows = [ids[i] for i in batch]
            T = max(map(len, rows))
            input_ids = torch.full((len(rows), T), encoder.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            synchronize(device)
            t1 = now()
            hidden = encoder.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            hidden = hidden.hidden_states
            synchronize(device)
            t2 = now()
            pooled = {}
            for b in encoder.layers:
                h = hidden[b + 1].float()
                if encoder._norm is not None and not (b == L - 1 and encoder.anatomy.last_is_normed()):
                    h = encoder._norm(h)
                vectors = encoder.pool(h, mask)
                if not torch.isfinite(vectors).all():
                    raise FloatingPointError(f"layer {b} is not finite")
                pooled[b] = vectors.cpu().numpy()
            t3 = now()
            for b, vectors in pooled.items():
                out[b][batch] = vectors
            t4 = now()
            for stage, seconds in zip(
                ("build", "forward", "post", "scatter"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True
            ):
                clock[stage] += seconds
    t5 = now()
    row_of = {t: i for i, t in enumerate(unique)}
    order = np.fromiter((row_of[t] for t in texts), dtype=np.int64, count=len(texts))
    _ = {b: m[order] for b, m in out.items()}
    clock["scatter"] += now() - t5
    total = sum(clock.values())
    unit = "CPU s" if device.type == "cpu" else "wall s"
    return {"model": label, "layers": _layer_label(encoder.layers), "unit": unit, **clock, "total": total}


# ---------------------------------------------------------------------------------------------- 4. exp2 passes


@dataclass(frozen=True)
class TaskCount:
    """Texts one of the 32 tasks passes to `encode` (requested) and how many are distinct (unique)."""

    task: str
    type: str
    subsets: tuple[str, ...]
    requested: int
    unique: int
    basis: str


DESIGN_MEASURED: dict[str, tuple[str, str]] = {
    "MindSmallReranking": ("2.37M", "42k"),
    "SprintDuplicateQuestions": ("202k", "9k"),
}


def descriptive_stats(task_type: str, name: str) -> dict[str, Any]:
    """mteb's shipped descriptive statistics of task `name` (all splits)."""
    import mteb

    path = Path(mteb.__file__).parent / "descriptive_stats" / task_type / f"{name}.json"
    return json.loads(path.read_text())


def subset_stats(split_stats: dict[str, Any], subset: str) -> dict[str, Any]:
    """A split's statistics for one hf subset (the split's own for monolingual tasks)."""
    per_subset = split_stats.get("hf_subset_descriptive_stats") or {}
    return per_subset[subset] if subset in per_subset else split_stats


def expected_union(label_counts: Sequence[int], per_label: int, experiments: int) -> float:
    """Expected size of the union of `experiments` draws of `per_label` examples per label.

    mteb 2.26 encodes the union of the undersampled training indices of all experiments once. Each
    experiment takes the first `per_label` examples of each label in a fresh shuffle: for a label with
    N examples a given one is drawn with probability k/N, k = min(per_label, N).
    """
    total = 0.0
    for n in label_counts:
        k = min(per_label, n)
        total += n * (1.0 - (1.0 - k / n) ** experiments)
    return total


def classification_count(task: Any, name: str) -> tuple[int, int, str]:
    stats = descriptive_stats("Classification", name)
    requested = unique = 0
    for subset in task.hf_subsets:
        train = subset_stats(stats[task.train_split], subset)
        test = subset_stats(stats["test"], subset)
        counts = [c["count"] for c in train["label_statistics"]["labels"].values()]
        union = round(expected_union(counts, task.samples_per_label, task.n_experiments))
        requested += union + test["num_samples"]
        unique += union + test["text_statistics"]["unique_texts"]
    basis = (
        f"estimate: E[train union] ({task.n_experiments} exp × {task.samples_per_label}/label) + test; "
        "unique ignores train/test overlap"
    )
    return requested, unique, basis


def pair_count(task_type: str, name: str, subsets: Sequence[str]) -> tuple[int, int, str]:
    """PairClassification and STS: mteb encodes column 1 then column 2 of every pair."""
    stats = descriptive_stats(task_type, name)
    requested = unique = 0
    for subset in subsets:
        s = subset_stats(stats["test"], subset)
        requested += 2 * s["num_samples"]
        unique += s["text1_statistics"]["unique_texts"] + s["text2_statistics"]["unique_texts"]
    return requested, unique, "stats: 2 × pairs; unique = Σ unique per column (upper bound)"


def reranking_count(name: str) -> tuple[int, int, str]:
    """Reranking (retrieval format with top_ranked): every (sub-)query once, every document once."""
    s = descriptive_stats("Reranking", name)["test"]
    requested = s["num_samples"]
    unique = s["queries_text_statistics"]["unique_texts"] + s["documents_text_statistics"]["unique_texts"]
    return (
        requested,
        unique,
        "stats: queries + documents; unique = unique queries + unique docs (upper bound)",
    )


def clustering_count(name: str) -> tuple[int, int, str]:
    """Legacy clustering: every sentence of every set."""
    s = descriptive_stats("Clustering", name)["test"]
    return s["num_samples"], s["text_statistics"]["unique_texts"], "stats: all sentences of all sets (exact)"


def task_count(name: str) -> TaskCount:
    """Requested and unique texts of one of the 32 tasks (test split, rule-(a) subsets)."""
    from layertime import suite

    kind = suite.task_type(name)
    task = suite.build_task(name)
    subsets = tuple(task.hf_subsets)
    if kind == "Classification":
        requested, unique, basis = classification_count(task, name)
    elif kind in ("PairClassification", "STS"):
        requested, unique, basis = pair_count(kind, name, subsets)
    elif kind == "Reranking":
        requested, unique, basis = reranking_count(name)
    else:
        requested, unique, basis = clustering_count(name)
    if name in DESIGN_MEASURED:
        req, uniq = DESIGN_MEASURED[name]
        basis += f"; docs/design.md §4 measured {req} / {uniq}"
    return TaskCount(name, kind, subsets, requested, unique, basis)


def measure_passes() -> list[dict[str, Any]]:
    from layertime import suite

    return [task_count(name).__dict__ for name in suite.LAYER_BY_LAYER_32]


# ---------------------------------------------------------------------------------------------- report


FILE_TITLE = "# Benchmarks\n"
EXPLANATION_TITLE = "## Encode benchmark (`benchmarks/encode.py`): what the numbers mean"
EXPLANATION = f"""{EXPLANATION_TITLE}

Produced by `python benchmarks/encode.py` (see its docstring for flags). Each run appends a section
titled "Encode — date — machine". Other benchmarks append their own sections to this file.

1. **Requested vs unique texts** — on the 5 local demo mteb tasks, how many texts mteb passes to
   `encode` during one evaluation (a recording pass) against how many distinct texts that is. The
   embedding step forwards only the unique ones.
2. **Real vs padded tokens** — `MultiLayerEncoder.last_stats` on a corpus of demo sentences joined and
   cut to ~5–300 tokens (log-uniform: mostly short, long tail) with 20% duplicates. Padded tokens are
   rows × longest row summed over batches. **Target: padded ≤ 1.10 × real.**
3. **Throughput** — `MultiLayerEncoder.encode` (dedup, tokenize, length-sorted token-budget batches,
   forward with `output_hidden_states=True`, final norm + mean pooling of every requested layer in
   float32, copy to numpy) against a bare forward: tokenizer + the same model object's forward with
   `output_hidden_states=True` over the same unique texts in the same batches, no pooling. Best of
   n interleaved repeats after a warm-up. **Target: pipeline/bare ≥ 0.85** (bare time / pipeline time).
   Wall time is what counts on a GPU; on a shared CPU machine other processes stretch wall time at
   random, so the process's CPU time (all threads) is shown too and is the steadier figure there.
   Two models: the tiny demo GPT-NeoX (4 blocks, d=32) and a random-weight model with Pythia-410m's
   exact config (24 blocks, d=1024, float16 weights on disk like Pythia's), both loaded from a
   fabricated hub cache by repo id and revision. A stage breakdown mirrors `encode` step by step.
4. **Forward passes of exp2** — 50 checkpoints × 4 layers × 32 tasks. Old approach: one forward pass
   per layer per task over every text mteb passes; ours: each task's unique texts once per checkpoint,
   all layers from the same pass. Counts come from mteb 2.26's shipped descriptive statistics
   (test split, rule-(a) subsets); the `basis` column says which are exact and which are estimates.
"""


def fmt_int(n: float) -> str:
    return f"{round(n):,}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_dedup(rows: list[dict[str, Any]]) -> str:
    body = [
        (r["task"], r["type"], r["requested"], r["unique"], f"{r['requested'] / r['unique']:.2f}")
        for r in rows
    ]
    return md_table(("demo task", "type", "requested", "unique", "requested/unique"), body)


def render_padding(rows: list[dict[str, Any]], corpus: dict[str, Any]) -> str:
    body = [
        (
            r["source"],
            fmt_int(r["texts"]),
            fmt_int(r.get("unique", r["texts"])),
            fmt_int(r["real"]),
            fmt_int(r["padded"]),
            r["batches"],
            f"{r['padded'] / r['real']:.3f}",
            "met" if r["padded"] <= PADDING_TARGET * r["real"] else "**missed**",
        )
        for r in rows
    ]
    table = md_table(
        ("source", "texts", "unique", "real tokens", "padded tokens", "batches", "padded/real", "≤ 1.10"),
        body,
    )
    dist = ", ".join(f"{k} {v}" for k, v in corpus.items())
    return f"Token lengths of the unique corpus texts (demo tokenizer): {dist}.\n\n{table}"


def _verdict(ratio: float) -> str:
    return "met" if ratio >= RATIO_TARGET else "**missed**"


def render_throughput(rows: list[dict[str, Any]]) -> str:
    speed = [
        (
            r["model"],
            r["layers"],
            f"{r['device']} {r['dtype']}",
            f"{fmt_int(r['texts'])} / {fmt_int(r['unique'])}",
            f"{fmt_int(r['real_tokens'])} / {fmt_int(r['padded_tokens'])}",
            r["batches"],
            f"{r['pipeline_texts_per_s']:,.0f} / {r['pipeline_unique_per_s']:,.0f}",
            f"{r['pipeline_tokens_per_s']:,.0f}",
            f"{r['bare_unique_per_s']:,.0f}",
            f"{r['bare_tokens_per_s']:,.0f}",
        )
        for r in rows
    ]
    speed_headers = (
        "model",
        "layers",
        "device",
        "texts / unique",
        "real / padded tokens",
        "batches",
        "pipeline texts/s (requested / unique)",
        "pipeline real tok/s",
        "bare texts/s",
        "bare real tok/s",
    )
    ratio = [
        (
            r["model"],
            r["layers"],
            f"{r['pipeline_s']:.3f} ({r['pipeline_median_s']:.3f})",
            f"{r['bare_s']:.3f} ({r['bare_median_s']:.3f})",
            f"{r['ratio']:.3f} ({r['ratio_median']:.3f})",
            f"{r['pipeline_cpu_s']:.3f}",
            f"{r['bare_cpu_s']:.3f}",
            f"{r['ratio_cpu']:.3f}",
            f"{_verdict(r['ratio'])} / {_verdict(r['ratio_cpu'])}",
        )
        for r in rows
    ]
    ratio_headers = (
        "model",
        "layers",
        "pipeline wall s, best (median)",
        "bare wall s, best (median)",
        "bare/pipeline wall, best (median)",
        "pipeline CPU s, best",
        "bare CPU s, best",
        "bare/pipeline CPU",
        "≥ 0.85 (wall / CPU)",
    )
    note = (
        "Throughput from the best wall time. The ratio is bare time / pipeline time (= pipeline "
        "throughput / bare throughput): 1.0 means the pipeline costs nothing beyond the forward pass."
    )
    return f"{md_table(speed_headers, speed)}\n\n{note}\n\n{md_table(ratio_headers, ratio)}"


def render_stages(rows: list[dict[str, Any]]) -> str:
    stages = ("dedup+tokenize", "build", "forward", "post", "scatter")
    body = [
        (
            r["model"],
            r["layers"],
            r["unit"],
            *(f"{r[s]:.3f} ({100 * r[s] / r['total']:.0f}%)" for s in stages),
            f"{r['total']:.3f}",
        )
        for r in rows
    ]
    return md_table(("model", "layers", "clock", *stages, "total"), body)


def render_passes(rows: list[dict[str, Any]]) -> str:
    body = [
        (
            r["task"],
            r["type"],
            ",".join(r["subsets"]),
            fmt_int(r["requested"]),
            fmt_int(r["unique"]),
            f"{r['requested'] / r['unique']:.1f}",
            r["basis"],
        )
        for r in rows
    ]
    req = sum(r["requested"] for r in rows)
    uniq = sum(r["unique"] for r in rows)
    body.append(
        ("**Σ 32 tasks**", "", "", f"**{fmt_int(req)}**", f"**{fmt_int(uniq)}**", f"**{req / uniq:.1f}**", "")
    )
    table = md_table(("task", "type", "subsets", "requested", "unique", "req/unique", "basis"), body)
    summary = md_table(
        (
            "experiment",
            "old: checkpoints × layers × Σ requested",
            "ours: checkpoints × Σ unique",
            "old / ours",
        ),
        [
            _passes_row("exp2 (50 ckpt × 4 layers)", EXP2_CHECKPOINTS, EXP2_LAYERS, req, uniq),
            _passes_row("exp1 (1 ckpt × 9 layers)", EXP1_CHECKPOINTS, EXP1_LAYERS, req, uniq),
        ],
    )
    return f"{table}\n\nText forward passes (one text through the model once = 1):\n\n{summary}"


def _passes_row(label: str, checkpoints: int, layers: int, requested: int, unique: int) -> tuple[str, ...]:
    old, ours = checkpoints * layers * requested, checkpoints * unique
    return (label, fmt_int(old), fmt_int(ours), f"{old / ours:.1f}×")


def render_section(report: Report) -> str:
    m = report.machine
    machine = ", ".join(f"{k}: {v}" for k, v in m.items() if k != "date")
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    parts = [
        f"## Encode — {machine_title(m)}",
        f"Machine — {machine}.  \nSettings — {settings}. Script wall time: {report.seconds:.0f} s.",
        "### 1. Requested vs unique texts (demo tasks)",
        render_dedup(report.dedup),
        "### 2. Real vs padded tokens",
        render_padding(report.padding, report.corpus),
        "### 3. Throughput: pipeline vs bare forward",
        render_throughput(report.throughput),
        "Where one pipeline `encode` spends its time (stage mirror of `MultiLayerEncoder.encode`):",
        render_stages(report.stages),
        "### 4. Forward passes: old approach vs ours (32 tasks)",
        render_passes(report.passes),
    ]
    return "\n\n".join(parts) + "\n"


def write_report(report: Report, out: Path) -> None:
    """Append the run's section to `out` (append only: other benchmarks write there too).

    A new file gets a title; a file without this benchmark's explanation gets it once, first.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = out.read_text(encoding="utf-8") if out.is_file() else ""
    parts = [] if existing else [FILE_TITLE]
    if EXPLANATION_TITLE not in existing:
        parts.append(EXPLANATION)
    parts.append(render_section(report))
    with open(out, "a", encoding="utf-8") as f:
        f.write(("\n" if existing and not existing.endswith("\n\n") else "") + "\n".join(parts))


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds, not minutes)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--texts", type=int, help="texts in the length-distribution corpus")
    parser.add_argument("--big-texts", type=int, help="unique texts of the Pythia-410m-shaped run")
    parser.add_argument("--repeats", type=int, help="timed repeats per throughput measurement (both models)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default on a CPU device: 1, steady on a shared machine; on CUDA: torch's)",
    )
    parser.add_argument("--skip-410m", action="store_true", help="skip the Pythia-410m-shaped model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to append to")
    return parser.parse_args(argv)


def choose_sizes(args: argparse.Namespace, device: torch.device) -> Sizes:
    base = SIZES["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    return dataclasses.replace(
        base,
        corpus_texts=args.texts or base.corpus_texts,
        big_texts=args.big_texts or base.big_texts,
        repeats=args.repeats or base.repeats,
        big_repeats=args.repeats or base.big_repeats,
    )


def isolate_environment(tmp: Path) -> None:
    """No network, no writes to ~/.cache: must run before mteb, transformers or huggingface_hub load."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["MTEB_CACHE"] = str(tmp / "mteb")


def pick_big_texts(encoder: MultiLayerEncoder, corpus: list[str], sizes: Sizes) -> list[str]:
    """`sizes.big_texts` distinct corpus texts whose token length lies in `sizes.big_token_range`."""
    lo, hi = sizes.big_token_range
    unique = list(dict.fromkeys(corpus))
    lengths = [len(r) for r in encoder.tokenize(unique)]
    fitting = [t for t, n in zip(unique, lengths, strict=True) if lo <= n <= hi]
    rng = random.Random(SEED + 1)
    return rng.sample(fitting, min(sizes.big_texts, len(fitting)))


def run_demo_model(
    report: Report, cache: Path, corpus: list[str], sizes: Sizes, device: torch.device
) -> None:
    repo, rev = demo_model(cache)
    encoder = load_encoder(repo, rev, cache, range(4), device, 16384)
    tokenizer = bare_tokenizer(repo, rev, cache)
    log(f"demo model: throughput on {len(corpus)} texts")
    report.throughput.append(measure_throughput("demo tiny-neox", encoder, tokenizer, corpus, sizes.repeats))
    report.padding.append(stats_row("encoder last_stats, 16384 tokens/batch", encoder))
    lengths = [len(r) for r in encoder.tokenize(list(dict.fromkeys(corpus)))]
    report.corpus = length_summary(lengths)
    report.padding += padding_by_budget(lengths, (2048, 4096, 65536))
    report.stages.append(stage_breakdown("demo tiny-neox", encoder, corpus))


def run_pythia_random(
    report: Report, cache: Path, corpus: list[str], sizes: Sizes, device: torch.device
) -> None:
    log("building the random Pythia-410m-shaped checkpoint")
    repo, rev = pythia_random_model(cache)
    tokenizer = bare_tokenizer(repo, rev, cache)
    label = "pythia-410m config, random"
    texts: list[str] = []
    for layers in sizes.big_layer_sets + sizes.big_stage_layer_sets:
        encoder = load_encoder(repo, rev, cache, layers, device, sizes.big_tokens_per_batch)
        texts = texts or pick_big_texts(encoder, corpus, sizes)
        if layers in sizes.big_layer_sets:
            log(f"pythia-410m-random layers {_layer_label(layers)}: throughput on {len(texts)} texts")
            row = measure_throughput(label, encoder, tokenizer, texts, sizes.big_repeats)
            report.throughput.append(row)
            if layers == sizes.big_layer_sets[0]:  # the texts and batches are the same for every set
                report.padding.append(
                    stats_row(f"410m run, {sizes.big_tokens_per_batch} tokens/batch", encoder)
                )
        else:
            encoder.encode(texts[:4])  # warm-up before the one-pass stage breakdown
        log(f"pythia-410m-random layers {_layer_label(layers)}: stage breakdown")
        report.stages.append(stage_breakdown(label, encoder, texts))
        del encoder


def log(message: str) -> None:
    print(f"[encode-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layertime-bench-") as tmp_name:
        tmp = Path(tmp_name)
        isolate_environment(tmp)
        import torch

        device = torch.device(
            args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        sizes = choose_sizes(args, device)
        threads = args.threads or (1 if device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        report = Report(
            machine=machine_info(device),
            settings={
                "mode": "quick" if args.quick else device.type,
                "corpus_texts": sizes.corpus_texts,
                "410m_texts": 0 if args.skip_410m else sizes.big_texts,
                "410m_token_range": f"{sizes.big_token_range[0]}-{sizes.big_token_range[1]}",
                "repeats": f"{sizes.repeats} demo / {sizes.big_repeats} 410m",
            },
        )
        log("1. recording the demo tasks")
        report.dedup = measure_dedup(tmp / "recorded")
        corpus = length_corpus(sizes.corpus_texts)
        hub = tmp / "hub"
        log("2-3. demo model")
        run_demo_model(report, hub, corpus, sizes, device)
        if not args.skip_410m:
            run_pythia_random(report, hub, corpus, sizes, device)
        log("4. exp2 pass counts")
        report.passes = measure_passes()
        report.seconds = time.perf_counter() - started
        report.machine["load avg (1 min) at end"] = load_average()
        write_report(report, args.out)
    print(render_section(report))
    log(f"done in {report.seconds:.0f} s; appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
