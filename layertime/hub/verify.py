"""Offline verification: is everything a spec needs in the caches, complete and loadable? (docs/design.md §8)

`verify(spec)` runs with the hub switched off (whatever the environment says) and returns one `Item`
per thing checked, each with the exact shell command that fixes it when it is not ok:

- per checkpoint revision: its ref in the cache; the config and the tokenizer load with
  ``local_files_only``; every weight file is complete. A file's expected size and sha256 come from the
  tree listing huggingface_hub stores beside the snapshots (``trees/<commit>.json``, written by
  `snapshot_download`); without one, an LFS blob's name is its sha256. Safetensors headers are read too,
  so a truncated file is caught even where neither is known;
- per real MTEB task: its dataset snapshot at the revision mteb pins, complete; then the task's data
  loaded from that snapshot the way an offline run loads it (`cache.use_local_snapshot`), and
  reranking tasks must keep their per-query candidate lists. Demo tasks load in memory;
- the metrics corpus: wikitext-103 from the datasets cache, or the corpus file.

Hashes already checked are remembered per blob (its stat) in ``<cache>/.layertime/verified.json``
(`layertime.file_hashes`), so verifying again costs a stat per file; `rehash=True` hashes everything again.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layertime import suite
from layertime.file_hashes import FileHashes, memo_file
from layertime.hub import cache, prefetch
from layertime.hub.cache import download_command, offline
from layertime.hub.prefetch import RemoteFile, human
from layertime.messages import first_line
from layertime.spec import ExperimentSpec

OK, MISSING, CORRUPT = "ok", "missing", "corrupt"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_GIT_HASH_LIMIT = 50_000_000  # small (non-LFS) files are checked against their git blob sha1 up to this size


@dataclass(frozen=True)
class Item:
    """One thing checked: what, of which kind, its status, its size on disk, and how to fix it."""

    item: str  # "EleutherAI/pythia-410m@step94000 model.safetensors", "task SciDocsRR", ...
    kind: str  # revision | config | tokenizer | weights | dataset | task | metrics
    status: str  # ok | missing | corrupt
    size: int | None = None
    fix: str | None = None  # the shell command that fixes it (None when ok)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def verify(
    spec: ExperimentSpec,
    *,
    spec_path: str | Path | None = None,
    load_tasks: bool = True,
    rehash: bool = False,
    workers: int = 4,
) -> list[Item]:
    """Check, offline, everything `spec` needs (see the module doc); one Item per thing checked.

    `spec_path` only shapes the fix commands (``layertime prefetch SPEC`` where no narrower one exists).
    `load_tasks=False` skips loading the task data (snapshots are still checked).
    """
    checker = _Checker(spec, spec_path, rehash, workers)
    with offline():
        items = checker.checkpoints()
        items += checker.tasks(load_tasks)
        items += checker.metrics(items)
    checker.memo.save()
    return items


def failed(items: list[Item]) -> list[Item]:
    return [i for i in items if not i.ok]


# ----------------------------------------------------------------------------- the checks


class _Checker:
    def __init__(self, spec: ExperimentSpec, spec_path: str | Path | None, rehash: bool, workers: int):
        self.spec = spec
        self.cache = cache.hub_cache(spec.hf_cache)
        self.cache_arg = spec.hf_cache  # as the user wrote it, for the fix commands
        self.prefetch_cmd = f"layertime prefetch {spec_path}" if spec_path else "layertime prefetch SPEC"
        self.memo = FileHashes(memo_file(self.cache), rehash)
        self.workers = max(1, workers)

    # -- checkpoints

    def checkpoints(self) -> list[Item]:
        spec = self.spec
        if Path(spec.model).is_dir():
            return self._loads(spec.model, None, spec.model, None, {})
        from layertime.demo.world import prepare_world

        prepare_world(spec)  # the demo model is built locally, never downloaded
        items: list[Item] = []
        by_commit: dict[str, list[Item]] = {}
        for revision in spec.checkpoints:
            label = f"{spec.model}@{revision}"
            try:
                commit = cache.cached_commit(spec.model, revision, self.cache)
            except cache.CorruptRef as e:  # never followed: it could point anywhere
                fix = download_command(spec.model, revision=revision, cache_dir=self.cache_arg)
                items.append(Item(label, "revision", CORRUPT, None, fix, _ref_problem(e)))
                continue
            snapshot = cache.snapshot_dir(spec.model, commit or "-", self.cache)
            if commit is None or not snapshot.is_dir():
                what = "no ref in the cache" if commit is None else f"ref -> {commit[:12]}, but no snapshot"
                include = (*prefetch.MODEL_PATTERNS, *self._weight_patterns())
                fix = download_command(
                    spec.model, revision=revision, cache_dir=self.cache_arg, include=include
                )
                items.append(Item(label, "revision", MISSING, None, fix, what))
                continue
            if commit not in by_commit:
                by_commit[commit] = self._checkpoint(label, revision, commit, snapshot)
            # Revisions sharing a commit (main = step143000) share its files: same results, own labels.
            items += [_relabel(i, label, revision) for i in by_commit[commit]]
        return items

    def _checkpoint(self, label: str, revision: str, commit: str, snapshot: Path) -> list[Item]:
        expected = self._expected(self.spec.model, "model", commit, snapshot)
        names = prefetch.select_model_files(expected)
        weights = [n for n in names if prefetch.is_weight_file(n)]
        checks = self._check_files(snapshot, [(n, expected[n]) for n in names])
        items: list[Item] = []
        if not any(n.endswith((".safetensors", ".bin")) for n in weights):
            fix = download_command(self.spec.model, revision=revision, cache_dir=self.cache_arg,
                                   include=("*.json", *self._weight_patterns()))  # fmt: skip
            items.append(
                Item(f"{label} weights", "weights", MISSING, None, fix, "no weight files in the snapshot")
            )
        for name in weights:
            status, size, detail = checks[name]
            fix = None
            if status != OK:
                fix = download_command(self.spec.model, [name], revision=revision, cache_dir=self.cache_arg,
                                       force=status == CORRUPT)  # fmt: skip
            items.append(Item(f"{label} {name}", "weights", status, size, fix, detail))
        groups = {
            n: [m for m in names if m in files]
            for n, files in (("config", prefetch.CONFIG_FILES), ("tokenizer", prefetch.TOKENIZER_FILES))
        }
        return items + self._loads(self.spec.model, commit, label, revision, checks, groups)

    def _weight_patterns(self) -> tuple[str, ...]:
        """The weight format the model's other cached revisions use (both when none is cached)."""
        snapshots = cache.snapshots_dir(self.spec.model, self.cache)
        for kind, suffix in (("safetensors", "*.safetensors"), ("bin", "*.bin")):
            if any(snapshots.glob(f"*/{suffix}")):
                return prefetch.WEIGHT_PATTERNS[kind]
        return prefetch.WEIGHT_PATTERNS["safetensors"] + prefetch.WEIGHT_PATTERNS["bin"]

    def _loads(
        self, model: str, commit: str | None, label: str, revision: str | None, checks: dict, groups=None
    ) -> list[Item]:
        """Config and tokenizer items: their files complete, then loaded as the run loads them."""
        items = []
        for kind, loader in (("config", _load_config), ("tokenizer", _load_tokenizer)):
            files = (groups or {}).get(kind, [])
            bad = [(n, checks[n]) for n in files if checks[n][0] != OK]
            size = sum(checks[n][1] or 0 for n in files) or None
            if bad:
                status = MISSING if any(c[0] == MISSING for _, c in bad) else CORRUPT
                fix = download_command(model, [n for n, _ in bad], revision=revision or "main",
                                       cache_dir=self.cache_arg, force=status == CORRUPT)  # fmt: skip
                detail = "; ".join(f"{n}: {c[2]}" for n, c in bad)
                items.append(Item(f"{label} {kind}", kind, status, size, fix, detail))
                continue
            error = loader(model, commit, self.spec.hf_cache)
            if error is None:
                items.append(Item(f"{label} {kind}", kind, OK, size))
                continue
            fix = (
                download_command(model, files, revision=revision, cache_dir=self.cache_arg, force=True)
                if files and revision
                else self.prefetch_cmd
            )
            status = MISSING if not files else CORRUPT
            items.append(Item(f"{label} {kind}", kind, status, size, fix, error))
        return items

    # -- files

    def _expected(
        self, repo_id: str, repo_type: str, commit: str, snapshot: Path
    ) -> dict[str, RemoteFile | None]:
        """path -> what the hub said about it (tree listing), or None per file present when there is none."""
        tree = cache.tree_file(repo_id, commit, self.cache, repo_type)
        try:
            files = json.loads(tree.read_text())["files"]
            return {
                path: RemoteFile(path, e.get("lfs_size") or e["size"], e["blob_id"], e.get("lfs_sha256"))
                for path, e in files.items()
            }
        except (OSError, ValueError, KeyError):
            pass
        present = (p for p in snapshot.rglob("*") if p.is_symlink() or p.is_file())
        return {p.relative_to(snapshot).as_posix(): None for p in present}

    def _check_files(self, snapshot: Path, files: list[tuple[str, RemoteFile | None]]) -> dict[str, tuple]:
        """name -> (status, size, detail) for each file of a snapshot, hashed a few at a time."""
        with ThreadPoolExecutor(self.workers) as pool:
            results = pool.map(lambda f: _check_file(snapshot / f[0], f[1], self.memo), files)
            return {name: result for (name, _), result in zip(files, results, strict=True)}

    # -- tasks

    def tasks(self, load: bool) -> list[Item]:
        items: list[Item] = []
        for name in self.spec.tasks:
            located = cache.task_dataset(name)
            if located is not None:
                item = self._dataset(name, *located)
                items.append(item)
                if not item.ok:
                    continue
            if load:
                items.append(self._load_task(name))
        return items

    def _dataset(self, task: str, path: str, revision: str) -> Item:
        label = f"dataset {task}"
        fix = download_command(path, revision=revision, repo_type="dataset", cache_dir=self.cache_arg)
        try:
            snapshot = cache.dataset_snapshot(path, revision, self.cache)
        except cache.CorruptRef as e:
            return Item(label, "dataset", CORRUPT, None, fix, _ref_problem(e))
        if snapshot is None:
            return Item(
                label, "dataset", MISSING, None, fix, f"no snapshot of {path}@{revision[:10]} (mteb's pin)"
            )
        commit = snapshot.name
        expected = self._expected(path, "dataset", commit, snapshot)
        checks = self._check_files(snapshot, sorted(expected.items()))
        size = sum(c[1] or 0 for c in checks.values())
        bad = {n: c for n, c in checks.items() if c[0] != OK}
        if not bad:
            return Item(label, "dataset", OK, size, None, f"{path}@{revision[:10]}, {len(checks)} files")
        status = MISSING if any(c[0] == MISSING for c in bad.values()) else CORRUPT
        detail = "; ".join(f"{n}: {c[2]}" for n, c in sorted(bad.items())[:3]) + (
            " ..." if len(bad) > 3 else ""
        )
        if status == CORRUPT:
            fix = download_command(path, sorted(bad), revision=revision, repo_type="dataset",
                                   cache_dir=self.cache_arg, force=True)  # fmt: skip
        return Item(label, "dataset", status, size, fix, detail)

    def _load_task(self, name: str) -> Item:
        label = f"task {name}"
        reranking = suite.task_type(name) == "Reranking"
        try:
            task = cache.use_local_snapshot(suite.build_task(name, self.spec.aggregation), self.cache)
            task.load_data()
            problem = _candidates_problem(task) if reranking else None
        except Exception as e:  # whatever loading raises, the row says it and the run would fail the same way
            problem = f"does not load: {type(e).__name__}: {first_line(e)}"
        if problem:
            return Item(label, "task", CORRUPT, None, self.prefetch_cmd, problem)
        return Item(
            label, "task", OK, None, None, "loads" + (", candidate lists present" if reranking else "")
        )

    # -- metrics corpus

    def metrics(self, items: list[Item]) -> list[Item]:
        m = self.spec.metrics
        if m is None:
            return []
        from layertime import metrics_corpus

        label = f"metrics corpus {m.corpus}"
        if m.corpus == "wikitext-103":
            try:
                lines = metrics_corpus.wikitext_lines(m.lines)
            except metrics_corpus.CorpusError as e:
                return [Item(label, "metrics", MISSING, None, metrics_corpus.prefetch_command(), _short(e))]
            return [
                Item(label, "metrics", OK, None, None, f"{len(metrics_corpus.filter_lines(lines))} prompts")
            ]
        if m.corpus == "tasks":
            bad = [i.item for i in items if i.kind in ("task", "dataset") and not i.ok]
            if bad:
                return [Item(label, "metrics", MISSING, None, self.prefetch_cmd, f"needs {', '.join(bad)}")]
            return [Item(label, "metrics", OK, None, None, "sampled from the tasks' texts")]
        path = Path(m.corpus)
        if not path.is_file():
            return [Item(label, "metrics", MISSING, None, None, f"file {path} does not exist")]
        try:
            prompts = metrics_corpus.file_prompts(path)
        except metrics_corpus.CorpusError as e:
            detail = str(e).removeprefix("metrics.corpus: ")
            return [Item(label, "metrics", CORRUPT, path.stat().st_size, None, detail)]
        return [Item(label, "metrics", OK, path.stat().st_size, None, f"{len(prompts)} prompts")]


