"""The offline test world (DESIGN §9): a fabricated HF hub cache with the tiny demo model and
config-only Pythia-410m revisions, loaded by repo id and revision with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub or mteb: no network, and no writes to ~/.cache.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="layertime-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["MTEB_CACHE"] = str(_SESSION_TMP / "mteb")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

PYTHIA = "EleutherAI/pythia-410m"


@pytest.fixture(scope="session")
def hub() -> Path:
    """A hub cache holding the demo model (step0..step3000, main) and Pythia-410m configs."""
    from layertime.demo.model import ensure_demo_model
    from layertime.hubcache import PYTHIA_410M_CONFIG, write_config_only_repo

    cache = _SESSION_TMP / "hub"
    ensure_demo_model(cache)
    steps = [f"step{s}" for s in range(94000, 143001, 1000)]
    write_config_only_repo(cache, PYTHIA, PYTHIA_410M_CONFIG, steps, {"main": "step143000"})
    return cache


@pytest.fixture(scope="session")
def demo_repo(hub: Path) -> str:
    from layertime.demo.model import DEMO_REPO

    return DEMO_REPO
