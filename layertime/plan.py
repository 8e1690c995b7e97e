"""The grid of an experiment: checkpoints × layers × tasks, and the distinct units of work.

Evaluations are what the spec asks for; units are what must be computed: revisions that
resolve to the same commit (Pythia's `main` and `step143000`) share their units, within one spec
and across specs. Planning never touches a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layertime import architecture, checkpoints, costs
from layertime.checkpoints import Checkpoint
from layertime.hub.cache import CorruptRef, cached_commit
from layertime.spec import ExperimentSpec, NeedsConfig, SpecError


@dataclass(frozen=True)
class ScoreUnit:
    """One (checkpoint, task, layer) evaluation, identified by the checkpoint's commit."""

    checkpoint: Checkpoint
    task: str
    layer: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.checkpoint.model, self.checkpoint.key, self.task, self.layer)


@dataclass
class Plan:
    """A validated spec expanded against the model: resolved checkpoints and block indices."""

    spec: ExperimentSpec
    checkpoints: list[Checkpoint]
    blocks: list[int]
    num_blocks: int | None
    resolved: bool  # False: commits unknown (offline, not cached); units are keyed by revision name
    notes: list[str] = field(default_factory=list)
    hidden_size: int | None = None  # the model's width d, from its config (None: config not available)

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.tasks)

    @property
    def evaluations(self) -> int:
        return len(self.checkpoints) * len(self.blocks) * len(self.tasks)

    def distinct_checkpoints(self) -> list[Checkpoint]:
        """One checkpoint per commit (the first revision named for it)."""
        seen: dict[str, Checkpoint] = {}
        for ckpt in self.checkpoints:
            seen.setdefault(ckpt.key, ckpt)
        return list(seen.values())

    def units(self) -> list[ScoreUnit]:
        """Distinct (commit, task, layer) units in checkpoint, task, layer order."""
        return [
            ScoreUnit(c, t, b) for c in self.distinct_checkpoints() for t in self.tasks for b in self.blocks
        ]

    def summary(self) -> dict:
        distinct = self.distinct_checkpoints()
        return {
            "name": self.spec.name,
            "model": self.spec.model,
            "checkpoints": len(self.checkpoints),
            "distinct_checkpoints": len(distinct),
            "layers": len(self.blocks),
            "blocks": self.blocks,
            "num_blocks": self.num_blocks,
            "tasks": len(self.tasks),
            "evaluations": self.evaluations,
            "units": {
                "score": len(distinct) * len(self.blocks) * len(self.tasks),
                "embed": len(distinct) * len(self.tasks),
                "measure": len(distinct),
            },
            "commits_resolved": self.resolved,
            "layer_convention": "layer = 0-based block index b; hidden_states[b + 1]",
            "notes": self.notes,
        }

    def cost_grid(self) -> costs.Grid:
        """What `layertime.costs.estimate` needs: distinct checkpoints × layers × tasks and the model's shape.

        Without the model config (offline, not cached) the shape is Pythia-410m's (24 blocks, d=1024),
        and a note says so.
        """
        if self.num_blocks is None or self.hidden_size is None:
            note = "model shape unknown offline: cost estimates assume Pythia-410m (24 blocks, d=1024)"
            if note not in self.notes:
                self.notes.append(note)
        metrics = self.spec.metrics
        return costs.Grid(
            checkpoints=len(self.distinct_checkpoints()),
            layers=len(self.blocks),
            tasks=tuple(self.tasks),
            num_blocks=self.num_blocks or 24,
            hidden=self.hidden_size or costs.REFERENCE_DIM,
            max_length=self.spec.max_length,
            measure_views=None if metrics is None else (metrics.views, metrics.lidar_views),
        )


def make_plan(spec: ExperimentSpec, resolve: bool = True, strict: bool = False) -> Plan:
    """Expand `spec` against its model config and resolve revisions to commits where possible.

    The block range is checked against the model config (from the HF cache, or the hub when
    online). Offline without a cached config or ref, the plan still counts the grid and says what
    it could not check. `strict` (before a run): every revision must resolve, else CheckpointError.
    """
    notes: list[str] = []
    if strict:
        check_metrics_corpus(spec)
    num_blocks, hidden_size, unreadable = _model_shape(spec, notes, strict)
    try:
        blocks = spec.blocks(num_blocks)
    except NeedsConfig as e:  # 'all' or {last: N}: the checkpoint without a config is the problem
        raise SpecError(f"{spec.name}: checkpoints: {unreadable}; {e}") from None
    except SpecError as e:
        raise SpecError(f"{spec.name}: {e}") from None
    ckpts, resolved = [], resolve
    for rev in spec.checkpoints:
        ckpt = None
        if resolve:
            try:
                ckpt = checkpoints.resolve(spec.model, rev, spec.hf_cache)
            except checkpoints.CheckpointError as e:
                if strict or isinstance(e, CorruptRef):  # a damaged cache is never planned around
                    raise
                resolved = False
        ckpts.append(ckpt or Checkpoint(spec.model, rev, cached_commit(spec.model, rev, spec.hf_cache)))
    if not resolved:
        notes.append(
            "commit resolution skipped (offline or not cached): revisions that share a commit "
            "(e.g. main = step143000) are counted separately"
        )
    return Plan(spec, ckpts, blocks, num_blocks, resolved, notes, hidden_size)


def _model_shape(
    spec: ExperimentSpec, notes: list[str], strict: bool
) -> tuple[int | None, int | None, str | None]:
    """Blocks and width of the model (config of the first revision), or Nones with a note and the
    reason when unavailable."""
    try:
        config = checkpoints.load_config(spec.model, spec.checkpoints[0], spec.hf_cache)
    except checkpoints.CheckpointError as e:
        if strict or isinstance(e, CorruptRef):
            raise
        notes.append(f"model config of {spec.model} not available offline: block range not checked")
        return None, None, str(e)
    return architecture.num_blocks(config), architecture.hidden_size(config), None


def check_metrics_corpus(spec: ExperimentSpec) -> None:
    """A metrics corpus file that cannot serve (not UTF-8, fewer than 2 usable lines) is a SpecError
    before a run, not an error after its first model load. Built-in corpora are checked by verify."""
    from layertime import metrics_corpus

    m = spec.metrics
    if m is None or m.corpus in ("wikitext-103", "tasks"):
        return
    if not Path(m.corpus).is_file():
        raise SpecError(f"metrics.corpus: {m.corpus!r} is neither wikitext-103, tasks nor a file")
    try:
        metrics_corpus.file_prompts(m.corpus)
    except metrics_corpus.CorpusError as e:
        raise SpecError(str(e)) from None


def combined(plans: Sequence[Plan]) -> dict:
    """Units shared across several plans (e.g. exp1 and exp2 overlap at step143000, blocks 20-23)."""
    keys: set = set()
    total = 0
    for plan in plans:
        units = {u.key for u in plan.units()}
        total += len(units)
        keys |= units
    return {
        "evaluations": sum(p.evaluations for p in plans),
        "score_units": total,
        "distinct_score_units": len(keys),
        "shared_score_units": total - len(keys),
    }
