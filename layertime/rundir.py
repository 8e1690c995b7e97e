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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from layertime.checkpoints import Checkpoint


class RunInUse(RuntimeError):
    """Another run holds this run root."""


@dataclass(frozen=True)
class RunDir:
    root: Path
    store: Path

    @classmethod
    def of(cls, run_root: Path, store: Path | None = None) -> RunDir:
        run_root = Path(run_root)
        return cls(run_root, Path(store) if store is not None else run_root.parent / "store")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run root for one run: a second run on it at the same time is refused, by name.

        An OS file lock (flock), so it is released when the process dies, however it dies.
        A run root that cannot be created or written is an error naming it, before any work.
        """
        path = self.root / ".lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # closed by the `with` below
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise OSError(e.errno, f"run_root {self.root} cannot be written: {e.strerror}{where}") from e
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(handle) from None
            handle.truncate(0)
            handle.write(
                f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
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
                raise self._in_use(handle) from None
            except OSError:
                return  # a file system without flock: the run's own lock() says so
            fcntl.flock(handle, fcntl.LOCK_UN)

    def _in_use(self, handle) -> RunInUse:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        return RunInUse(
            f"run root {self.root} is in use by {holder}; wait for that run to finish, "
            "or give this one another run_root"
        )

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