def _relabel(item: Item, label: str, revision: str) -> Item:
    """`item` of the first revision on a commit, restated for another revision on the same commit."""
    first = item.item.split(" ", 1)[0]
    fix = item.fix
    if fix and "--revision" in fix:
        fix = re.sub(r"--revision \S+", f"--revision {revision}", fix)
    return Item(item.item.replace(first, label, 1), item.kind, item.status, item.size, fix, item.detail)


def _ref_problem(error: BaseException) -> str:
    """A CorruptRef's message without its fix (the row's fix column has it)."""
    return str(error).split("; the cache is damaged", 1)[0]


def _short(error: BaseException) -> str:
    return str(error).split(". Fetch it", 1)[0]


def _load_config(model: str, commit: str | None, cache_dir) -> str | None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, revision=commit, cache_dir=_cache(cache_dir), local_files_only=True)
    except Exception as e:  # OSError, ValueError (bad JSON), ...
        return f"does not load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _load_tokenizer(model: str, commit: str | None, cache_dir) -> str | None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(
            model, revision=commit, cache_dir=_cache(cache_dir), local_files_only=True
        )
    except Exception as e:
        return f"does not load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _cache(cache_dir) -> str | None:
    return str(cache_dir) if cache_dir is not None else None


def _candidates_problem(task: Any) -> str | None:
    """None when every (subset, split) of a reranking task has per-query candidate lists."""
    for subset, splits in (task.dataset or {}).items():
        for split, data in splits.items():
            top_ranked = data.get("top_ranked") if isinstance(data, dict) else None
            if not top_ranked:
                return f"{subset}/{split}: no per-query candidate lists (top_ranked): mteb would score it as retrieval"
            queries = len(data["queries"])
            if len(top_ranked) < queries:
                return f"{subset}/{split}: candidate lists for {len(top_ranked)} of {queries} queries"
    return None


