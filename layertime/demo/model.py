"""The demo's tiny GPT-NeoX: a Pythia look-alike with several training checkpoints, built offline.

`ensure_demo_model` trains, on first use, a 4-block GPT-NeoX (d=32) and a byte-level BPE tokenizer on
the demo corpus, and writes them into a Hugging Face hub cache as repo ``layertime/tiny-neox`` with one
revision per checkpoint (``step0``, ``step1000``, ...) and ``main`` on the same commit as the last
step, as Pythia's ``main`` is ``step143000``. Users and tests then load it by repo id and revision with
``HF_HUB_OFFLINE=1`` and ``cache_dir=...`` (or ``HF_HUB_CACHE``), exactly as they would load Pythia.

Revision names are labels: revision ``step{N}`` holds the weights after ``N // STEP_LABEL_SCALE``
optimizer steps (step1000 = 100 real steps), which keeps the build at a few seconds on one CPU thread.

Like Pythia's tokenizer: ``<|endoftext|>`` is token 0 and the bos/eos/unk token, ``<|padding|>`` is
token 1 but *not* the pad token (no pad token is defined; callers pad with EOS), and encoding adds no
BOS/EOS. Unlike Pythia's, the vocabulary has ~500 entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from layertime.demo.corpus import labelled_sentences
from layertime.hub.cache import CorruptRef, cached_commit, snapshot_dir
from layertime.hub.fake import fake_commit, write_snapshot

DEMO_REPO = "layertime/tiny-neox"
DEMO_STEPS = (0, 1000, 2000, 3000)
STEP_LABEL_SCALE = 10
"""Revision ``step{N}`` holds the weights after ``N // STEP_LABEL_SCALE`` optimizer steps."""

EOS_TOKEN = "<|endoftext|>"
PADDING_TOKEN = "<|padding|>"  # in the vocabulary, as in Pythia's, but deliberately not the pad token
VOCAB_SIZE = 512
TRAIN_SENTENCES = 3000
TRAIN_SEED = 0
"""Corpus seed of the training text. Held-out text for evaluation must use another seed."""
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def revision_name(step: int) -> str:
    """The revision holding the checkpoint labelled `step` (``step1000``)."""
    return f"step{step}"


def demo_revisions() -> list[str]:
    """Every revision of the demo repo, ``main`` last."""
    return [revision_name(step) for step in DEMO_STEPS] + ["main"]


def tiny_config(
    vocab_size: int, hidden_size: int = 32, blocks: int = 4, intermediate_size: int = 64
) -> GPTNeoXConfig:
    """A Pythia-shaped GPT-NeoX small enough to train in seconds (defaults: about 70k parameters)."""
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        intermediate_size=intermediate_size,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=512,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["GPTNeoXForCausalLM"],
    )


