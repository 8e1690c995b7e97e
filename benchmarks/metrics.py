"""Benchmark of the representation metrics (issue 3): batched vs naive, and what `measure` adds to a forward.

What it measures (a markdown section is printed; ``--out FILE`` appends it to FILE):

1. **All seven metrics** on synthetic states of the target shape — N prompts with wikitext-like token
   lengths (log-normal, median 150, up to ``--max-tokens``, one prompt at the maximum), L layers, width d,
   16 views — as `measure` computes them: per-prompt entropy and curvature batch by batch
   (`metrics.prompt_metrics` over the encoder's token-budget batches), then dataset entropy, effective
   rank, InfoNCE, DiME and LiDAR from pooled embeddings; against a **naive loop** (one prompt at a
   time, `matrix_entropy` and `curvature` on unpadded states: what the paper's code did). Every layer
   costs the same, so each part is timed on one layer's states and multiplied by L. Per-metric
   seconds say where the time goes.
2. **`measure` vs a bare forward** of a random-weight GPT-NeoX with Pythia-410m's width (d = 1024) and
   ``--blocks`` blocks, loaded by repo id from a fabricated hub cache (demo tokenizer), on wikitext-like
   texts of the same length distribution: seconds of `measure` (all layers, 2 + 16 views) against a bare
   batched ``model(..., output_hidden_states=True)`` over the same texts it forwards (the prompts and
   the 16 views), same batches, dtype and device. The overhead ratio is roughly independent of depth
   (both scale with the number of layers), so a shallow model stands in for 410m on a CPU.

Target (issue 3): metrics add at most 50% to the forward pass — **on a GPU**; on a CPU the float64
eigensolvers are compared with a float32 CPU forward, which says little about the GPU target.

Run::

    . .venv/bin/activate
    python benchmarks/metrics.py --quick                   # seconds: a smoke run
    python benchmarks/metrics.py                           # CPU sizes (a few minutes on 2 cores)
    python benchmarks/metrics.py --device cuda             # the issue's sizes: 472 × ≤2048 × 25 × 1024
    python benchmarks/metrics.py --out benchmarks/RESULTS.md

No network: HF_HUB_OFFLINE=1; the model is written into a temporary hub cache.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import machine_info  # noqa: E402 (benchmarks/ is on sys.path)

if TYPE_CHECKING:
    import torch

    from layertime.encoder import MultiLayerEncoder

SEED = 0
MEDIAN_TOKENS, LENGTH_SIGMA = 150, 0.8  # wikitext-103 paragraphs: ~100-200 tokens, a long tail
BENCH_REPO = "bench/neox-d1024"


@dataclass(frozen=True)
class Sizes:
    """How big each part of a run is."""

    prompts: int
    max_tokens: int
    layers: int  # part 1's one-layer timings are multiplied by this (the issue: 25 hidden states)
    dim: int
    views: int  # LiDAR views (InfoNCE and DiME use the first 2)
    tokens_per_batch: int
    model_prompts: int
    model_max_tokens: int
    blocks: int
    repeats: int  # timed repeats of part 2 (the best is reported)


SIZES: dict[str, Sizes] = {
    "quick": Sizes(24, 256, 25, 256, 4, 4096, 8, 64, 1, 1),
    "cpu": Sizes(472, 2048, 25, 1024, 16, 16384, 32, 256, 2, 1),
    "cuda": Sizes(472, 2048, 25, 1024, 16, 16384, 472, 2048, 24, 3),
}


# ---------------------------------------------------------------------------------------------- machine


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `fn()`, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def log(message: str) -> None:
    print(f"[metrics-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- 1. synthetic


def token_lengths(n: int, max_tokens: int, seed: int = SEED) -> list[int]:
    """Wikitext-like prompt lengths: log-normal around MEDIAN_TOKENS, clipped to [3, max_tokens]."""
    rng = random.Random(seed)
    lengths = [
        min(max_tokens, max(3, round(rng.lognormvariate(math.log(MEDIAN_TOKENS), LENGTH_SIGMA))))
        for _ in range(n)
    ]
    lengths[0] = max_tokens  # the longest prompt the corpus allows
    return lengths


def synthetic_batches(
    lengths: Sequence[int], dim: int, tokens_per_batch: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer's token states, right-padded in the encoder's token-budget batches: [(mask, states)]."""
    import torch

    from layertime.encoder import token_budget_batches

    gen = torch.Generator(device="cpu").manual_seed(SEED)
    out = []
    for batch in token_budget_batches(lengths, tokens_per_batch):
        n = torch.tensor([lengths[i] for i in batch])
        T = int(n.max())
        mask = (torch.arange(T)[None] < n[:, None]).long()  # (B, T)
        states = torch.randn(len(batch), T, dim, generator=gen) + torch.randn(1, 1, dim, generator=gen) * 3
        out.append((mask.to(device), states.to(device)))
    return out


