"""A `model:` that is a local directory (issue 24): its units are keyed by the sha256 of its files, so
weights replaced in place are scored again (they were "already done", keyed by path and revision
name); the records and environment.json name that digest; hashing it again costs a stat per file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from specs import DEMO  # tests/specs.py
from test_faults import _cli  # the in-process CLI of the tests beside this one

from layertime import checkpoints
from layertime.demo.model import DEMO_REPO
from layertime.file_hashes import FileHashes, directory_digest, memo_file
from layertime.hub.cache import cached_commit, snapshot_dir


def _model_dir(hub: Path, revision: str, target: Path) -> Path:
    """The demo model's files at `revision`, as a plain local directory (links resolved)."""
    shutil.copytree(snapshot_dir(DEMO_REPO, cached_commit(DEMO_REPO, revision, hub), hub), target)
    return target


def _spec(tmp_path: Path, model: Path, run: str) -> Path:
    data = {**DEMO, "model": str(model), "checkpoints": ["main"], "layers": [1, 3], "tasks": ["DemoSTS"],
            "metrics": None, "run_root": str(tmp_path / run / "demo"), "hf_cache": str(tmp_path / "hf")}  # fmt: skip
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _table(root: Path, name: str) -> pl.DataFrame:
    """A table without what may differ between two runs of the same content: measured costs and the
    directory's path."""
    table = pl.read_parquet(root / "demo/tables" / f"{name}.parquet")
    return table.drop([c for c in ("seconds", "peak_memory_gb", "model") if c in table.columns])


def _recorded_commits(root: Path) -> set[str]:
    records = (root / "store/scores").rglob("layer_*.json")
    return {row["commit"] for record in records for row in json.loads(record.read_text())["rows"]}


@pytest.mark.slow
def test_replaced_weights_of_a_local_model_are_scored_again_as_a_fresh_run_scores_them(hub, tmp_path):
    model = _model_dir(hub, "step1000", tmp_path / "model")
    spec = _spec(tmp_path, model, "a")
    out = _cli("run", "--plain", str(spec))
    assert out.exit_code == 0, out.output
    assert "scored 2 (checkpoint, task, layer) units, 0 already done" in out.stdout
    before = checkpoints.local_digest(model, tmp_path / "hf")
    environment = json.loads((tmp_path / "a/demo/environment.json").read_text())
    assert environment["checkpoints"] == {"main": before} and _recorded_commits(tmp_path / "a") == {before}
    first = _table(tmp_path / "a", "scores")

    # The weights replaced in place by another checkpoint's: same name, same size, other bytes.
    weights = snapshot_dir(DEMO_REPO, cached_commit(DEMO_REPO, "step2000", hub), hub) / "model.safetensors"
    assert weights.stat().st_size == (model / "model.safetensors").stat().st_size
    shutil.copyfile(weights, model / "model.safetensors")
    out = _cli("run", "--plain", str(spec))

    assert out.exit_code == 0, out.output
    assert "scored 2 (checkpoint, task, layer) units, 0 already done" in out.stdout  # not "already done"
    after = checkpoints.local_digest(model, tmp_path / "hf")
    assert after != before
    environment = json.loads((tmp_path / "a/demo/environment.json").read_text())
    assert environment["checkpoints"] == {"main": after} and _recorded_commits(tmp_path / "a") == {
        before,
        after,
    }
    replaced = _table(tmp_path / "a", "scores")
    assert not replaced.equals(first)  # the new weights give other numbers...

    fresh_model = _model_dir(hub, "step2000", tmp_path / "fresh-model")
    out = _cli("run", "--plain", str(_spec(tmp_path, fresh_model, "b")))  # its own store: nothing reused
    assert out.exit_code == 0, out.output
    for name in ("scores", "layers"):  # ...the numbers of a fresh run on those weights, bit for bit
        assert _table(tmp_path / "a", name).equals(_table(tmp_path / "b", name)), name
    out = _cli("run", "--plain", str(spec))
    assert "scored 0 (checkpoint, task, layer) units, 2 already done" in out.stdout


def test_a_directory_digest_is_remembered_by_stat_and_changes_with_any_visible_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / ".editor-swap").write_text("not read by from_pretrained")
    memo = memo_file(tmp_path / "hf")
    first = FileHashes(memo)
    digest = directory_digest(model, first)
    first.save()
    assert set(json.loads(memo.read_text())) == {str(model / "config.json"), str(model / "model.safetensors")}

    # An unchanged file is not read again: a planted hash in the memo is what a new reader trusts.
    planted = json.loads(memo.read_text())
    planted[str(model / "config.json")][-1] = "0" * 64
    memo.write_text(json.dumps(planted))
    assert directory_digest(model, FileHashes(memo)) != digest

    memo.unlink()
    hashes = FileHashes(memo)
    (model / ".editor-swap").write_text("changed")  # hidden: not part of the model
    assert directory_digest(model, hashes) == digest
    hashes.save()
    st = (model / "model.safetensors").stat()
    (model / "model.safetensors").write_bytes(b"\1" + b"\0" * 63)  # same size...
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and mtime
    assert directory_digest(model, FileHashes(memo)) != digest  # its ctime moved: hashed again
