"""The Hugging Face hub cache: where huggingface_hub keeps a repo's files, and the offline switch.

This module is the one place that knows the cache's layout (huggingface_hub 2.x writes and reads it so)::

    <cache>/models--{org}--{name}/        (datasets--{org}--{name} for a dataset repo)
        blobs/<etag>                      file contents (etag: git blob sha1, or sha256 for LFS files)
        snapshots/<commit>/<filename>     relative symlink -> ../../blobs/<etag>
        refs/<revision>                   the commit hash, no trailing newline
        trees/<commit>.json               the hub's listing of the commit's files (sizes, hashes),
                                          written by `snapshot_download`

Two details matter to the readers: ``refs/<revision>`` is read with ``f.read()`` without stripping by
``hf_hub_download``, so it must hold exactly 40 hex characters; and a revision that looks like a commit
hash is looked up in ``snapshots/`` directly, never in ``refs/``.

Beside the layout: the cache in effect (`hub_cache`), offline mode (`is_offline`, `offline`), loading a
checkpoint from the cache before asking the hub (`from_cache_first`), a task's dataset read from its local
snapshot (`use_local_snapshot`, docs/design.md §4), and the `hf download` command that fills a gap
(`download_command`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from layertime import suite
from layertime.errors import Permanent

T = TypeVar("T")

_COMMIT = re.compile(r"[0-9a-f]{40}")


class MissingDatasetError(Permanent, LookupError):
    """A task's dataset is not in the cache at its pinned revision; the message says how to fetch it."""


class CheckpointError(Permanent, LookupError):
    """A revision that cannot be resolved or loaded; the message says how to fix it.

    (Defined here, beside the cache's layout, so a bad ref is one; `layertime.checkpoints` exports it.)"""


class CorruptRef(CheckpointError):
    """A `refs/<revision>` file of the cache that does not hold a 40-hex commit: never followed."""


# ----------------------------------------------------------------------------- the cache in effect, offline


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The HF hub cache directory in effect (argument, else HF_HUB_CACHE / HF_HOME, else default)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Switch huggingface_hub and datasets to offline mode for the duration (they read it at import)."""
    from huggingface_hub import constants

    saved_env, saved = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    ds_config = sys.modules.get("datasets.config")
    ds_saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE) if ds_config else (saved, saved)
    if ds_config:
        ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        constants.HF_HUB_OFFLINE = saved
        # datasets may have been imported inside the block, reading the offline env: restore it too.
        if ds_config := sys.modules.get("datasets.config"):
            ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE = ds_saved


# ----------------------------------------------------------------------------- the layout
# Every function takes (repo id, [revision | commit | etag], cache dir or None for the one in effect, repo type).


def repo_dir(repo_id: str, cache_dir: str | Path | None = None, repo_type: str = "model") -> Path:
    """``<cache>/models--org--name`` (or ``datasets--org--name``): the folder of one repo."""
    return hub_cache(cache_dir) / "--".join([f"{repo_type}s", *repo_id.split("/")])


def ref_file(
    repo_id: str, revision: str, cache_dir: str | Path | None = None, repo_type: str = "model"
) -> Path:
    """``refs/<revision>``: the file naming the commit a branch or tag points at (``refs/pr/1`` nests)."""
    return repo_dir(repo_id, cache_dir, repo_type) / "refs" / revision


def snapshots_dir(repo_id: str, cache_dir: str | Path | None = None, repo_type: str = "model") -> Path:
    """``snapshots/``: one folder per cached commit."""
    return repo_dir(repo_id, cache_dir, repo_type) / "snapshots"


def snapshot_dir(
    repo_id: str, commit: str, cache_dir: str | Path | None = None, repo_type: str = "model"
) -> Path:
    """``snapshots/<commit>``: the files of one commit, as links into ``blobs/``."""
    return snapshots_dir(repo_id, cache_dir, repo_type) / commit


def blob_file(repo_id: str, etag: str, cache_dir: str | Path | None = None, repo_type: str = "model") -> Path:
    """``blobs/<etag>``: one file's contents, shared by every snapshot that holds it."""
    return repo_dir(repo_id, cache_dir, repo_type) / "blobs" / etag


def tree_file(
    repo_id: str, commit: str, cache_dir: str | Path | None = None, repo_type: str = "model"
) -> Path:
    """``trees/<commit>.json``: the hub's listing of the commit's files, as `snapshot_download` stored it."""
    return repo_dir(repo_id, cache_dir, repo_type) / "trees" / f"{commit}.json"


def is_blob(path: Path) -> bool:
    """True when `path` (a snapshot entry, resolved) is a blob of the cache, not a file stored elsewhere."""
    return Path(path).parent.name == "blobs"


def cached_commit(
    repo_id: str, revision: str, cache_dir: str | Path | None = None, repo_type: str = "model"
) -> str | None:
    """The commit `revision` points at in the cache (a commit hash is its own), or None without a ref.

    A ref must hold a 40-hex commit: anything else (`../../elsewhere`, a truncated hash) would name a
    snapshot folder outside the repo or none, so it is a CorruptRef naming the file and the fix."""
    if _COMMIT.fullmatch(revision):
        return revision
    ref = ref_file(repo_id, revision, cache_dir, repo_type)
    if not ref.is_file():
        return None
    try:
        text = ref.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise CorruptRef(f"{ref}: cannot read the ref of {repo_id}@{revision}: {e.strerror}") from None
    commit = text.strip()
    if not _COMMIT.fullmatch(commit):
        fix = download_command(repo_id, revision=revision, repo_type=repo_type, cache_dir=cache_dir)
        raise CorruptRef(
            f"{ref}: the ref of {repo_id}@{revision} holds {text[:60]!r}, not a 40-hex commit; "
            f"the cache is damaged: fetch the revision again ({fix})"
        )
    return commit


