"""The demo's tiny GPT-NeoX loads offline by repo id and revision, like Pythia, and its checkpoints differ."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GPTNeoXModel

from layertime.demo import model as demo_model
from layertime.demo.corpus import labelled_sentences
from layertime.demo.model import (
    DEMO_REPO,
    DEMO_STEPS,
    EOS_TOKEN,
    TRAIN_SEED,
    TRAIN_SENTENCES,
    ensure_demo_model,
    read_refs,
    revision_name,
    tiny_config,
)
from layertime.hub.cache import repo_dir

LAST = revision_name(DEMO_STEPS[-1])


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """Offline mode for the module, whenever huggingface_hub was imported.

    huggingface_hub 2.4 reads HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE`, and
    `is_offline_mode()` (used by transformers too) reads that constant: patch it, not only the variable.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def cache(hub: Path, offline: None) -> Path:
    """The session's hub cache (tests/conftest.py), in which ensure_demo_model built the demo repo once."""
    return hub


@pytest.fixture(scope="module")
def commits(cache: Path) -> dict[str, str]:
    return ensure_demo_model(cache)


def load_lm(cache: Path, revision: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(DEMO_REPO, revision=revision, cache_dir=cache).eval()


def test_auto_model_loads_by_revision(cache: Path) -> None:
    model = AutoModel.from_pretrained(DEMO_REPO, revision="step1000", cache_dir=cache)
    assert isinstance(model, GPTNeoXModel)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 32
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert len(out.hidden_states) == 5  # embeddings + one per block


def test_default_cache_is_the_hub_constant(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without cache_dir, huggingface_hub and transformers use constants.HF_HUB_CACHE, read from the
    # HF_HUB_CACHE / HF_HOME variables at import: to redirect a running process, patch the constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = AutoModel.from_pretrained(DEMO_REPO, revision="step2000")
    assert model.config.hidden_size == 32


def test_revisions_and_main(cache: Path, commits: dict[str, str]) -> None:
    assert list(commits) == [revision_name(step) for step in DEMO_STEPS] + ["main"]
    refs = repo_dir(DEMO_REPO, cache) / "refs"
    assert {p.name: p.read_text() for p in refs.iterdir()} == commits
    assert commits["main"] == commits[LAST]  # as Pythia's main is its last step
    assert len(set(commits.values())) == len(DEMO_STEPS)


def test_checkpoints_differ(cache: Path) -> None:
    states = {r: load_lm(cache, r).state_dict() for r in (revision_name(s) for s in DEMO_STEPS)}
    names = list(states)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            key = "gpt_neox.layers.0.attention.query_key_value.weight"
            assert not torch.equal(states[first][key], states[second][key]), (first, second)
    main = load_lm(cache, "main").state_dict()
    assert all(torch.equal(main[k], v) for k, v in states[LAST].items())


def test_tokenizer_is_pythia_like(cache: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_REPO, revision="step1000", cache_dir=cache)
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    text = "The team talked about the long match yesterday."
    ids = tokenizer(text)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 0 not in ids  # no BOS/EOS added
    assert tokenizer.decode(ids) == text
    assert 200 <= len(tokenizer) <= 600


def test_second_call_does_not_rebuild(cache: Path, commits: dict[str, str]) -> None:
    repo = repo_dir(DEMO_REPO, cache)
    before = {p: p.lstat().st_mtime_ns for p in repo.rglob("*")}
    assert ensure_demo_model(cache) == commits
    assert {p: p.lstat().st_mtime_ns for p in repo.rglob("*")} == before


def test_training_reduced_held_out_loss(cache: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_REPO, revision="main", cache_dir=cache)
    seen = {text for text, _ in labelled_sentences(TRAIN_SENTENCES, seed=TRAIN_SEED)}
    held_out = [text for text, _ in labelled_sentences(80, seed=TRAIN_SEED + 1000) if text not in seen]
    assert len(held_out) >= 40
    # One padded batch; padding with EOS (the tokenizer has no pad token) is masked out of the loss.
    encoded = [tokenizer(text)["input_ids"] for text in held_out]
    width = max(map(len, encoded))
    input_ids = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids in encoded])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded])
    labels = input_ids.masked_fill(mask == 0, -100)

    def loss(revision: str) -> float:
        with torch.no_grad():
            return load_lm(cache, revision)(
                input_ids=input_ids, attention_mask=mask, labels=labels
            ).loss.item()

    losses = [loss(revision_name(step)) for step in DEMO_STEPS]
    assert losses[0] > 5.0  # about log(vocab size): untrained
    assert losses[-1] < 0.5 * losses[0]
    assert losses == sorted(losses, reverse=True), losses  # every checkpoint better than the one before


def test_model_is_tiny(cache: Path) -> None:
    assert load_lm(cache, "main").num_parameters() < 1e6
    assert tiny_config(500).num_hidden_layers == 4


def _fake_build(
    source: Path, calls: list[Path], before: Callable[[], None] = lambda: None
) -> Callable[[Path], dict[str, str]]:
    """A stand-in for build_demo_model: copies a finished build instead of training (slowly), after
    `before()`."""

    def build(cache_dir: Path) -> dict[str, str]:
        calls.append(cache_dir)
        before()
        target = repo_dir(DEMO_REPO, cache_dir)
        shutil.rmtree(target, ignore_errors=True)  # whatever a killed build left behind
        shutil.copytree(repo_dir(DEMO_REPO, source), target, symlinks=True)
        return read_refs(cache_dir) or {}

    return build


def test_rebuild_after_partial_build(
    cache: Path, commits: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A build killed before writing main leaves no complete repo: the next call builds again.
    shutil.copytree(cache, tmp_path, symlinks=True, dirs_exist_ok=True)
    (repo_dir(DEMO_REPO, tmp_path) / "refs" / "main").unlink()
    calls: list[Path] = []
    monkeypatch.setattr(demo_model, "build_demo_model", _fake_build(cache, calls))
    assert ensure_demo_model(tmp_path) == commits
    assert calls == [tmp_path]


def test_concurrent_callers_build_once(
    cache: Path, commits: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # flock locks belong to open file descriptions, so threads exclude each other as processes do.
    # The build goes on only once every caller has found no repo (their first read of the refs; the
    # builder reads them twice): all three then meet the lock, none by luck of timing.
    calls: list[Path] = []
    checked = threading.Semaphore(0)
    real_read = demo_model.read_refs

    def counted_read(*args, **kwargs):
        found = real_read(*args, **kwargs)
        checked.release()
        return found

    def when_all_checked() -> None:
        assert all(checked.acquire(timeout=60) for _ in range(4)), "not every caller looked for the repo"

    monkeypatch.setattr(demo_model, "read_refs", counted_read)
    monkeypatch.setattr(demo_model, "build_demo_model", _fake_build(cache, calls, when_all_checked))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: ensure_demo_model(tmp_path), range(3)))
    assert results == [commits] * 3
    assert len(calls) == 1
