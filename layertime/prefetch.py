"""Fill the HF cache on a machine with internet, so compute nodes can run offline (docs/design.md §8).

`prefetch(spec)` downloads, into the spec's hub cache (`hf_cache`, else ``HF_HUB_CACHE``):

- every checkpoint of the spec (`snapshot_download` at its revision), restricted to what loading needs:
  ``config.json``, ``generation_config.json``, the weights (``model*.safetensors`` when the revision has
  them, else ``pytorch_model*.bin``, with their index) and the tokenizer files;
- the dataset of every real MTEB task at the revision mteb pins (the whole dataset repo, as a local
  snapshot: offline, reranking tasks must be loaded from it, see `use_local_snapshot` and docs/design.md §4);
- the metrics corpus when it is wikitext-103 (into the HF datasets cache, the way `metrics_corpus` reads it).

It first asks the hub for every file's size, estimates what is still missing (blobs are shared between
revisions and counted once) and refuses before downloading anything when the cache's filesystem has
less room. It is resumable: files already complete in the cache are not transferred again (a second
call only asks the hub which commit each revision is), and a cached file whose size disagrees with the
hub is fetched again. Checkpoints are fetched a few at a time; progress is one byte counter on stderr.

`layertime verify SPEC` (`layertime.verify`) then checks the result offline.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from layertime import checkpoints, suite
from layertime.errors import Permanent
from layertime.messages import first_line
from layertime.spec import ExperimentSpec

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# What a download of a revision includes when its file list is unknown (a fix command, offline): configs,
# tokenizer files and weight indexes (json, txt, sentencepiece models), plus the weights of one format.
MODEL_PATTERNS = ("*.json", "*.txt", "*.model")
WEIGHT_PATTERNS = {"safetensors": ("model*.safetensors",), "bin": ("pytorch_model*.bin",)}

SPACE_MARGIN = 1.02  # ask for 2% more room than the estimate: filesystem blocks, metadata, the refs
DEFAULT_WORKERS = 4  # revisions fetched at once; each fetches up to FILE_WORKERS of its files at once
FILE_WORKERS = 4

FreeSpace = Callable[[Path], int]
DEMO_REPO = (
    "layertime/tiny-neox"  # = layertime.demo.model.DEMO_REPO, built locally (importing it loads torch)
)
SCALE_REPO = "layertime/tiny-neox-scale"  # = layertime.demo.scale_model.SCALE_REPO, built locally too


class PrefetchError(RuntimeError):
    """Something the spec needs could not be fetched; the message names it."""


class InsufficientSpaceError(PrefetchError):
    """The cache's filesystem has less room than the download needs (raised before downloading)."""


class MissingDatasetError(Permanent, LookupError):
    """A task's dataset is not in the cache at its pinned revision; the message says how to fetch it."""


# ----------------------------------------------------------------------------- what loading needs


def is_weight_file(path: str) -> bool:
    return bool(SAFETENSORS.fullmatch(path) or PYTORCH_BIN.fullmatch(path)) or path in (
        SAFETENSORS_INDEX,
        PYTORCH_INDEX,
    )


def select_model_files(paths: Iterable[str]) -> list[str]:
    """The files of a model revision that loading needs: config, weights, tokenizer.

    Weights: the ``model*.safetensors`` files (and index) when the revision has any, else the
    ``pytorch_model*.bin`` files (and index) — never both, transformers reads one format.
    """
    top = {p for p in paths if "/" not in p}
    chosen = {p for p in top if p in CONFIG_FILES or p in TOKENIZER_FILES}
    safetensors = {p for p in top if SAFETENSORS.fullmatch(p) or p == SAFETENSORS_INDEX}
    if any(SAFETENSORS.fullmatch(p) for p in safetensors):
        chosen |= safetensors
    else:
        chosen |= {p for p in top if PYTORCH_BIN.fullmatch(p) or p == PYTORCH_INDEX}
    return sorted(chosen)


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


def storage_folder(cache_dir: Path, repo_id: str, repo_type: str = "model") -> Path:
    """``<cache>/models--org--name`` (or ``datasets--org--name``), as huggingface_hub lays it out."""
    return Path(cache_dir) / "--".join([f"{repo_type}s", *repo_id.split("/")])


