"""The Hugging Face cache layout has one home, `layertime.hub.cache` (issue 16).

Its paths are checked against huggingface_hub's own readers (`scan_cache_dir`, `try_to_load_from_cache`,
`repo_folder_name`) on a cache the fake hub writes, so a second copy of the layout that drifts (in the
fake or in the readers) fails here; and no code outside `layertime/hub/` spells the layout's names.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

from layertime.hub import cache
from layertime.hub.fake import blob_etag, fake_commit, write_snapshot

ROOT = Path(__file__).resolve().parents[1]
REPO = "acme/toy-model"
FILES = {
    "config.json": b'{"model_type": "gpt_neox"}',
    "model.safetensors": b"\x00w\x01",
    "sub/notes.txt": b"hi\n",
}
OTHER = {"config.json": b'{"model_type": "gpt_neox", "hidden_size": 8}'}


@pytest.fixture
def written(tmp_path: Path) -> dict[str, str]:
    """A cache the fake hub wrote: two commits of REPO, three revision names; revision -> commit."""
    first = write_snapshot(tmp_path, REPO, FILES, ["step0", "main"], commit=fake_commit(REPO, "step0"))
    second = write_snapshot(tmp_path, REPO, OTHER, ["step1000"], commit=fake_commit(REPO, "step1000"))
    return {"step0": first, "main": first, "step1000": second}


def test_cache_paths_are_where_huggingface_hub_finds_the_repo_its_snapshots_refs_and_blobs(
    tmp_path: Path, written: dict[str, str]
) -> None:
    [repo] = scan_cache_dir(tmp_path).repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    assert repo.repo_path == cache.repo_dir(REPO, tmp_path)
    assert repo.refs == {
        name: next(r for r in repo.revisions if r.commit_hash == c) for name, c in written.items()
    }
    for revision in repo.revisions:
        commit = revision.commit_hash
        assert revision.snapshot_path == cache.snapshot_dir(REPO, commit, tmp_path)
        assert revision.snapshot_path.parent == cache.snapshots_dir(REPO, tmp_path)
        for f in revision.files:
            assert f.blob_path == cache.blob_file(REPO, f.blob_path.name, tmp_path)
            assert cache.is_blob(f.file_path.resolve())
    for name, commit in written.items():
        assert cache.cached_commit(REPO, name, tmp_path) == commit
        assert cache.ref_file(REPO, name, tmp_path).read_text() == commit
        found = try_to_load_from_cache(REPO, "config.json", cache_dir=tmp_path, revision=name)
        assert found == str(cache.snapshot_dir(REPO, commit, tmp_path) / "config.json")
        assert cache.cached_snapshot(REPO, name, tmp_path) == Path(found).parent
    # A commit hash is its own commit, looked up in snapshots/ directly (never in refs/).
    assert cache.cached_commit(REPO, written["step1000"], tmp_path) == written["step1000"]
    assert cache.cached_commit(REPO, "step2000", tmp_path) is None
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=tmp_path, revision="step2000") is None


def test_a_blob_is_named_by_its_etag_where_huggingface_hub_reads_it(
    tmp_path: Path, written: dict[str, str]
) -> None:
    for name, content in FILES.items():
        blob = cache.blob_file(REPO, blob_etag(name, content), tmp_path)
        assert blob.read_bytes() == content
        found = try_to_load_from_cache(REPO, name, cache_dir=tmp_path, revision="main")
        assert Path(found).resolve() == blob.resolve()


@pytest.mark.parametrize("repo_type", ["model", "dataset", "space"])
def test_repo_folders_are_named_as_huggingface_hub_names_them(tmp_path: Path, repo_type: str) -> None:
    for repo_id in ("acme/toy-model", "mteb/SciDocsRR", "gpt2"):
        expected = tmp_path / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
        assert cache.repo_dir(repo_id, tmp_path, repo_type) == expected


def test_the_cache_in_effect_is_the_argument_else_hf_hub_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "env"))
    assert cache.repo_dir(REPO) == tmp_path / "env" / "models--acme--toy-model"
    assert cache.repo_dir(REPO, tmp_path / "arg") == tmp_path / "arg" / "models--acme--toy-model"


# ----------------------------------------------------------------------------- one home for the layout

# String literals that name a part of the cache layout: a repo folder, or a snapshots/refs/blobs/trees
# path component. Docstrings and comments may talk about them; code outside layertime/hub/ may not.
_LAYOUT = re.compile(r"(models|datasets)--|(^|/)(snapshots|refs|blobs|trees)(/|$)")
_SOURCES = ("layertime", "tasks", "flows", "benchmarks")


def _layout_literals(path: Path) -> list[str]:
    """`line: literal` for each string literal of `path` (docstrings aside) that names a part of the layout."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and _LAYOUT.search(node.value)
    ]


def test_no_code_outside_layertime_hub_spells_the_cache_layout() -> None:
    hub = ROOT / "layertime" / "hub"
    found = [
        f"{path.relative_to(ROOT)}:{hit}"
        for folder in _SOURCES
        for path in sorted((ROOT / folder).rglob("*.py"))
        if hub not in path.parents
        for hit in _layout_literals(path)
    ]
    assert found == [], "build cache paths with layertime.hub.cache (repo_dir, snapshot_dir, ref_file, ...)"


def test_the_layout_check_sees_a_path_built_by_hand(tmp_path: Path) -> None:
    source = tmp_path / "reader.py"
    source.write_text(
        '"""Reads snapshots/ (a docstring may say so)."""\n'
        "def f(cache, repo, commit):\n"
        '    return cache / f"models--{repo}" / "snapshots" / commit\n'
    )
    assert sorted(_layout_literals(source)) == ["3: 'models--'", "3: 'snapshots'"]
