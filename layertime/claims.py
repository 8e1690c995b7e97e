"""Claims on a unit's embeddings in a shared store: who may delete them, and when (issue 17.2).

Several runs may use one store at once (exp1 and exp2 share one). A run that still needs a unit's
embeddings (to embed or to score them) holds a **claim**: a shared `flock` on a small file beside the
unit directory, `.<task>.claim`, from before it looks at the embeddings until its last layer of the
unit is scored. `delete_unclaimed` takes that lock exclusively without waiting: it deletes only when
no run holds a claim, and while it deletes, a run that wants a claim waits (then finds the embeddings
gone and embeds again). Two runs writing one unit take `.<task>.write` in turn (`writing`), and the
writer adds the layers it lacks beside the files other runs may be reading (phases.embed.embed_unit).

Assumptions:
- Lock files are never deleted: deleting one would let two holders lock two different files.
- A process that dies, however it dies, loses its locks (the kernel closes its files; on NFS the
  server reclaims them when the client's lease ends). A hung process keeps its claims: its units'
  embeddings stay on disk (a disk cost, never a lost unit).
- On a local file system a flock belongs to the open file. On NFS the Linux client emulates flock
  with whole-file POSIX locks (NFSv4, or v3 with lockd), seen by every client, but owned by the
  process: a process's own locks never conflict with each other, and closing any descriptor of the
  file drops all its locks on it. So a process holds at most one claim per unit (`Claims` does) and
  releases its own claim before it calls `delete_unclaimed`; writers of one unit in one process are
  also kept apart by a thread lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import resource
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def lock_file(unit: Path, kind: str) -> Path:
    """The lock file of `kind` ('claim' or 'write') beside the unit directory `unit`."""
    return unit.with_name(f".{unit.name}.{kind}")


class Claims:
    """The claims this process holds, by unit directory; as a context manager, released at its end.

    `take` waits only while another run deletes the unit (a deletion holds the lock exclusively).
    Each claim keeps a file open: a flow claims every unit it will embed up front (exp2: 1,600), so
    the process's soft limit on open files is raised to its hard limit (often 1,024 vs 4,096+).
    """

    def __init__(self) -> None:
        self._held: dict[Path, IO[str]] = {}
        self._lock = threading.Lock()
        _raise_open_files_limit()

    def take(self, unit: Path) -> None:
        unit = Path(unit)
        with self._lock:
            if unit in self._held:
                return
            handle = _open(lock_file(unit, "claim"))
            try:
                fcntl.flock(handle, fcntl.LOCK_SH)
            except BaseException:
                handle.close()
                raise
            self._held[unit] = handle

    def release(self, unit: Path) -> None:
        with self._lock:
            handle = self._held.pop(Path(unit), None)
        if handle is not None:
            handle.close()  # closing the file releases its lock

    def held(self) -> list[Path]:
        with self._lock:
            return list(self._held)

    def close(self) -> None:
        for unit in self.held():
            self.release(unit)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def claim(unit: Path) -> Iterator[None]:
    """Hold a claim on one unit's embeddings while the context lasts."""
    with Claims() as claims:
        claims.take(unit)
        yield


def delete_unclaimed(unit: Path) -> bool:
    """Delete the unit's embeddings unless a run claims them; True when they were deleted.

    Never waits: a claimed unit is left to the last run that needs it, whose own call deletes it.
    The caller must not hold a claim on `unit` itself (release it first, see the module's notes).
    """
    unit = Path(unit)
    if not unit.parent.is_dir():
        return False
    with _open(lock_file(unit, "claim")) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not unit.exists():
            return False
        shutil.rmtree(unit)  # while the lock is held no run can claim, so none is reading
        return True


_WRITERS: dict[Path, threading.Lock] = {}
_WRITERS_LOCK = threading.Lock()


@contextlib.contextmanager
def writing(unit: Path) -> Iterator[None]:
    """Be the only writer of the unit's files while the context lasts (waits for the one before)."""
    unit = Path(unit)
    with _WRITERS_LOCK:
        local = _WRITERS.setdefault(unit, threading.Lock())
    with local, _open(lock_file(unit, "write")) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite limit on open files: take 65,536 where the hard limit is infinite.
    target = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _open(path: Path) -> IO[str]:
    """The lock file, created if missing; opened for reading and writing (NFS's emulated flock needs
    write access for an exclusive lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+")