def batched_metrics(batches, pooled: torch.Tensor, views: torch.Tensor, layers: int) -> dict[str, float]:
    """Seconds per part, computed as `measure` does: one layer timed, multiplied by `layers`."""
    from layertime import metrics

    device = pooled.device
    parts = {
        "prompt entropy + curvature (one pass)": lambda: [metrics.prompt_metrics(h, m) for m, h in batches],
        "prompt entropy alone": lambda: [metrics.prompt_entropy(h, m) for m, h in batches],
        "curvature alone": lambda: [metrics.curvature(h, m) for m, h in batches],
        "dataset entropy": lambda: metrics.dataset_entropy(pooled),
        "effective rank": lambda: metrics.effective_rank(pooled),
        "InfoNCE": lambda: metrics.infonce(views[:, 0], views[:, 1]),
        "DiME": lambda: metrics.dime(views[:, 0], views[:, 1]),
        "LiDAR": lambda: metrics.lidar(views),
    }
    parts["dataset entropy"]()  # warm-up (CUDA kernels, LAPACK, allocator)
    metrics.prompt_metrics(batches[-1][1], batches[-1][0])
    return {name: layers * timed(fn, device) for name, fn in parts.items()}


def naive_metrics(batches, layers: int) -> float:
    """Seconds of the naive loop (one prompt at a time): one layer timed, multiplied by `layers`."""
    import torch

    from layertime import metrics

    prompts = [h[i, : int(m[i].sum())] for m, h in batches for i in range(m.shape[0])]

    def loop() -> None:
        for Z in prompts:
            metrics.matrix_entropy(Z)
            metrics.curvature(Z[None], torch.ones(1, Z.shape[0], device=Z.device))

    return timed(loop, batches[0][1].device) * layers