# ----------------------------------------------------------------------------- one file


def _check_file(pointer: Path, expected: RemoteFile | None, memo: FileHashes) -> tuple[str, int | None, str]:
    """(status, size, detail) of one snapshot entry against what the hub said (or its blob name)."""
    if not pointer.exists():
        if pointer.is_symlink():
            return MISSING, expected.size if expected else None, "blob missing (dangling snapshot link)"
        return MISSING, expected.size if expected else None, "not in the cache"
    blob = pointer.resolve()
    size = blob.stat().st_size
    if expected is not None and size != expected.size:
        return CORRUPT, size, f"{size} bytes, expected {expected.size}"
    name = blob.name if cache.is_blob(blob) else ""
    sha256 = expected.sha256 if expected and expected.sha256 else (name if _SHA256.fullmatch(name) else None)
    if sha256:
        actual = memo.sha256(blob)
        if actual != sha256:
            return CORRUPT, size, f"sha256 {actual[:12]}..., expected {sha256[:12]}..."
    else:
        git = expected.blob_id if expected and expected.blob_id else (name if _SHA1.fullmatch(name) else None)
        if git and size <= _GIT_HASH_LIMIT and _git_sha1(blob) != git:
            return CORRUPT, size, "content differs from its git blob id"
    if pointer.name.endswith(".safetensors"):
        problem = _safetensors_problem(blob, size)
        if problem:
            return CORRUPT, size, problem
    return OK, size, ""


