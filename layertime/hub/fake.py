"""A fabricated Hugging Face hub cache, for tests and the demo: models written without the hub.

Nothing here can reach the hub (docs/design.md §9), so tests and the demo write their models straight into a
cache directory and load them back by repo id and revision with ``HF_HUB_OFFLINE=1``, through the same
code paths a user takes against the real hub. Every path comes from `layertime.hub.cache`, which
describes the layout (blobs, snapshots as relative links to them, refs of exactly 40 hex characters).

Every write is atomic (``layertime.io``: temp file + rename; a symlink: temp link + rename), so a
reader never sees half a blob or half a ref, and rewriting the same snapshot is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from layertime.hub import cache
from layertime.io import atomic_write, atomic_write_bytes

# config.json of EleutherAI/pythia-410m as published (transformers 4.x field names; GPTNeoXConfig in
# transformers 5 still accepts them and maps rotary_pct/rotary_emb_base into `rope_parameters`).
PYTHIA_410M_CONFIG: dict = {
    "architectures": ["GPTNeoXForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "classifier_dropout": 0.1,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_dropout": 0.0,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}

# Files the hub stores through git LFS get a sha256 etag; small text files a git blob sha1. Only the
# blob names depend on this; matching the hub keeps the fabricated cache indistinguishable from a real one.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


def fake_commit(*parts: str) -> str:
    """A deterministic 40-hex commit hash derived from `parts`."""
    digest = hashlib.sha1()
    for part in parts:
        # Length-prefix each part so ("ab", "c") and ("a", "bc") differ.
        encoded = part.encode()
        digest.update(f"{len(encoded)}:".encode() + encoded)
    return digest.hexdigest()


def blob_etag(filename: str, content: bytes) -> str:
    """The etag the hub would give `content`: sha256 for LFS files, the git blob sha1 otherwise."""
    if filename.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` (relative), replacing whatever is there, atomically."""
    if link.is_symlink() and os.readlink(link) == target:
        return

    def make(tmp: Path) -> None:
        tmp.unlink()  # io's empty temp file gives way to the link, which the rename puts in place
        os.symlink(target, tmp)

    atomic_write(link, make)


def _write_blob(cache_dir: Path, repo_id: str, filename: str, content: bytes) -> Path:
    """Store `content` as a blob (once: blobs are content-addressed) and return its path."""
    blob = cache.blob_file(repo_id, blob_etag(filename, content), cache_dir)
    if not blob.exists():
        atomic_write_bytes(blob, content)
    return blob


def _write_ref(cache_dir: Path, repo_id: str, revision: str, commit: str) -> None:
    """Point `revision`'s ref at `commit`. Names like ``refs/pr/1`` nest, as on the hub."""
    ref = cache.ref_file(repo_id, revision, cache_dir)
    if ref.is_file() and ref.read_text() == commit:
        return
    atomic_write_bytes(ref, commit.encode())


def default_commit(repo_id: str, files: dict[str, bytes]) -> str:
    """The commit `write_snapshot` uses when none is given: a hash of the repo id and the files."""
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        digest.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def write_snapshot(
    cache_dir: Path, repo_id: str, files: dict[str, bytes], revisions: list[str], commit: str | None = None
) -> str:
    """Write `files` as one snapshot of `repo_id` and point every name in `revisions` at it.

    Idempotent: writing the same files again changes nothing on disk. Returns the commit hash.
    """
    commit = commit or default_commit(repo_id, files)
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"commit must be 40 lowercase hex characters, got {commit!r}")
    snapshot = cache.snapshot_dir(repo_id, commit, cache_dir)
    for filename, content in files.items():
        blob = _write_blob(cache_dir, repo_id, filename, content)
        link = snapshot / filename
        # Relative, like huggingface_hub's own links, so the cache survives being moved.
        _atomic_symlink(os.path.relpath(blob, link.parent), link)
    snapshot.mkdir(parents=True, exist_ok=True)
    for revision in revisions:
        if revision != commit:
            _write_ref(cache_dir, repo_id, revision, commit)
    return commit


def write_config_only_repo(
    cache_dir: Path, repo_id: str, config: dict, revisions: list[str], aliases: dict[str, str]
) -> dict[str, str]:
    """Write a repo holding only ``config.json``: one commit per revision, plus `aliases`.

    Enough to plan runs against real model shapes (layer counts, hidden sizes) without weights. Each
    revision gets its own commit, as Pythia's ``step*`` branches do; an alias (``{"main": "step143000"}``)
    resolves to the same commit as its target. Returns revision -> commit for revisions and aliases.
    """
    unknown = sorted(set(aliases.values()) - set(revisions))
    if unknown:
        raise ValueError(f"aliases point at revisions that are not written: {unknown}")
    content = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    commits: dict[str, str] = {}
    for revision in revisions:
        names = [revision, *sorted(alias for alias, target in aliases.items() if target == revision)]
        commit = write_snapshot(
            cache_dir, repo_id, {"config.json": content}, names, commit=fake_commit(repo_id, revision)
        )
        commits.update(dict.fromkeys(names, commit))
    return commits