def run_synthetic(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    import torch

    lengths = token_lengths(sizes.prompts, sizes.max_tokens)
    log(
        f"1. synthetic: {sizes.prompts} prompts ({sum(lengths)} tokens) × {sizes.layers} layers × d={sizes.dim}"
    )
    batches = synthetic_batches(lengths, sizes.dim, sizes.tokens_per_batch, device)
    gen = torch.Generator(device="cpu").manual_seed(SEED + 1)
    pooled = torch.randn(sizes.prompts, sizes.dim, generator=gen).to(device)
    views = (
        pooled.cpu()[:, None] + 0.3 * torch.randn(sizes.prompts, sizes.views, sizes.dim, generator=gen)
    ).to(device)
    parts = batched_metrics(batches, pooled, views, sizes.layers)
    streamed = sum(v for k, v in parts.items() if "alone" not in k)
    log(f"   batched: {streamed:.1f} s; now the naive loop")
    naive = naive_metrics(batches, sizes.layers) + streamed - parts["prompt entropy + curvature (one pass)"]
    return {
        "tokens": sum(lengths),
        "padded": sum(m.numel() for m, _ in batches),
        "batches": len(batches),
        "parts": parts,
        "batched_s": streamed,
        "naive_s": naive,
    }


# ---------------------------------------------------------------------------------------------- 2. model


def bench_model(cache: Path, blocks: int) -> str:
    """A random GPT-NeoX with Pythia-410m's config but `blocks` blocks, as a hub snapshot: its repo id."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from layertime.demo.model import DEMO_REPO, TOKENIZER_FILES, ensure_demo_model
    from layertime.hub.cache import cached_commit, snapshot_dir
    from layertime.hub.fake import PYTHIA_410M_CONFIG, write_snapshot

    ensure_demo_model(cache)
    snapshot = snapshot_dir(DEMO_REPO, cached_commit(DEMO_REPO, "main", cache), cache)
    files = {name: (snapshot / name).read_bytes() for name in TOKENIZER_FILES}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**{**PYTHIA_410M_CONFIG, "num_hidden_layers": blocks}))
    with tempfile.TemporaryDirectory(prefix="layertime-bench-") as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        files.update({p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()})
    write_snapshot(cache, BENCH_REPO, files, ["main"])
    return BENCH_REPO


def wikitext_like(n: int, max_tokens: int) -> list[str]:
    """`n` texts of demo sentences, ~1.4 tokens per word, to the synthetic length distribution."""
    from layertime.demo.corpus import labelled_sentences

    rng = random.Random(SEED + 2)
    words = " ".join(t for t, _ in labelled_sentences(3000, seed=SEED + 3)).split()
    out = []
    for length in token_lengths(n, max_tokens, seed=SEED + 4):
        start = rng.randrange(len(words) - length)
        out.append(" ".join(words[start : start + max(2, round(length / 1.4))]))
    return out


def bare_forward(encoder: MultiLayerEncoder, texts: Sequence[str]) -> None:
    """The model alone over `texts` in the encoder's batches (token ids precomputed): nothing kept."""
    import torch

    from layertime.encoder import token_budget_batches

    ids = encoder.tokenize(texts)
    plan = token_budget_batches([len(r) for r in ids], encoder.tokens_per_batch)
    with torch.inference_mode():
        for batch in plan:
            rows = [ids[i] for i in batch]
            T = len(rows[0])
            input_ids = torch.full((len(rows), T), encoder.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            encoder.model(
                input_ids=input_ids.to(encoder.device),
                attention_mask=mask.to(encoder.device),
                output_hidden_states=True,
            )


def run_model(sizes: Sizes, device: torch.device, cache: Path) -> dict[str, Any]:
    from layertime import augment, measure
    from layertime.encoder import MultiLayerEncoder

    repo = bench_model(cache, sizes.blocks)
    encoder = MultiLayerEncoder(
        repo,
        layers="all",
        device=device,
        tokens_per_batch=sizes.tokens_per_batch,
        cache_dir=str(cache),
        max_length=sizes.max_tokens,
    )
    prompts = wikitext_like(sizes.model_prompts, sizes.model_max_tokens)
    views = [t for view in augment.views(prompts, sizes.views, SEED) for t in view]
    log(
        f"2. measure vs forward: {len(prompts)} prompts + {len(views)} view texts, {sizes.blocks} blocks, {encoder.dtype}"
    )
    measure.measure(encoder, prompts[:4], lidar_views=2)  # warm-up
    runs: dict[str, list[float]] = {"bare_prompts": [], "bare_views": [], "token_pass": [], "measure": []}
    for _ in range(sizes.repeats):  # interleaved, so drift and a neighbour's load hit all alike
        runs["bare_prompts"].append(timed(lambda: bare_forward(encoder, prompts), device))
        runs["bare_views"].append(timed(lambda: bare_forward(encoder, views), device))
        runs["token_pass"].append(timed(lambda: measure.token_pass(encoder, prompts), device))
        runs["measure"].append(
            timed(lambda: measure.measure(encoder, prompts, n_views=2, lidar_views=sizes.views), device)
        )
    bare_prompts, bare_views, token_pass, total = (min(v) for v in runs.values())
    ids = encoder.tokenize(prompts)
    return {
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "layers": len(encoder.layers),
        "prompts": len(prompts),
        "prompt_tokens": sum(map(len, ids)),
        "view_texts": len(views),
        "bare_prompts_s": bare_prompts,
        "bare_all_s": bare_prompts + bare_views,
        "token_pass_s": token_pass,
        "measure_s": total,
    }


# ---------------------------------------------------------------------------------------------- report


def render(
    machine: dict[str, str],
    sizes: Sizes,
    mode: str,
    synth: dict[str, Any],
    model: dict[str, Any] | None,
    seconds: float,
) -> str:
    where = machine["gpu"] if machine["gpu"] != "none" else f"{machine['cpu']}, {machine['cores']} cores"
    lines = [
        f"## Metrics — {machine['date']} — {where}",
        "",
        "Machine — " + ", ".join(f"{k}: {v}" for k, v in machine.items() if k != "date") + ".  ",
        f"Settings — mode={mode}, "
        + ", ".join(f"{k}={v}" for k, v in asdict(sizes).items())
        + f". Script wall time: {seconds:.0f} s.",
        "",
        f"### 1. All seven metrics: {sizes.prompts} prompts × ≤{sizes.max_tokens} tokens × {sizes.layers} layers × d={sizes.dim}",
        "",
        f"{synth['tokens']} real tokens ({synth['padded']} padded) in {synth['batches']} token-budget batches; "
        f"{sizes.views} views for LiDAR, 2 for InfoNCE/DiME; float64 math. Each part timed on one layer "
        f"and multiplied by {sizes.layers}.",
        "",
        f"| part ({sizes.layers} layers) | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {s:.2f} |" for name, s in synth["parts"].items()]
    lines += [
        "",
        f"Batched (as `measure`): **{synth['batched_s']:.1f} s**; naive per-prompt per-layer loop: "
        f"**{synth['naive_s']:.1f} s** (naive / batched = {synth['naive_s'] / synth['batched_s']:.2f}).",
    ]
    if model:
        over = model["measure_s"] / model["bare_all_s"] - 1
        lines += [
            "",
            f"### 2. `measure` vs a bare forward ({sizes.blocks} blocks, d=1024, {model['layers']} layers measured, "
            f"{model['dtype']}, best of {sizes.repeats})",
            "",
            f"{model['prompts']} prompts ({model['prompt_tokens']} tokens) + {model['view_texts']} view texts.",
            "",
            "| | seconds |",
            "|---|---:|",
            f"| bare forward, prompts | {model['bare_prompts_s']:.2f} |",
            f"| bare forward, prompts + views (what `measure` forwards) | {model['bare_all_s']:.2f} |",
            f"| `token_pass` (prompts: forward + final norm + per-prompt metrics + pooling) | {model['token_pass_s']:.2f} |",
            f"| `measure` (everything) | {model['measure_s']:.2f} |",
            "",
            f"`measure` adds **{100 * over:.0f}%** to the bare forward over the same texts "
            f"(target ≤ 50% on a GPU{'' if machine['gpu'] != 'none' else '; this is a CPU run'}).",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    for name in Sizes.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the mode's {name}")
    parser.add_argument("--skip-model", action="store_true", help="only part 1 (synthetic states)")
    parser.add_argument("--out", type=Path, help="append the markdown section to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layertime-metrics-bench-") as tmp:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(
            args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        mode = "quick" if args.quick else device.type if device.type in SIZES else "cpu"
        overrides = {k: getattr(args, k) for k in Sizes.__dataclass_fields__ if getattr(args, k) is not None}
        sizes = replace(SIZES[mode], **overrides)
        synth = run_synthetic(sizes, device)
        model = None if args.skip_model else run_model(sizes, device, Path(tmp) / "hub")
        section = render(machine_info(device), sizes, mode, synth, model, time.perf_counter() - started)
    print(section)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:  # append only: other benchmarks write here too
            f.write("\n" + section)
        log(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
