"""A run root's own files: the stamp that keeps one run root's tables to one code version and one grid
(`claim_run_root`), and the snapshot of what ran (`write_snapshot`: spec.yaml, environment.json).
docs/design.md §7."""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import yaml

from layertime import CODE_VERSION
from layertime.io import atomic_write_text
from layertime.plan import Plan, make_plan
from layertime.provenance import git_commit, packages
from layertime.rundir import RunDir
from layertime.settings import Settings, settings_id
from layertime.spec import ExperimentSpec

RUN_STAMP = "layertime-run.json"  # which code version writes this run root's tables


class IncompatibleRun(RuntimeError):
    """The run root holds results of another code or mteb version."""


def write_snapshot(plan: Plan, run: RunDir, settings: Settings) -> None:
    """The spec as run, the environment and the resolved commits, beside the results."""
    spec = plan.spec
    atomic_write_text(
        run.root / "spec.yaml", yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)
    )
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages(),
        "git_commit": git_commit(),
        "settings": settings.as_dict(),
        "settings_id": settings.id,
        "checkpoints": {c.revision: c.commit for c in plan.checkpoints},
        "layer_convention": "layer = 0-based block index b, states hidden_states[b + 1]",
    }
    atomic_write_text(run.root / "environment.json", json.dumps(env, indent=2))


def claim_run_root(run: RunDir, spec: ExperimentSpec, force: bool = False, plan: Plan | None = None) -> dict:
    """Stamp the run root with this code and mteb version and the spec's grid, refusing a run root that
    another version or another grid wrote.

    Records live under a settings id that includes CODE_VERSION, so versions never share a record;
    the stamp keeps one run root's tables and report from silently switching to other numbers, or to
    another grid: a spec (or a flow's `overrides`) that drops revisions, layers or tasks, or changes a
    setting, is refused with the fix; one that only adds to the grid goes ahead (its tables grow).
    `force` re-stamps it: the tables are then rebuilt from this version's results and this grid only.
    """
    path = run.root / RUN_STAMP
    grid = _grid(spec, plan or make_plan(spec, resolve=False))
    mine = {"code_version": CODE_VERSION, "mteb": packages()["mteb"], "layertime": packages()["layertime"]}
    try:
        theirs = json.loads(path.read_text())
    except FileNotFoundError:
        theirs = None
    except (OSError, ValueError) as e:
        raise IncompatibleRun(f"run root {run.root}: cannot read {path}: {e}; fix or remove it") from e
    if theirs is not None and not isinstance(theirs, dict):
        raise IncompatibleRun(f"run root {run.root}: {path} is not a run stamp; fix or remove it")
    differs = [k for k in ("code_version", "mteb") if theirs.get(k) != mine[k]] if theirs is not None else []
    if differs and not force:
        found = ", ".join(f"{k} {theirs.get(k)}" for k in differs)
        want = ", ".join(f"{k} {mine[k]}" for k in differs)
        raise IncompatibleRun(
            f"run root {run.root} holds results of {found}; this is {want}, whose numbers may "
            f"differ. Give this run another run_root, or pass --force to recompute every unit "
            f"here with this version (the tables then hold this version's results only)"
        )
    changes = _grid_changes(theirs.get("grid"), grid) if theirs is not None and not differs else []
    if changes and not force:
        raise IncompatibleRun(
            f"run root {run.root} holds another grid: {'; '.join(changes)}. Running here would replace "
            f"its tables and spec.yaml. Give this run a run_root of its own (the spec's run_root, or "
            f'the flow\'s overrides {{"run_root": "{run.root}-{settings_id(grid)[:6]}"}}): units already '
            f"in the store are reused, not computed again. Or pass --force (flow parameter force=true) "
            f"to replace this run root's tables with this spec's"
        )
    same = theirs is not None and not differs
    since = theirs.get("since") if same else time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stamp = {**mine, "spec": spec.digest, "since": since, "grid": grid}
    atomic_write_text(path, json.dumps(stamp, indent=2))
    return stamp


_GROWS = ("checkpoints", "layers", "tasks")  # a spec may add rows to a run root's tables, never drop any
_MEANING = (
    "model",
    "final_norm",
    "pooling",
    "normalize",
    "max_length",
    "dtype",
    "tokens_per_batch",
    "aggregation",
)


def _grid(spec: ExperimentSpec, plan: Plan) -> dict[str, Any]:
    """What a run root's tables hold: their rows (revisions, blocks, tasks) and what each number means."""
    return {
        "checkpoints": list(spec.checkpoints),
        "layers": list(plan.blocks),
        "tasks": list(spec.tasks),
        **{k: getattr(spec, k) for k in _MEANING},
        "metrics": spec.metrics.model_dump() if spec.metrics is not None else None,
    }


def _grid_changes(theirs: dict[str, Any] | None, mine: dict[str, Any]) -> list[str]:
    """How `mine` departs from the grid a run root holds, beyond adding rows (none for an older stamp)."""
    if not isinstance(theirs, dict):
        return []
    changes = []
    for k, want in mine.items():
        held = theirs.get(k)
        if k in _GROWS:
            grows = isinstance(held, list) and set(held) <= set(want)
        else:
            grows = held == want or (k == "metrics" and held is None)  # metrics added: the tables gain them
        if not grows:
            changes.append(f"it holds {k} {_show(held)}, this spec asks for {k} {_show(want)}")
    return changes


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | str) else str(value)
