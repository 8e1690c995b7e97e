"""What every phase of one run shares: its plan (the spec inside), where its files live, its settings."""

from __future__ import annotations

from dataclasses import dataclass

from layertime.plan import Plan
from layertime.rundir import RunDir
from layertime.settings import Settings
from layertime.spec import ExperimentSpec


@dataclass(frozen=True)
class Context:
    """One run's plan, run root and store, and the settings its units are keyed by: small and
    picklable (a Prefect task ships it to workers with each unit)."""

    plan: Plan
    run: RunDir
    settings: Settings

    @classmethod
    def of(cls, plan: Plan, device: str | None = None) -> Context:
        """The context of `plan` with the settings of `device` (default: cuda if present)."""
        spec = plan.spec
        return cls(plan, RunDir.of(spec.run_root, spec.store), Settings.of(spec, device))

    @property
    def spec(self) -> ExperimentSpec:
        return self.plan.spec
