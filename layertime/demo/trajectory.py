"""The trajectory world: a tiny GPT-NeoX with a real training run and Pythia-spaced checkpoints (issue 21).

The demo model (`layertime.demo.model`: 4 blocks, 4 checkpoints) is enough to exercise the pipeline,
but too small a grid to know where the best (checkpoint, layer) of a training run lies. The
layer search (`layertime.search`) needs a grid whose every cell is known — the truth it is replayed
against (`benchmarks/search.py`) — and whose landscape has the structure a real one has: scores that
improve over training and a best layer that moves.

This module trains, on one CPU thread, an 8-block GPT-NeoX (d=64, about 470k parameters) on 20,000
sentences of the demo corpus (`layertime.demo.corpus`), with Pythia's optimiser shape (AdamW, a linear
warm-up over the first 1% of steps, then cosine decay to 10% of the peak rate), and saves it at 41
checkpoints spaced as Pythia's are: ``step0``, then every power of two ``step1..step512`` (log-spaced
early, where a model changes fastest), then evenly every 100 steps ``step600..step3500``.
Revision ``step{N}`` holds the weights after ``N // TRAJECTORY_LABEL_SCALE`` optimizer steps; the
scale is 1 here (labels are real steps), because the powers of two must be distinct checkpoints.

It is written into a Hugging Face hub cache as repo ``layertime/tiny-neox-trajectory`` with the demo's
tokenizer layout (`layertime.demo.model.tokenizer_files`) and ``main`` on the last step's commit;
deterministic (seeded, one torch thread), built once per cache under the demo's build lock
(`layertime.demo.model.build_lock`), a few CPU-minutes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from layertime.demo.corpus import labelled_sentences
from layertime.demo.model import (
    BATCH_SIZE,
    EOS_TOKEN,
    TRAIN_SEED,
    build_lock,
    deterministic_cpu,
    padded_batch,
    read_refs,
    revision_name,
    tiny_config,
    tokenizer_files,
    train_tokenizer,
    weight_files,
)
from layertime.hub.fake import fake_commit, write_snapshot

TRAJECTORY_REPO = "layertime/tiny-neox-trajectory"
TRAJECTORY_LABEL_SCALE = 1
"""Revision ``step{N}`` holds the weights after ``N // TRAJECTORY_LABEL_SCALE`` optimizer steps."""
LOG_STEPS: tuple[int, ...] = (0,) + tuple(2**k for k in range(10))  # step0, step1 .. step512
EVEN_STRIDE = 100
LAST_STEP = 3500
TRAJECTORY_STEPS: tuple[int, ...] = LOG_STEPS + tuple(range(600, LAST_STEP + 1, EVEN_STRIDE))
TRAIN_TEXTS = 20_000  # distinct corpus sentences (seed TRAIN_SEED); 5.6 epochs at 3,500 steps of 32
PEAK_LR = 1e-3
WARMUP_FRACTION = 0.01  # Pythia: 1% of the steps
MIN_LR_FRACTION = 0.1  # Pythia: cosine decay to 10% of the peak
WEIGHT_DECAY = 0.01


def trajectory_revisions(steps: tuple[int, ...] = TRAJECTORY_STEPS) -> list[str]:
    """Every revision of the trajectory repo, ``main`` last."""
    return [revision_name(step) for step in steps] + ["main"]


def trajectory_config(vocab_size: int) -> GPTNeoXConfig:
    """A Pythia-shaped GPT-NeoX: 8 blocks, d=64, 4 heads (about 470k parameters with ~500 tokens)."""
    return tiny_config(vocab_size, hidden_size=64, blocks=8, intermediate_size=256)


def learning_rate(step: int, total: int, peak: float = PEAK_LR) -> float:
    """Pythia's schedule at optimizer step `step` (0-based) of `total`:

        lr = peak * (step + 1) / w                                   for step < w = ceil(0.01 * total)
        lr = peak * (m + (1 - m) * (1 + cos(pi * p)) / 2)            after, p = (step - w) / (total - w)

    with m = 0.1: a linear warm-up, then a cosine decay to a tenth of the peak at the last step.
    """
    warmup = max(1, math.ceil(WARMUP_FRACTION * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * (1 + math.cos(math.pi * progress)) / 2)


def train_trajectory(
    texts: list[str], steps: tuple[int, ...] = TRAJECTORY_STEPS, seed: int = TRAIN_SEED
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Train on `texts` and yield (step label, saved files) at every label in `steps` (ascending).

    The schedule always spans `TRAJECTORY_STEPS` (the full run), so a prefix of the labels (a test's
    two-checkpoint slice) yields exactly the weights the full build has at those labels.
    """
    tokenizer = train_tokenizer(texts)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    encoded = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    total = TRAJECTORY_STEPS[-1] // TRAJECTORY_LABEL_SCALE
    order = random.Random(seed)  # batch order, independent of torch's RNG
    shared = tokenizer_files(tokenizer)
    with deterministic_cpu(seed):
        model = GPTNeoXForCausalLM(trajectory_config(tokenizer.get_vocab_size()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=WEIGHT_DECAY)
        done = 0
        for label in steps:
            model.train()
            for step in range(done, label // TRAJECTORY_LABEL_SCALE):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total)
                loss = model(**padded_batch(order.sample(encoded, BATCH_SIZE), eos_id)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            done = label // TRAJECTORY_LABEL_SCALE
            model.eval()
            yield label, {**weight_files(model), **shared}


def training_texts() -> list[str]:
    """The training text: `TRAIN_TEXTS` distinct demo-corpus sentences (seed `TRAIN_SEED`)."""
    return [text for text, _ in labelled_sentences(TRAIN_TEXTS, seed=TRAIN_SEED)]


def build_trajectory_model(cache_dir: Path, steps: tuple[int, ...] = TRAJECTORY_STEPS) -> dict[str, str]:
    """Train and write the revisions `steps` (and ``main`` = the last) into `cache_dir`, unconditionally.

    Each checkpoint is written as soon as it is trained; ``main`` is written last, so its ref existing
    marks a complete build (`read_refs`).
    """
    commits: dict[str, str] = {}
    for step, files in train_trajectory(training_texts(), steps):
        revision = revision_name(step)
        names = [revision, "main"] if step == steps[-1] else [revision]
        commit = write_snapshot(
            cache_dir, TRAJECTORY_REPO, files, names, commit=fake_commit(TRAJECTORY_REPO, revision)
        )
        commits.update(dict.fromkeys(names, commit))
    return commits


def ensure_trajectory_model(cache_dir: Path, steps: tuple[int, ...] = TRAJECTORY_STEPS) -> dict[str, str]:
    """Build the trajectory repo in `cache_dir` unless complete; revision -> commit. Cheap when present;
    concurrent callers serialise on the demo's build lock, and the second finds the first one's build."""
    cache_dir = Path(cache_dir)
    revisions = trajectory_revisions(steps)
    commits = read_refs(cache_dir, TRAJECTORY_REPO, revisions)
    if commits is not None:
        return commits
    cache_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(cache_dir):
        return read_refs(cache_dir, TRAJECTORY_REPO, revisions) or build_trajectory_model(cache_dir, steps)