def _safetensors_problem(path: Path, size: int) -> str | None:
    """None when the file is as long as its header says (8-byte length, JSON header, tensor data)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size, 100_000_000):
                return "truncated or not a safetensors file (header length)"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        return f"unreadable safetensors header: {type(e).__name__}"
    if 8 + n + end != size:
        return f"{size} bytes, its header needs {8 + n + end} (truncated)"
    return None


def _git_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ----------------------------------------------------------------------------- the table


def format_table(items: list[Item], spec_path: str | Path | None = None) -> str:
    """A table: item, kind, status, size, and for each problem its detail and the command that fixes it."""
    head = ("item", "kind", "status", "size", "detail / fix")
    rows = [(i.item, i.kind, i.status, human(i.size) if i.size is not None else "", i.detail) for i in items]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)).rstrip() + "  " + head[4]]
    for item, row in zip(items, rows, strict=True):
        cells = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
        lines.append(f"{cells}  {row[4]}".rstrip())
        if item.fix:
            lines.append(" " * (sum(widths) + 8) + f"fix: {item.fix}")
    bad = failed(items)
    counts = {s: sum(i.status == s for i in items) for s in (OK, MISSING, CORRUPT)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n or s == OK))
    if bad:
        lines.append(
            f"NOT READY for an offline run: {len(bad)} problem(s). Fix each with its command above, or fetch "
            f"everything at once (with internet): layertime prefetch {spec_path or 'SPEC'}"
        )
    else:
        lines.append("ready for an offline run (HF_HUB_OFFLINE=1)")
    return "\n".join(lines)


def print_table(items: list[Item], spec_path: str | Path | None = None, file=None) -> None:
    print(format_table(items, spec_path), file=file or sys.stdout)
