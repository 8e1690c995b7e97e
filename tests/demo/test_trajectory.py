"""The trajectory world is what it claims (layertime/demo/trajectory.py): ≥ 8 blocks, tiny, ≥ 40
checkpoints spaced like Pythia's, a Pythia-shaped learning-rate schedule, and a deterministic, cached
build that loads offline by revision — checked on a 2-checkpoint slice (the full build takes minutes)."""

from __future__ import annotations

import math
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModel, GPTNeoXForCausalLM

from layertime.demo.model import VOCAB_SIZE, read_refs
from layertime.demo.trajectory import (
    PEAK_LR,
    TRAJECTORY_REPO,
    TRAJECTORY_STEPS,
    ensure_trajectory_model,
    learning_rate,
    trajectory_config,
    trajectory_revisions,
)
from layertime.hub.cache import blob_file, snapshot_dir

SLICE = (0, 1)


def test_checkpoints_are_spaced_like_pythias() -> None:
    steps = TRAJECTORY_STEPS
    assert len(steps) >= 40 and list(steps) == sorted(set(steps))
    powers = [2**k for k in range(10)]
    assert list(steps[:11]) == [0, *powers]  # step0, then every power of two 1..512: log-spaced early
    even = steps[11:]
    assert even[0] > 512 and len({b - a for a, b in zip(even, even[1:], strict=False)}) == 1  # then evenly
    assert trajectory_revisions()[-1] == "main"


def test_the_model_is_tiny_and_deep_enough() -> None:
    config = trajectory_config(VOCAB_SIZE)
    model = GPTNeoXForCausalLM(config)
    assert config.num_hidden_layers >= 8
    # Counted from the module, not the config: a misspelled config name would silently build a big model.
    assert model.num_parameters() < 1_000_000
    assert len(model.gpt_neox.layers) == config.num_hidden_layers


def test_learning_rate_is_pythias_shape() -> None:
    total = TRAJECTORY_STEPS[-1]
    warmup = math.ceil(0.01 * total)
    assert learning_rate(0, total) == pytest.approx(PEAK_LR / warmup)
    assert learning_rate(warmup - 1, total) == pytest.approx(PEAK_LR)  # end of the linear warm-up
    assert learning_rate(warmup, total) == pytest.approx(PEAK_LR)  # cosine from the peak ...
    assert learning_rate(total, total) == pytest.approx(0.1 * PEAK_LR)  # ... to a tenth of it
    lrs = [learning_rate(s, total) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.fixture(scope="module")
def offline() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, offline: None) -> tuple[Path, dict[str, str]]:
    cache = tmp_path_factory.mktemp("trajectory-hub")
    return cache, ensure_trajectory_model(cache, SLICE)


def _weights(cache: Path, commit: str) -> bytes:
    return (snapshot_dir(TRAJECTORY_REPO, commit, cache) / "model.safetensors").read_bytes()


def test_a_slice_builds_loads_offline_and_trains(built: tuple[Path, dict[str, str]]) -> None:
    cache, commits = built
    assert list(commits) == ["step0", "step1", "main"] and commits["main"] == commits["step1"]
    models = {
        r: AutoModel.from_pretrained(TRAJECTORY_REPO, revision=r, cache_dir=cache) for r in ("step0", "step1")
    }
    assert models["step0"].config.num_hidden_layers == 8
    with torch.no_grad():
        out = models["step1"](input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert len(out.hidden_states) == 9  # embeddings + one per block
    # One optimizer step changed the weights.
    assert not torch.equal(models["step0"].embed_in.weight, models["step1"].embed_in.weight)


def test_the_build_is_cached_and_deterministic(built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    cache, commits = built
    weights = _weights(cache, commits["step1"])
    stamp = blob_file(TRAJECTORY_REPO, _etag(cache, commits["step1"]), cache).stat().st_mtime_ns
    assert ensure_trajectory_model(cache, SLICE) == commits  # present: nothing rebuilt
    assert blob_file(TRAJECTORY_REPO, _etag(cache, commits["step1"]), cache).stat().st_mtime_ns == stamp
    again = ensure_trajectory_model(tmp_path, SLICE)  # another cache, built from scratch
    assert again == commits and _weights(tmp_path, again["step1"]) == weights
    assert read_refs(tmp_path, TRAJECTORY_REPO, trajectory_revisions(SLICE)) == commits


def _etag(cache: Path, commit: str) -> str:
    return (snapshot_dir(TRAJECTORY_REPO, commit, cache) / "model.safetensors").resolve().name
