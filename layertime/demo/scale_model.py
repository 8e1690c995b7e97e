"""The scale world's model: the demo's tiny GPT-NeoX with exp2's 50 revisions, built offline (issue 15).

exp2 scores Pythia-410m at ``step94000..step143000/1000`` (50 revisions, ``main`` = ``step143000``). The
scale world gives the demo model (`layertime.demo.model`: 4 blocks, d=32, the same tokenizer and
corpus) exactly those revision names in repo ``layertime/tiny-neox-scale``, so a spec with exp2's
checkpoints, layers and 32 tasks plans exp2's grid unit for unit, while every unit costs
milliseconds. Revision ``step{N}`` holds the weights after ``N // SCALE_LABEL_SCALE`` optimizer steps
(step94000 = 94 steps, step143000 = 143): 50 distinct checkpoints, trained in seconds.
"""

from __future__ import annotations

from pathlib import Path

from layertime.demo.corpus import labelled_sentences
from layertime.demo.model import (
    TRAIN_SEED,
    TRAIN_SENTENCES,
    build_lock,
    read_refs,
    revision_name,
    tokenizer_files,
    train_checkpoints,
    train_tokenizer,
)
from layertime.hub.fake import fake_commit, write_snapshot

SCALE_REPO = "layertime/tiny-neox-scale"
SCALE_STEPS: tuple[int, ...] = tuple(range(94000, 143001, 1000))  # exp2's revisions
SCALE_LABEL_SCALE = 1000
"""Revision ``step{N}`` holds the weights after ``N // SCALE_LABEL_SCALE`` optimizer steps."""


def scale_revisions() -> list[str]:
    """Every revision of the scale repo, ``main`` last."""
    return [revision_name(step) for step in SCALE_STEPS] + ["main"]


def read_scale_refs(cache_dir: Path) -> dict[str, str] | None:
    """revision -> commit of the scale repo, or None unless every revision and its files are in place."""
    return read_refs(cache_dir, SCALE_REPO, scale_revisions())


def build_scale_model(cache_dir: Path) -> dict[str, str]:
    """Train and write every revision of the scale repo into `cache_dir`, unconditionally."""
    texts = [text for text, _ in labelled_sentences(TRAIN_SENTENCES, seed=TRAIN_SEED)]
    tokenizer = train_tokenizer(texts)
    shared = tokenizer_files(tokenizer)
    checkpoints = train_checkpoints(tokenizer, texts, steps=SCALE_STEPS, label_scale=SCALE_LABEL_SCALE)
    commits: dict[str, str] = {}
    for step in SCALE_STEPS:
        revision = revision_name(step)
        # main is written last, with the last step: its ref existing marks a complete build.
        names = [revision, "main"] if step == SCALE_STEPS[-1] else [revision]
        commit = write_snapshot(
            cache_dir,
            SCALE_REPO,
            {**checkpoints[step], **shared},
            names,
            commit=fake_commit(SCALE_REPO, revision),
        )
        commits.update(dict.fromkeys(names, commit))
    return commits


def ensure_scale_model(cache_dir: Path) -> dict[str, str]:
    """Build the scale repo in `cache_dir` unless it is complete; revision -> commit. Cheap when present;
    concurrent callers serialise on the demo's build lock."""
    cache_dir = Path(cache_dir)
    commits = read_scale_refs(cache_dir)
    if commits is not None:
        return commits
    cache_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(cache_dir):
        return read_scale_refs(cache_dir) or build_scale_model(cache_dir)
