"""sha256 of files, remembered by their stat: hashing a file again costs one `stat` while it is unchanged.

Two readers need whole-file hashes of gigabyte weight files on every run, and neither can afford to
read them each time:
- `layertime verify` checks each cached weight blob against the hub's sha256 (docs/design.md §8);
- a local model directory (`model: /path/to/dir`) is keyed by the digest of its files
  (`directory_digest`), so replaced weights are new units, never "already done" (issue 24).

An entry is kept under the file's path with its size, mtime, ctime and inode; any change to the file
changes one of them (ctime cannot be set back by a user, unlike mtime), and then it is hashed again.
The entries live in `<hub cache>/.layertime/verified.json`; saving is best effort (a read-only cache is
hashed again next time, never refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

CHUNK = 8 * 1024 * 1024


def memo_file(hub_cache: Path) -> Path:
    """Where the hashes of files under (and read beside) a hub cache are remembered."""
    return Path(hub_cache) / ".layertime" / "verified.json"


class FileHashes:
    """sha256 of files, each remembered with the stat it had (module doc); safe across threads."""

    def __init__(self, path: Path | None, rehash: bool = False) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path is not None and not rehash:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(Path(path).read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}

    def sha256(self, file: Path) -> str:
        """The hex sha256 of `file`'s content (symlinks followed)."""
        file = Path(file).resolve()
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = str(file)
        with self.lock:
            known = self.entries.get(key)
        if isinstance(known, list) and known[:4] == stamp and len(known) == 5:
            return known[4]
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        value = digest.hexdigest()
        with self.lock:
            self.entries[key] = [*stamp, value]
            self.dirty = True
        return value

    def save(self) -> None:
        """Best effort: a cache that cannot be written is hashed again next time."""
        if not self.dirty or self.path is None:
            return
        from layertime.io import atomic_write_text

        with self.lock:
            text = json.dumps(self.entries)
        with contextlib.suppress(OSError):
            atomic_write_text(self.path, text)
        self.dirty = False


def directory_digest(directory: Path, hashes: FileHashes) -> str:
    """The sha256 (hex) of a model directory's content: over the sorted (name, sha256) of every file at
    its top level — what `from_pretrained(directory)` reads: config, weights, their index, tokenizer —
    hidden files (`.git`, editors' temps) excepted. Any byte of any such file changes it."""
    lines = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():  # is_file follows symlinks
            continue
        lines.append(f"{entry.name}\t{hashes.sha256(Path(entry.path))}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
