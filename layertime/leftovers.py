"""What a run that died without cleaning up leaves behind, and how it is removed (issue 24).

A run killed with no chance to clean up (SIGKILL of its main process: the OOM killer, a lost node, a
killed terminal) used to leave, besides its processes (layertime/watchdog.py kills those):
- its temporary directories: Prefect's database of an embedded run (`layertime-prefect-*`) and the
  watchdog's notes (`layertime-run-*`), under the temp directory, one per killed run;
- named semaphores in /dev/shm (`sem.mp-*` of multiprocessing, `sem.loky-*` of joblib's loky), which
  only a normal exit or the resource tracker (killed with the run) unlinks;
- the embeddings of units whose every layer is recorded, when it died between the last record and
  the delete (`delete_scored_embeddings`).

Only what is ours is removed. A temp directory is made with `owner.json` in it (host, pid and the
start time of the process that owns it, so a reused pid is not taken for its owner) and is removed when
that owner is gone from this host; a directory of another host, or without an owner file, is never
touched. A semaphore is unlinked only when a dead run's notes name it (the watchdog saw it mapped by
the run's processes, in /proc/<pid>/maps) and no living process maps it.

The module is stdlib only: the watchdog imports it in a process that must start in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layertime.phases.context import Context

PREFIX = "layertime-"  # every temp directory of ours: layertime-prefect-*, layertime-run-*
OWNER = "owner.json"
SEMAPHORES = "semaphores"  # in a run's notes: one /dev/shm name per line
SHM = Path("/dev/shm")


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None when there is no such process: with
    the pid, it names one process, even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_of(pid: int | None = None) -> dict[str, Any]:
    """This process (or `pid`) as an owner: host, pid, start time."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": start_ticks(pid)}


def is_alive(owner: dict[str, Any]) -> bool:
    """Whether `owner` may still run: another host's is taken as alive (it cannot be asked)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    return isinstance(pid, int) and start_ticks(pid) is not None and start_ticks(pid) == owner.get("start")


def temp_root() -> Path:
    return Path(tempfile.gettempdir())


def owned_temp_dir(kind: str, owner: dict[str, Any] | None = None) -> Path:
    """A new temp directory `layertime-<kind>-*` holding `owner.json` (default owner: this process)."""
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
    (path / OWNER).write_text(json.dumps(owner or owner_of()))
    return path


def _owner(directory: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((directory / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def remove_dead_temp_dirs(root: Path | None = None, owner_pid: int | None = None) -> list[Path]:
    """Remove our temp directories whose owner is gone (or, with `owner_pid`, those of that process
    now: it is stopping), first unlinking the semaphores their notes name; returns what was removed."""
    removed = []
    for directory in sorted((root or temp_root()).glob(f"{PREFIX}*")):
        owner = _owner(directory)
        if owner is None or owner.get("host") != socket.gethostname():
            continue  # not ours to judge
        mine_now = owner_pid is not None and owner.get("pid") == owner_pid
        if not mine_now and is_alive(owner):
            continue
        unlink_semaphores(noted_semaphores(directory))
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def note_semaphores(notes: Path, names: Iterable[str]) -> None:
    """Add `names` (/dev/shm semaphore file names) to a run's notes."""
    with open(notes / SEMAPHORES, "a") as f:
        f.writelines(f"{name}\n" for name in names)


def noted_semaphores(directory: Path) -> set[str]:
    try:
        return {line.strip() for line in (directory / SEMAPHORES).read_text().splitlines() if line.strip()}
    except OSError:
        return set()


def mapped_semaphores(pids: Iterable[int]) -> set[str]:
    """Names of the /dev/shm semaphores that processes `pids` have open (sem_open maps the file).

    By inode: the process that created a semaphore maps glibc's temporary name (`sem.XXXXXX`, since
    renamed to `sem.mp-...`), so /proc/<pid>/maps names it wrongly but gives its inode."""
    inodes = _mapped_inodes(pids)
    if not inodes:
        return set()
    found = set()
    with contextlib.suppress(OSError), os.scandir(SHM) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.name.startswith("sem.") and entry.inode() in inodes:
                    found.add(entry.name)
    return found


def _mapped_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of the /dev/shm semaphore files mapped by processes `pids` (those we may read)."""
    inodes = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)  # address perms offset dev inode path
                    if len(fields) == 6 and fields[5].startswith(f"{SHM}/sem."):
                        inodes.add(int(fields[4]))
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    return inodes


def pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def unlink_semaphores(names: Iterable[str]) -> list[str]:
    """Unlink the named /dev/shm semaphores that no living process maps; returns those unlinked."""
    names = {n for n in names if n.startswith("sem.") and "/" not in n and (SHM / n).exists()}
    if not names:
        return []
    names -= mapped_semaphores(pids())
    unlinked = []
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError):
            (SHM / name).unlink()
            unlinked.append(name)
    return unlinked


def delete_scored_embeddings(ctx: Context) -> int:
    """Delete the embeddings of the plan's (checkpoint, task) units that lack no layer (no layer
    without a valid completion record, `phases.score.missing_layers`) — a run killed between its
    last record and the delete left them, GBs per unit at exp2's size — unless the spec keeps them or
    another run claims them (layertime/claims.py). Records are read only where embeddings exist: a
    stat per unit otherwise. Returns how many were deleted."""
    plan = ctx.plan
    if plan.spec.keep_embeddings:
        return 0
    from layertime import claims
    from layertime.phases.score import missing_layers

    deleted = 0
    for ckpt in plan.distinct_checkpoints():
        for task in plan.tasks:
            path = ctx.run.embeddings(ctx.settings.id, ckpt, task)
            if path.exists() and not missing_layers(ctx, ckpt, task, plan.blocks):
                deleted += claims.delete_unclaimed(path)
    return deleted
