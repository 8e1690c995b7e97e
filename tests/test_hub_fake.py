"""The fabricated hub cache is read by huggingface_hub and transformers exactly like a downloaded one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoConfig, GPTNeoXConfig

from layertime.hub.cache import repo_dir
from layertime.hub.fake import (
    PYTHIA_410M_CONFIG,
    blob_etag,
    fake_commit,
    write_config_only_repo,
    write_snapshot,
)

REPO = "acme/toy-model"
CONFIG = json.dumps({"model_type": "gpt_neox", "hidden_size": 8}).encode()
FILES = {"config.json": CONFIG, "model.safetensors": b"\x00weights\x01", "nested/dir/notes.txt": b"hello\n"}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode for this test, whenever huggingface_hub was imported.

    huggingface_hub 2.4 reads HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE`;
    `is_offline_mode()` (which transformers calls too) reads that constant at call time. Setting the
    environment variable alone is too late once anything imported huggingface_hub, so patch the constant,
    and set the variable for any subprocess.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub"


def test_offline_mode_is_on() -> None:
    assert huggingface_hub.is_offline_mode()


def test_hf_hub_download_finds_files_by_revision(cache: Path) -> None:
    commit = write_snapshot(cache, REPO, FILES, ["step1000"])
    for filename, content in FILES.items():
        path = Path(hf_hub_download(REPO, filename, revision="step1000", cache_dir=cache))
        assert path == repo_dir(REPO, cache) / "snapshots" / commit / filename
        assert path.read_bytes() == content
    # A commit hash is looked up in snapshots/ directly.
    by_commit = hf_hub_download(REPO, "config.json", revision=commit, cache_dir=cache)
    assert Path(by_commit).read_bytes() == CONFIG


def test_try_to_load_from_cache(cache: Path) -> None:
    commit = write_snapshot(cache, REPO, FILES, ["step1000"])
    found = try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision="step1000")
    assert found == str(repo_dir(REPO, cache) / "snapshots" / commit / "config.json")
    assert try_to_load_from_cache(REPO, "missing.json", cache_dir=cache, revision="step1000") is None
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision="step2000") is None
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=cache) is None  # no main written


def test_layout_matches_huggingface_hub(cache: Path) -> None:
    commit = write_snapshot(cache, REPO, FILES, ["step1000", "refs/pr/1"])
    repo = repo_dir(REPO, cache)
    assert repo.name == "models--acme--toy-model"
    # hf_hub_download reads refs without stripping: exactly the 40 hex characters.
    assert (repo / "refs" / "step1000").read_bytes() == commit.encode()
    assert (repo / "refs" / "refs" / "pr" / "1").read_text() == commit
    for filename, content in FILES.items():
        link = repo / "snapshots" / commit / filename
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (repo / "blobs" / blob_etag(filename, content)).resolve()
    # LFS files are named by sha256, others by git blob sha1, as on the hub.
    assert len(blob_etag("model.safetensors", b"x")) == 64 and len(blob_etag("config.json", b"x")) == 40
    info = scan_cache_dir(cache)
    assert not info.warnings
    (cached,) = info.repos
    assert cached.repo_id == REPO and cached.repo_type == "model"
    (revision,) = cached.revisions
    assert revision.commit_hash == commit and revision.refs == {"step1000", "refs/pr/1"}
    assert {f.file_name for f in revision.files} == {"config.json", "model.safetensors", "notes.txt"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_small_file_etag_is_the_git_blob_hash(tmp_path: Path) -> None:
    source = tmp_path / "config.json"
    source.write_bytes(CONFIG)
    git = subprocess.run(["git", "hash-object", str(source)], capture_output=True, text=True, check=True)
    assert blob_etag("config.json", CONFIG) == git.stdout.strip()


def test_two_revisions_on_one_commit_share_the_snapshot(cache: Path) -> None:
    commit = write_snapshot(cache, REPO, FILES, ["step143000", "main"])
    repo = repo_dir(REPO, cache)
    assert [p.name for p in (repo / "snapshots").iterdir()] == [commit]
    assert (repo / "refs" / "main").read_text() == (repo / "refs" / "step143000").read_text() == commit
    paths = {
        hf_hub_download(REPO, "config.json", revision=r, cache_dir=cache) for r in ("main", "step143000")
    }
    assert len(paths) == 1


def test_revision_not_written_fails(cache: Path) -> None:
    write_snapshot(cache, REPO, FILES, ["step1000"])
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "config.json", revision="step2000", cache_dir=cache)
    with pytest.raises(OSError):
        AutoConfig.from_pretrained(REPO, revision="step2000", cache_dir=cache)


def test_write_snapshot_is_idempotent(cache: Path) -> None:
    first = write_snapshot(cache, REPO, FILES, ["step1000"])
    repo = repo_dir(REPO, cache)
    before = {p: p.lstat().st_mtime_ns for p in repo.rglob("*")}
    assert write_snapshot(cache, REPO, dict(reversed(FILES.items())), ["step1000"]) == first
    assert {p: p.lstat().st_mtime_ns for p in repo.rglob("*")} == before  # nothing rewritten, no temp files


def test_default_commit_depends_on_contents(cache: Path) -> None:
    first = write_snapshot(cache, REPO, FILES, ["a"])
    second = write_snapshot(cache, REPO, {**FILES, "config.json": b"{}"}, ["b"])
    assert first != second
    # Moving a ref is allowed (branches move); the old snapshot stays.
    assert write_snapshot(cache, REPO, {**FILES, "config.json": b"{}"}, ["a"]) == second
    assert (repo_dir(REPO, cache) / "refs" / "a").read_text() == second
    assert len(list((repo_dir(REPO, cache) / "snapshots").iterdir())) == 2


def test_explicit_commit_must_be_a_hash(cache: Path) -> None:
    with pytest.raises(ValueError):
        write_snapshot(cache, REPO, FILES, ["main"], commit="not-a-hash")


def test_fake_commit_is_deterministic() -> None:
    commit = fake_commit("acme/model", "step1000")
    assert commit == fake_commit("acme/model", "step1000")
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    assert commit != fake_commit("acme/model", "step2000")
    assert fake_commit("ab", "c") != fake_commit("a", "bc")


def test_auto_config_loads_pythia_shapes_by_revision(cache: Path) -> None:
    commits = write_config_only_repo(
        cache,
        "EleutherAI/pythia-410m",
        PYTHIA_410M_CONFIG,
        ["step0", "step1000", "step143000"],
        {"main": "step143000"},
    )
    assert set(commits) == {"step0", "step1000", "step143000", "main"}
    assert len(set(commits.values())) == 3  # one commit per revision
    assert commits["main"] == commits["step143000"]
    refs = repo_dir("EleutherAI/pythia-410m", cache) / "refs"
    assert {p.name: p.read_text() for p in refs.iterdir()} == commits
    for revision in ("step1000", "main", None):
        config = AutoConfig.from_pretrained("EleutherAI/pythia-410m", revision=revision, cache_dir=cache)
        assert isinstance(config, GPTNeoXConfig)
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (24, 1024, 16)
        assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (
            4096,
            50304,
            2048,
        )
        # transformers 5 maps Pythia's rotary_pct / rotary_emb_base into rope_parameters.
        assert config.rope_parameters["partial_rotary_factor"] == 0.25
        assert config.rope_parameters["rope_theta"] == 10000
        assert config.use_parallel_residual and not config.tie_word_embeddings
        assert (config.bos_token_id, config.eos_token_id) == (0, 0)


def test_pythia_config_fields_are_gpt_neox_config_fields() -> None:
    # Every field is one GPTNeoXConfig declares, one PreTrainedConfig handles, or a rope alias.
    declared = set(GPTNeoXConfig.__dataclass_fields__)
    known = declared | {"architectures", "model_type", "torch_dtype", "transformers_version"}
    assert set(PYTHIA_410M_CONFIG) - known == {"rotary_emb_base", "rotary_pct"}


def test_aliases_must_target_written_revisions(cache: Path) -> None:
    with pytest.raises(ValueError):
        write_config_only_repo(
            cache, "EleutherAI/pythia-410m", PYTHIA_410M_CONFIG, ["step0"], {"main": "step9"}
        )
