"""Checkpoints: (repo id, revision) -> commit, through the HF cache or the hub.

Revisions that resolve to the same commit (Pythia's `main` and `step143000`) are one unit of
work; everything downstream is keyed by the commit. `HF_HUB_OFFLINE=1` is honoured: offline, a
revision must already be in the cache (run `layertime prefetch` on a login node).

The cache comes first whoever launches the run: a revision the cache holds resolves from its ref and
loads from its snapshot by commit with `local_files_only` (`from_cache_first`), so a cached spec never
touches the network even without HF_HUB_OFFLINE (a deployment's worker: issue 14.7). Without that,
transformers asks the hub on every load (the commit of a revision name, the tokenizer's chat
templates) and, with the hub unreachable, retries each file 5 times: minutes per checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from layertime.errors import Permanent

T = TypeVar("T")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class CheckpointError(Permanent, LookupError):
    """A revision that cannot be resolved or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class Checkpoint:
    """One revision of a model and the commit it resolved to (None when not resolved)."""

    model: str
    revision: str
    commit: str | None

    @property
    def key(self) -> str:
        """What identifies the weights: the commit when known, else the revision name."""
        return self.commit or self.revision

    @property
    def step(self) -> int | None:
        """Training step from a `stepN` revision name (None for `main` and other names)."""
        m = re.fullmatch(r"step(\d+)", self.revision)
        return int(m.group(1)) if m else None


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


def cached_commit(model: str, revision: str, cache_dir: str | Path | None = None) -> str | None:
    """The commit `revision` points at in the local cache, or None when the cache has no such ref."""
    if _COMMIT.match(revision):
        return revision
    ref = hub_cache(cache_dir) / f"models--{model.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def resolve(
    model: str, revision: str, cache_dir: str | Path | None = None, offline: bool | None = None
) -> Checkpoint:
    """Resolve `revision` of `model` to its commit: local path, cache ref, then (online) the hub."""
    if Path(model).is_dir():
        return Checkpoint(model, revision, None)
    commit = cached_commit(model, revision, cache_dir)
    if commit is not None:
        return Checkpoint(model, revision, commit)
    if is_offline() if offline is None else offline:
        raise CheckpointError(
            f"checkpoint {model}@{revision} is not in the HF cache {hub_cache(cache_dir)} and HF_HUB_OFFLINE is set; "
            f"fetch it on a machine with internet: layertime prefetch SPEC "
            f"(or: hf download {model} --revision {revision})"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Checkpoint(model, revision, HfApi().model_info(model, revision=revision).sha)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"checkpoint {model}@{revision} does not exist on the hub: {e}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not resolve {model}@{revision} on the hub: {e}") from e
    except Exception as e:  # httpx's connection errors: no network, DNS, proxy
        raise CheckpointError(
            f"could not reach the hub to resolve {model}@{revision} ({type(e).__name__}: {e}); "
            "on a machine without internet set HF_HUB_OFFLINE=1 to use the HF cache"
        ) from e


def load_config(model: str, revision: str | None, cache_dir: str | Path | None = None):
    """The model's transformers config (from the cache when it holds the revision)."""
    from transformers import AutoConfig

    if revision is not None and is_offline() and not Path(model).is_dir():
        resolve(model, revision, cache_dir)  # a revision missing offline: our message, not the network's
    try:
        return from_cache_first(AutoConfig.from_pretrained, model, revision, cache_dir)
    except OSError as e:
        raise CheckpointError(f"cannot load the config of {model}@{revision}: {e}") from None


def cached_snapshot(model: str, revision: str | None, cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot folder of `revision` (a name or a commit; None: main) in the cache, when it holds
    the checkpoint's config; None otherwise."""
    commit = cached_commit(model, revision or "main", cache_dir)
    if commit is None:
        return None
    snapshot = hub_cache(cache_dir) / f"models--{model.replace('/', '--')}" / "snapshots" / commit
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
    the hub, and never under HF_HUB_OFFLINE. A local model path is loaded as it is.
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