# --- tokenizer -----------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with Pythia's pre-tokenization, special tokens and no post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PADDING_TOKEN],  # ids 0 and 1, as in Pythia
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files transformers' ``AutoTokenizer`` needs, in Pythia's layout.

    ``tokenizer_class`` is GPTNeoXTokenizer, as in Pythia's ``tokenizer_config.json``. That class defaults
    its pad token to ``<|padding|>`` in transformers 5, so ``pad_token`` is set to null explicitly: the
    demo has no pad token, which is the case the scoring code must handle (pad with EOS).
    """
    specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        **specials,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "model_max_length": 512,
        "tokenizer_class": "GPTNeoXTokenizer",
    }
    return {
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(specials),
    }


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# --- training ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic_cpu(seed: int) -> Iterator[None]:
    """Seed torch and use one thread, restoring the caller's RNG state and thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: fast for a model this small, and float sums in a fixed order
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def padded_batch(encoded: list[list[int]], eos_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sentences with EOS; padded positions are masked out of attention and of the loss."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), eos_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def weight_files(model: GPTNeoXForCausalLM) -> dict[str, bytes]:
    """``config.json`` and ``model.safetensors`` as ``save_pretrained`` writes them."""
    with tempfile.TemporaryDirectory(prefix="layertime-demo-") as tmp:
        model.save_pretrained(tmp)
        # Whatever else save_pretrained writes (generation_config.json) belongs in the repo too.
        files = {path.name: path.read_bytes() for path in Path(tmp).iterdir() if path.is_file()}
    missing = set(WEIGHT_FILES) - set(files)
    if missing:
        raise RuntimeError(f"save_pretrained did not write {sorted(missing)}")
    return files


def train_checkpoints(
    tokenizer: Tokenizer,
    texts: list[str],
    seed: int = TRAIN_SEED,
    steps: tuple[int, ...] = DEMO_STEPS,
    label_scale: int = STEP_LABEL_SCALE,
) -> dict[int, dict[str, bytes]]:
    """Train the tiny model on `texts`, returning the saved files at every step label in `steps`
    (label ``N`` = ``N // label_scale`` optimizer steps; `steps` ascending)."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    encoded = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    order = random.Random(seed)  # batch order, independent of torch's RNG
    checkpoints: dict[int, dict[str, bytes]] = {}
    with deterministic_cpu(seed):
        model = GPTNeoXForCausalLM(tiny_config(tokenizer.get_vocab_size()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
        done = 0
        for step in steps:
            model.train()
            for _ in range(step // label_scale - done):
                loss = model(**padded_batch(order.sample(encoded, BATCH_SIZE), eos_id)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            done = step // label_scale
            model.eval()
            checkpoints[step] = weight_files(model)
    return checkpoints


# --- the cache -----------------------------------------------------------------------------------------


def read_refs(
    cache_dir: Path, repo_id: str = DEMO_REPO, revisions: list[str] | None = None
) -> dict[str, str] | None:
    """revision -> commit of a built repo (default: the demo's), or None unless every revision
    (default: the demo's) and its files are in place (a damaged ref: not in place, built again)."""
    commits: dict[str, str] = {}
    for revision in demo_revisions() if revisions is None else revisions:
        try:
            commit = cached_commit(repo_id, revision, cache_dir)
        except CorruptRef:
            return None
        if commit is None:
            return None
        snapshot = snapshot_dir(repo_id, commit, cache_dir)
        if not all((snapshot / name).is_file() for name in WEIGHT_FILES + TOKENIZER_FILES):
            return None
        commits[revision] = commit
    return commits


@contextlib.contextmanager
def build_lock(cache_dir: Path) -> Iterator[None]:
    """An exclusive lock on the demo build in `cache_dir`, held across processes."""
    lock_path = Path(cache_dir) / ".locks" / "layertime-demo-build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_demo_model(cache_dir: Path) -> dict[str, str]:
    """Train and write every revision of the demo repo into `cache_dir`, unconditionally."""
    texts = [text for text, _ in labelled_sentences(TRAIN_SENTENCES, seed=TRAIN_SEED)]
    tokenizer = train_tokenizer(texts)
    shared = tokenizer_files(tokenizer)
    checkpoints = train_checkpoints(tokenizer, texts)
    commits: dict[str, str] = {}
    last = DEMO_STEPS[-1]
    for step in DEMO_STEPS:
        revision = revision_name(step)
        # main is written last, together with the last step: its ref existing marks a complete build.
        names = [revision, "main"] if step == last else [revision]
        commit = write_snapshot(
            cache_dir,
            DEMO_REPO,
            {**checkpoints[step], **shared},
            names,
            commit=fake_commit(DEMO_REPO, revision),
        )
        commits.update(dict.fromkeys(names, commit))
    return commits


def ensure_demo_model(cache_dir: Path) -> dict[str, str]:
    """Build the demo repo in `cache_dir` unless it is complete already; return revision -> commit.

    Cheap when the repo is present (reads the refs). Concurrent callers serialise on a file lock, and
    the second one finds the first one's build.
    """
    cache_dir = Path(cache_dir)
    commits = read_refs(cache_dir)
    if commits is not None:
        return commits
    cache_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(cache_dir):
        return read_refs(cache_dir) or build_demo_model(cache_dir)
