"""The offline worlds a spec may ask for: the demo model, the scale world's and the trajectory world's
(`layertime.demo.trajectory`), built into the spec's HF cache on the spot (never downloaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layertime.hub.cache import hub_cache

if TYPE_CHECKING:
    from layertime.spec import ExperimentSpec


def prepare_world(spec: ExperimentSpec) -> None:
    """Build the offline demo (or scale world) model into the spec's HF cache when the spec asks for it."""
    from layertime.demo.model import DEMO_REPO, ensure_demo_model
    from layertime.demo.scale_model import SCALE_REPO, ensure_scale_model
    from layertime.demo.trajectory import TRAJECTORY_REPO, ensure_trajectory_model

    if spec.model == DEMO_REPO:
        ensure_demo_model(hub_cache(spec.hf_cache))
    elif spec.model == SCALE_REPO:
        ensure_scale_model(hub_cache(spec.hf_cache))
    elif spec.model == TRAJECTORY_REPO:
        ensure_trajectory_model(hub_cache(spec.hf_cache))