def cached_commit(cache_dir: Path, repo_id: str, revision: str, repo_type: str = "model") -> str | None:
    """The commit `revision` points at in the cache (a commit hash is its own), or None."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = storage_folder(cache_dir, repo_id, repo_type) / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def dataset_snapshot(path: str, revision: str, cache_dir: str | Path | None = None) -> Path | None:
    """The local snapshot folder of dataset repo `path` at `revision`, or None when not cached."""
    cache = checkpoints.hub_cache(cache_dir)
    commit = cached_commit(cache, path, revision, "dataset")
    if commit is None:
        return None
    snapshot = storage_folder(cache, path, "dataset") / "snapshots" / commit
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
            f"dataset {path}@{revision} of task {name} is not in the HF cache {checkpoints.hub_cache(cache_dir)}; "
            f"fetch it on a machine with internet: layertime prefetch SPEC "
            f"(or: {download_command(path, revision=revision, repo_type='dataset', cache_dir=cache_dir)})"
        )
    task.metadata = task.metadata.model_copy(
        update={"dataset": {**task.metadata.dataset, "path": str(snapshot)}}
    )
    return task


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


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repo at a commit, as the hub lists it."""

    path: str
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None = None  # LFS files: their sha256, which is also their blob name in the cache

    @property
    def etag(self) -> str:
        """The blob's name in the cache: the sha256 for LFS files, the git blob sha1 otherwise."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class Fetch:
    """One repo revision to download: a checkpoint, a task's dataset, or the metrics corpus."""

    label: str  # "checkpoint step1000", "dataset SciDocsRR", "metrics corpus wikitext-103"
    repo_id: str
    repo_type: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def missing(self, cache_dir: Path) -> list[RemoteFile]:
        """Files not complete in the cache: no snapshot entry, no blob, or a blob of the wrong size."""
        snapshot = storage_folder(cache_dir, self.repo_id, self.repo_type) / "snapshots" / self.commit
        out = []
        for f in self.files:
            pointer = snapshot / f.path
            try:
                complete = pointer.stat().st_size == f.size
            except OSError:
                complete = False
            if not complete:
                out.append(f)
        return out


@dataclass
class FetchPlan:
    """Everything a spec needs from the hub, with sizes, against one cache."""

    spec: ExperimentSpec
    cache_dir: Path
    fetches: list[Fetch] = field(default_factory=list)
    wikitext: Fetch | None = None  # fetched through `datasets` into its own cache
    notes: list[str] = field(default_factory=list)

    def _blobs(self, missing_only: bool) -> dict[str, int]:
        blobs: dict[str, int] = {}
        for fetch in self.fetches:
            for f in fetch.missing(self.cache_dir) if missing_only else fetch.files:
                blobs[f"{fetch.repo_type}:{fetch.repo_id}:{f.etag}"] = f.size
        return blobs

    @property
    def total_bytes(self) -> int:
        """Bytes the spec needs on disk (each distinct blob once; wikitext counted twice: files + Arrow)."""
        return sum(self._blobs(False).values()) + (2 * self.wikitext.size if self.wikitext else 0)

    @property
    def missing_bytes(self) -> int:
        """Bytes still to download (wikitext counted unless its Arrow cache loads offline)."""
        wikitext = 2 * self.wikitext.size if self.wikitext and not _wikitext_cached(self.spec) else 0
        return sum(self._blobs(True).values()) + wikitext


def plan_fetch(spec: ExperimentSpec, endpoint: str | None = None, api: Any = None) -> FetchPlan:
    """Ask the hub what the spec needs: the commit and file sizes of every checkpoint and dataset.

    Needs the hub (``HF_ENDPOINT``, or `endpoint`). The demo model (built locally) and local model
    folders need nothing from it.
    """
    from huggingface_hub import HfApi

    api = api or HfApi(endpoint=endpoint)
    plan = FetchPlan(spec, checkpoints.hub_cache(spec.hf_cache))
    if _is_local_model(spec):
        plan.notes.append(f"model {spec.model} is built or read locally: no checkpoint to download")
    else:
        for revision in spec.checkpoints:
            commit, files = _remote_files(api, spec.model, revision, "model")
            chosen = set(select_model_files(files))
            if not any(is_weight_file(p) for p in chosen):
                raise PrefetchError(f"checkpoint {spec.model}@{revision} has no weight files on the hub")
            picked = tuple(f for p, f in sorted(files.items()) if p in chosen)
            plan.fetches.append(
                Fetch(f"checkpoint {revision}", spec.model, "model", revision, commit, picked)
            )
    for task in spec.tasks:
        located = task_dataset(task)
        if located is None:
            continue
        path, revision = located
        commit, files = _remote_files(api, path, revision, "dataset")
        plan.fetches.append(
            Fetch(f"dataset {task}", path, "dataset", revision, commit, tuple(files.values()))
        )
    if spec.metrics is not None and spec.metrics.corpus == "wikitext-103":
        from layertime import metrics_corpus as mc

        commit, files = _remote_files(api, mc.WIKITEXT_REPO, "main", "dataset")
        parquet = tuple(f for p, f in sorted(files.items()) if p.startswith(f"{mc.WIKITEXT_CONFIG}/"))
        plan.wikitext = Fetch(
            "metrics corpus wikitext-103", mc.WIKITEXT_REPO, "dataset", "main", commit, parquet
        )
    return plan


