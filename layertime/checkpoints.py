"""Checkpoints: (repo id, revision) -> commit, through the HF cache or the hub.

Revisions that resolve to the same commit (Pythia's `main` and `step143000`) are one unit of
work; everything downstream is keyed by the commit. `HF_HUB_OFFLINE=1` is honoured: offline, a
revision must already be in the cache (run `layertime prefetch` on a login node).

The cache comes first whoever launches the run: a revision the cache holds resolves from its ref and
loads from its snapshot by commit with `local_files_only` (`layertime.hub.cache.from_cache_first`), so a
cached spec never touches the network even without HF_HUB_OFFLINE (a deployment's worker: issue 14.7).
The cache's layout and the offline switch live in `layertime.hub.cache`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from layertime.file_hashes import FileHashes, directory_digest, memo_file
from layertime.hub.cache import CheckpointError, cached_commit, from_cache_first, hub_cache, is_offline


@dataclass(frozen=True)
class Checkpoint:
    """One revision of a model and the commit it resolved to (None when not resolved)."""

    model: str
    revision: str
    commit: str | None  # a local model directory: the sha256 of its files (checkpoints.local_digest)

    @property
    def key(self) -> str:
        """What identifies the weights: the commit when known, else the revision name."""
        return self.commit or self.revision

    @property
    def step(self) -> int | None:
        """Training step from a `stepN` revision name (None for `main` and other names)."""
        m = re.fullmatch(r"step(\d+)", self.revision)
        return int(m.group(1)) if m else None


def resolve(
    model: str, revision: str, cache_dir: str | Path | None = None, offline: bool | None = None
) -> Checkpoint:
    """Resolve `revision` of `model` to its commit: local path, cache ref, then (online) the hub.

    A local model directory has no commit: its "commit" is the sha256 digest of its files
    (`local_digest`), so its units are keyed by what the weights are, not by the path or a revision
    name: replaced weights are new units, computed again, and every record says which content it
    scored. Every revision of a directory is the same content (one unit of work)."""
    if Path(model).is_dir():
        return Checkpoint(model, revision, local_digest(model, cache_dir))
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


def local_digest(model: str | Path, cache_dir: str | Path | None = None) -> str:
    """The content digest of a local model directory (`file_hashes.directory_digest`, 64 hex: a git
    commit has 40). File hashes are remembered beside the HF cache, so a re-run costs a stat per file."""
    hashes = FileHashes(memo_file(hub_cache(cache_dir)))
    try:
        return directory_digest(Path(model), hashes)
    except OSError as e:
        raise CheckpointError(f"model: cannot read the local model directory {model}: {e}") from None
    finally:
        hashes.save()


def load_config(model: str, revision: str | None, cache_dir: str | Path | None = None):
    """The model's transformers config (from the cache when it holds the revision)."""
    from transformers import AutoConfig

    if revision is not None and is_offline() and not Path(model).is_dir():
        resolve(model, revision, cache_dir)  # a revision missing offline: our message, not the network's
    try:
        return from_cache_first(AutoConfig.from_pretrained, model, revision, cache_dir)
    except OSError as e:
        raise CheckpointError(f"cannot load the config of {model}@{revision}: {e}") from None
