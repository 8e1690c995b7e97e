"""Where a run keeps its files (docs/design.md §7). Every write is atomic.

Two roots:
- the **run root** (one per experiment): the spec snapshot, the environment, the tables;
- the **store** (shared by experiments, default `<run root>/../store`): everything computed per unit —
  recorded texts, embeddings, completion records, costs and an mteb-format export of the scores —
  keyed by model, commit, task, layer and every setting that changes a number (`settings.Settings`:
  aggregation rule, mteb and code version, embedding settings). exp1 and exp2 side by side under
  `runs/` share one store, so `main` = `step143000` is computed once for both; experiments whose
  settings differ share the store but no unit.

Layout (S = `Settings.id`, E = `Settings.encoder_id`, M = `phases.measure.metrics_key`, model as `org--name`):

    texts/<task>__<dataset revision>__mteb-<v>__code-<v>__<aggregation>.json   recorded texts
    embeddings/S/<model>/<commit>/<task>/{texts.json, layer_<b>.npy, done.json}
    scores/S/<model>/<commit>/<task>/layer_<b>.json       completion record of one unit
    metrics/E/<model>/<commit>/M/layer_<b>.json           completion record of one layer's metrics
    costs/S/<model>/<commit>/{embed__<task>, measure}.json
    mteb/results/<org>__<name>/<commit>/experiments/<layer and settings>/<task>.json   export only
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layertime.checkpoints import Checkpoint


class RunInUse(RuntimeError):
    """Another run holds this run root."""


_HOLDER = re.compile(r"pid (\d+) on (\S+) since ([^,]*), parent pid (\d+)")
_SINCE = "%Y-%m-%d %H:%M:%S"


def _open(path: Path, root: Path) -> Any:
    try:
        return open(path, "a+")  # noqa: SIM115 -- the caller closes it
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise OSError(e.errno, f"run_root {root} cannot be written: {e.strerror}{where}") from e


def _locked(path: Path, root: Path, tries: int = 5) -> Any:
    """`path` opened and flocked (exclusive), still the file at `path` (not one a takeover replaced);
    RunInUse naming the holder when a live process holds it."""
    for _ in range(tries):
        handle = _open(path, root)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            if not _holder_gone(text):
                raise RunInUse(_in_use(root, text)) from None
            _take_over(path, text)
            continue
        if _same_file(handle, path):
            return handle
        handle.close()  # a takeover replaced the file meanwhile: lock the new one
    raise RunInUse(f"run root {root} is in use: its lock {path} keeps being replaced")


def _same_file(handle: Any, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _holder_gone(text: str) -> bool:
    """Whether the lock file names a pid of this host that no longer runs."""
    found = _HOLDER.match(text)
    return bool(found) and found[2] == os.uname().nodename and not _alive(int(found[1]), found[3])


def _take_over(path: Path, text: str) -> None:
    """Replace the lock file of a gone holder with a fresh one (a new inode, not locked by anyone),
    once: takeovers take turns on `<path>.takeover`, and the file is replaced only if it still
    names that holder."""
    with open(path.with_name(path.name + ".takeover"), "a") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            if path.read_text().strip() != text:
                return  # another run took it over already
        except FileNotFoundError:
            return
        fresh = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fresh.write_text("")
        os.replace(fresh, path)


def _alive(pid: int, since: str) -> bool:
    """Whether `pid` still runs and is the process that wrote the lock at `since` (not a new process
    that was given the same pid: it would have started after the lock was written)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    if _state(pid) in (None, "Z"):
        return False
    started = _start_time(pid)
    try:
        written = time.mktime(time.strptime(since.strip(), _SINCE))
    except ValueError:
        return True
    return started is None or started <= written + 1


def _start_time(pid: int) -> float | None:
    """When `pid` started (epoch seconds), from /proc: boot time plus its start in clock ticks."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _state(pid: int) -> str | None:
    """The state letter of `pid` ('R', 'S', 'Z', ...), None when gone or not on Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _in_use(root: Path, text: str) -> str:
    """Who holds the run root, and how to end it: `kill PID` (an orphaned run, whose parent is gone,
    says so: nothing else would end it)."""
    found = _HOLDER.match(text)
    holder = text or "another process"
    if not found or found[2] != os.uname().nodename:
        return f"run root {root} is in use by {holder}; wait for that run to finish, or give this one another run_root"
    pid, parent = int(found[1]), int(found[4])
    if _parent(pid) not in (None, parent):
        return (
            f"run root {root} is in use by {holder}: an orphaned run (pid {parent}, which started it, is gone); "
            f"`kill {pid}` ends it, keeping the units it finished"
        )
    return (
        f"run root {root} is in use by {holder}; wait for that run to finish, give this one another "
        f"run_root, or end it: `kill {pid}` (the units it finished are kept)"
    )