def _is_local_model(spec: ExperimentSpec) -> bool:
    return spec.model in (DEMO_REPO, SCALE_REPO) or Path(spec.model).is_dir()


def _remote_files(api: Any, repo_id: str, revision: str, repo_type: str) -> tuple[str, dict[str, RemoteFile]]:
    """(commit, path -> RemoteFile) of `repo_id` at `revision`, from the hub's repo info."""
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    what = f"{'dataset ' if repo_type == 'dataset' else ''}{repo_id}@{revision}"
    try:
        info = api.repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise PrefetchError(f"{what} does not exist on the hub: {first_line(e)}") from None
    except OfflineModeIsEnabled:
        raise PrefetchError(
            f"{what}: HF_HUB_OFFLINE is set, and prefetch needs the hub: run it where there is internet "
            "(a login node) without HF_HUB_OFFLINE"
        ) from None
    except Exception as e:  # HTTP errors, connection errors (httpx's are not OSErrors), timeouts
        raise PrefetchError(f"cannot reach the hub for {what}: {type(e).__name__}: {first_line(e)}") from None
    files = {
        s.rfilename: RemoteFile(s.rfilename, s.size or 0, s.blob_id or "", s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    }
    return info.sha, files


def _wikitext_cached(spec: ExperimentSpec) -> bool:
    from layertime import metrics_corpus

    with checkpoints.offline():
        try:
            metrics_corpus.wikitext_lines(spec.metrics.lines if spec.metrics else 1)
        except metrics_corpus.CorpusError:
            return False
    return True


def estimate(spec: ExperimentSpec, endpoint: str | None = None) -> int:
    """Bytes the spec's downloads take on disk (from the hub's file sizes; exp2: ~0.9 GB x 50 + data)."""
    return plan_fetch(spec, endpoint).total_bytes


# ----------------------------------------------------------------------------- free space


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_space(needed: int, cache_dir: Path, free_space: FreeSpace = free_bytes) -> None:
    """Raise InsufficientSpaceError unless `cache_dir`'s filesystem has room for `needed` bytes."""
    free = free_space(Path(cache_dir))
    if needed * SPACE_MARGIN > free:
        raise InsufficientSpaceError(
            f"not enough disk space for the prefetch: it needs {human(needed)} (+{SPACE_MARGIN - 1:.0%} margin) "
            f"in {cache_dir}, and its filesystem has {human(free)} free. Free some space, or point the spec's "
            "hf_cache (or HF_HUB_CACHE) at a bigger filesystem. Nothing was downloaded."
        )


def human(n: int | float | None) -> str:
    """1536 -> '1.5 KB' (decimal units, as the hub and `df -H` show them)."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------- downloading


@dataclass
class PrefetchResult:
    """What a prefetch did."""

    plan: FetchPlan
    downloaded_bytes: int  # missing before the prefetch (the bytes it had to transfer)
    fetched: list[str]  # labels of the fetches that had something missing
    repaired: list[str]  # cached files whose size disagreed with the hub, fetched again


def prefetch(
    spec: ExperimentSpec,
    *,
    workers: int = DEFAULT_WORKERS,
    free_space: FreeSpace = free_bytes,
    endpoint: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PrefetchResult:
    """Download every checkpoint, task dataset and the metrics corpus the spec needs (see module doc).

    Refuses (InsufficientSpaceError) before downloading when the missing bytes exceed the free space
    `free_space(cache_dir)` reports. Raises PrefetchError naming what failed.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    if _is_local_model(spec):
        from layertime.demo.world import prepare_world

        prepare_world(spec)  # builds the demo or scale world model; a local path is left alone
    plan = plan_fetch(spec, endpoint)
    missing = plan.missing_bytes
    log(
        f"{spec.name}: {len(plan.fetches)} repo revisions, {human(plan.total_bytes)} in all, "
        f"{human(missing)} to download into {plan.cache_dir}"
    )
    check_space(missing, plan.cache_dir, free_space)
    repaired = _drop_wrong_sizes(plan)
    todo = [f for f in plan.fetches if f.missing(plan.cache_dir)]
    # Fetches with nothing missing still run: snapshot_download records the revision's ref and the tree
    # listing (what verify compares sizes and hashes with) without transferring a file.
    bar = _byte_bar(missing, spec.name, progress)
    try:
        _download_all(plan, endpoint, workers, bar, log)
        if plan.wikitext is not None and not _wikitext_cached(spec):
            _fetch_wikitext(spec, log)
    finally:
        bar.close()
    return PrefetchResult(plan, missing, [f.label for f in todo], repaired)


def _drop_wrong_sizes(plan: FetchPlan) -> list[str]:
    """Remove cached files whose size differs from the hub's (truncated, or another file): they refetch.

    A snapshot entry that exists is never downloaded again by huggingface_hub, so a bad one must go first.
    """
    repaired = []
    for fetch in plan.fetches:
        snapshot = storage_folder(plan.cache_dir, fetch.repo_id, fetch.repo_type) / "snapshots" / fetch.commit
        for f in fetch.missing(plan.cache_dir):
            pointer = snapshot / f.path
            if not pointer.exists():
                continue
            blob = pointer.resolve()
            if blob.parent.name == "blobs":
                blob.unlink(missing_ok=True)
            pointer.unlink(missing_ok=True)
            repaired.append(f"{fetch.repo_id}@{fetch.revision}/{f.path}")
    return repaired


def _download_all(plan: FetchPlan, endpoint: str | None, workers: int, bar: Any, log: Callable) -> None:
    from huggingface_hub import snapshot_download

    lock = threading.Lock()
    tqdm_class = _forwarding_tqdm(bar, lock)

    def fetch_one(fetch: Fetch) -> Fetch:
        snapshot_download(
            fetch.repo_id,
            repo_type=fetch.repo_type,
            revision=fetch.revision,
            cache_dir=plan.cache_dir,
            allow_patterns=[_literal(f.path) for f in fetch.files],
            max_workers=FILE_WORKERS,
            tqdm_class=tqdm_class,
            endpoint=endpoint,
        )
        return fetch

    failures = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fetch_one, f): f for f in plan.fetches}
        for future in as_completed(futures):
            fetch = futures[future]
            try:
                future.result()
            except Exception as e:  # report every failure, not only the first
                failures.append(
                    f"{fetch.label} ({fetch.repo_id}@{fetch.revision}): {type(e).__name__}: {first_line(e)}"
                )
    if failures:
        raise PrefetchError("could not fetch:\n  " + "\n  ".join(failures))