# ----------------------------------------------------------------------------- loading a checkpoint


def cached_snapshot(model: str, revision: str | None, cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot folder of `revision` (a name or a commit; None: main) in the cache, when it holds
    the checkpoint's config; None otherwise."""
    commit = cached_commit(model, revision or "main", cache_dir)
    if commit is None:
        return None
    snapshot = snapshot_dir(model, commit, cache_dir)
    return snapshot if (snapshot / "config.json").is_file() else None


def from_cache_first(
    load: Callable[..., T],
    model: str,
    revision: str | None,
    cache_dir: str | Path | None = None,
    **kwargs: Any,
) -> T:
    """`load(model, revision=..., cache_dir=..., local_files_only=..., **kwargs)` (a transformers
    `from_pretrained`), from the cache alone when it holds the revision's snapshot.

    By commit with `local_files_only`: no request for the revision's commit, for optional files
    (chat templates, generation config) or for updates. Only when that load lacks a file does it go to
    the hub, and never under HF_HUB_OFFLINE. A local model path is loaded as it is. Without this,
    transformers asks the hub on every load and, with the hub unreachable, retries each file 5 times:
    minutes per checkpoint (issue 14.7).
    """
    cache = str(cache_dir) if cache_dir is not None else None
    if Path(model).is_dir():
        return load(model, revision=revision, cache_dir=cache, local_files_only=is_offline(), **kwargs)
    snapshot = cached_snapshot(model, revision, cache_dir)
    if snapshot is not None:
        try:
            return load(model, revision=snapshot.name, cache_dir=cache, local_files_only=True, **kwargs)
        except OSError:
            if is_offline():
                raise
            # an incomplete snapshot (a weight or tokenizer file missing): the hub completes it
    return load(model, revision=revision, cache_dir=cache, local_files_only=is_offline(), **kwargs)


# ----------------------------------------------------------------------------- task datasets


@lru_cache(maxsize=1)
def _benchmark_datasets() -> dict[str, dict[str, str]]:
    import mteb

    return {t.metadata.name: dict(t.metadata.dataset) for t in mteb.get_benchmark(suite.BENCHMARK).tasks}


def task_dataset(name: str) -> tuple[str, str] | None:
    """(dataset repo, pinned revision) of a real MTEB task; None for the in-memory demo tasks."""
    if suite.is_demo_task(name):
        return None
    dataset = _benchmark_datasets().get(name)
    if dataset is None:
        raise KeyError(f"task {name!r} is not in mteb's {suite.BENCHMARK}")
    return dataset["path"], dataset["revision"]


def dataset_snapshot(path: str, revision: str, cache_dir: str | Path | None = None) -> Path | None:
    """The local snapshot folder of dataset repo `path` at `revision`, or None when not cached."""
    commit = cached_commit(path, revision, cache_dir, "dataset")
    if commit is None:
        return None
    snapshot = snapshot_dir(path, commit, cache_dir, "dataset")
    return snapshot if snapshot.is_dir() and any(snapshot.iterdir()) else None


def use_local_snapshot(task: Any, cache_dir: str | Path | None = None) -> Any:
    """Point mteb task `task` at its dataset's local snapshot, so `task.load_data()` reads it offline.

    Offline, `datasets.load_dataset(repo_id)` falls back to the datasets cache, where reranking tasks
    silently lose their per-query candidate lists (docs/design.md §4); loading the snapshot folder keeps every
    config. Demo tasks (data in memory) are returned unchanged. MissingDatasetError when not cached.
    """
    name = task.metadata.name
    located = task_dataset(name) if not suite.is_demo_task(name) else None
    if located is None:
        return task
    path, revision = located
    snapshot = dataset_snapshot(path, revision, cache_dir)
    if snapshot is None:
        raise MissingDatasetError(
            f"dataset {path}@{revision} of task {name} is not in the HF cache {hub_cache(cache_dir)}; "
            f"fetch it on a machine with internet: layertime prefetch SPEC "
            f"(or: {download_command(path, revision=revision, repo_type='dataset', cache_dir=cache_dir)})"
        )
    task.metadata = task.metadata.model_copy(
        update={"dataset": {**task.metadata.dataset, "path": str(snapshot)}}
    )
    return task


# ----------------------------------------------------------------------------- filling a gap


def download_command(
    repo_id: str,
    files: Iterable[str] = (),
    *,
    revision: str,
    repo_type: str = "model",
    cache_dir: str | Path | None = None,
    include: Iterable[str] = (),
    force: bool = False,
) -> str:
    """The `hf download` command line (huggingface_hub's CLI) that fetches these files into the cache."""
    args = ["hf", "download", repo_id, *files]
    if repo_type != "model":
        args += ["--repo-type", repo_type]
    args += ["--revision", revision]
    for pattern in include:
        args += ["--include", pattern]
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    if force:
        args.append("--force-download")
    return shlex.join(args)