@dataclass(frozen=True)
class RunDir:
    root: Path
    store: Path

    @classmethod
    def of(cls, run_root: Path, store: Path | None = None) -> RunDir:
        run_root = Path(run_root)
        return cls(run_root, Path(store) if store is not None else run_root.parent / "store")

    @contextlib.contextmanager
    def lock(self, holder: str | None = None) -> Iterator[None]:
        """Hold the run root for one run: a second run on it at the same time is refused, by name.

        An OS file lock (flock), so it is released when the process dies, however it dies. The lock
        file names its holder: pid, host, start time, parent pid and `holder` (e.g. the Prefect flow
        run). A refusal says what the holder is and the one command that ends it (`kill PID`), and
        whether it is orphaned (its parent, the worker that started it, is gone). A lock held although
        the pid that took it is gone on this host (a forked child of a killed run kept the file open)
        is taken over at once. A run root that cannot be created or written is an error naming it.
        """
        path = self.root / ".lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise OSError(e.errno, f"run_root {self.root} cannot be written: {e.strerror}{where}") from e
        handle = _locked(path, self.root)
        with handle:
            handle.truncate(0)
            handle.write(
                f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime(_SINCE)}, "
                f"parent pid {os.getppid()}" + (f", {holder}" if holder else "")
            )
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_free(self) -> None:
        """RunInUse, naming the holder, when a run holds this run root now; creates nothing.

        A look, not a hold: the run takes `lock()` itself later (two locks of one process on one
        file would conflict). It lets a second `layertime run` be refused in a second, before the
        Prefect server starts, instead of after; the lock still decides a race between two starts."""
        try:
            handle = open(self.root / ".lock")
        except OSError:
            return  # no run root or no lock file yet: nobody holds it
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                if _holder_gone(text):
                    return  # lock() takes it over from the gone holder
                raise RunInUse(_in_use(self.root, text)) from None
            except OSError:
                return  # a file system without flock: the run's own lock() says so
            fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def texts(self) -> Path:
        """Recorded text sets per task (one recording pass each)."""
        return self.store / "texts"

    @property
    def mteb_results(self) -> Path:
        """mteb-format results for people, results/<org>__<name>/<commit>/experiments/<layer, settings>/:
        an export, never read back (bridge._evaluate)."""
        return self.store / "mteb"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def _unit(self, kind: str, settings: str, ckpt: Checkpoint, task: str) -> Path:
        return self.store / kind / settings / ckpt.model.replace("/", "--") / ckpt.key / task

    def embeddings(self, settings: str, ckpt: Checkpoint, task: str) -> Path:
        """One (checkpoint, task) unit's embeddings: texts.json and layer_<b>.npy."""
        return self._unit("embeddings", settings, ckpt, task)

    def cost_record(self, settings: str, ckpt: Checkpoint, name: str) -> Path:
        """Measured cost of one GPU unit (`embed__<task>` or `measure`): seconds, texts, tokens."""
        return self._unit("costs", settings, ckpt, name).with_suffix(".json")

    def cost_records(self, settings: str, ckpt: Checkpoint) -> list[Path]:
        """The checkpoint's cost record files (read them with `records.read_cost`)."""
        return sorted(
            (self.store / "costs" / settings / ckpt.model.replace("/", "--") / ckpt.key).glob("*.json")
        )

    def metrics_record(self, settings: str, ckpt: Checkpoint, metrics: str, layer: int) -> Path:
        """Completion record of one layer's metrics, keyed by the encoder settings and the metrics key.

        Per layer: a layer's metrics do not depend on the other layers measured with it, so another
        layer list reuses every layer already measured."""
        model = ckpt.model.replace("/", "--")
        return self.store / "metrics" / settings / model / ckpt.key / metrics / f"layer_{layer}.json"

    def score_record(self, settings: str, ckpt: Checkpoint, task: str, layer: int) -> Path:
        """Completion record of one (checkpoint, task, layer): its subset scores, written last."""
        return self._unit("scores", settings, ckpt, task) / f"layer_{layer}.json"