def _literal(path: str) -> str:
    """`path` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _byte_bar(total: int, name: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"{name}: downloading",
        disable=not enabled,
        file=sys.stderr,
    )


def _forwarding_tqdm(bar: Any, lock: threading.Lock) -> type:
    """A silent tqdm class for snapshot_download whose byte counts feed our one progress `bar`."""
    from tqdm import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            self._forward = kwargs.get("unit") == "B" and str(kwargs.get("desc", "")).startswith(
                "Downloading"
            )
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self._forward and n:
                with lock:
                    bar.update(n)
            return super().update(n)

    return Forward


def _fetch_wikitext(spec: ExperimentSpec, log: Callable) -> None:
    from layertime import metrics_corpus

    log(
        f"metrics corpus: {metrics_corpus.WIKITEXT_REPO} ({metrics_corpus.WIKITEXT_CONFIG}) into the HF datasets cache"
    )
    try:
        metrics_corpus.wikitext_lines(spec.metrics.lines)
    except metrics_corpus.CorpusError as e:
        raise PrefetchError(str(e)) from None


# ----------------------------------------------------------------------------- entry point


def main(spec_path: str | Path, workers: int = DEFAULT_WORKERS, verify: bool = True) -> int:
    """`layertime prefetch SPEC`: download, then verify offline and print the table.

    Exit status: 0 when everything is fetched and verifies; 1 when a download failed or verification
    found a problem; 3 when the disk is too small (refused before downloading); 2 for a bad spec.
    """
    from layertime.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = prefetch(spec, workers=workers)
    except InsufficientSpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except PrefetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"fetched {human(result.downloaded_bytes)} ({len(result.fetched)} of {len(result.plan.fetches)} repo revisions)"
    )
    for name in result.repaired:
        print(f"  re-fetched {name} (its cached size disagreed with the hub)")
    if not verify:
        return 0
    from layertime import verify as verify_mod

    return verify_mod.main(spec_path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m layertime.prefetch", description=main.__doc__)
    parser.add_argument("spec")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    sys.exit(main(args.spec, args.workers, not args.no_verify))
