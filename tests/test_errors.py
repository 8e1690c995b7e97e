"""Retries are decided by `layertime.errors.Permanent` alone (issue 16): every error that cannot heal is
a Permanent and is tried once; every other error, a plain `ValueError` from some library included, is
retried. Proved where the user sees it: the task run's run count and state in the Prefect API, for the
real `record` task in a small flow and for the layer-by-layer flow itself."""

from __future__ import annotations

import asyncio
import errno
import json
import pickle
from pathlib import Path

import pytest
from prefect import flow
from prefect.states import exception_to_failed_state
from prefect_runs import task_runs  # tests/prefect_runs.py

from flows.layer_by_layer import UnitsFailed, layer_by_layer
from layertime.bridge import LookupMiss, UnexpectedScores
from layertime.checkpoints import CheckpointError
from layertime.encoder import DeviceUnavailable, NonFiniteEmbedding
from layertime.errors import Permanent
from layertime.hub.cache import MissingDatasetError
from layertime.metrics_corpus import CorpusError
from layertime.phases import record
from layertime.phases.score import MissingEmbeddings
from layertime.spec import NeedsConfig, SpecError, load_spec
from layertime.suite import UnknownTask
from tasks import units

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "deployments/demo.yaml")

# Each error that cannot heal, with the built-in base its callers catch it by (kept, so no caller changes).
PERMANENT = {
    SpecError: ValueError,
    NeedsConfig: ValueError,
    CheckpointError: LookupError,
    CorpusError: LookupError,
    MissingDatasetError: LookupError,
    NonFiniteEmbedding: FloatingPointError,
    DeviceUnavailable: ValueError,
    LookupMiss: KeyError,
    UnknownTask: KeyError,
    MissingEmbeddings: FileNotFoundError,
    UnexpectedScores: ValueError,
}


def _transient() -> list[BaseException]:
    """Errors that may heal: a dropped connection, an I/O hiccup, and a ValueError from a library
    (json's, as a half-written reply from a server would give) that says nothing about our input."""
    try:
        json.loads('{"half": ')
    except ValueError as e:
        library_value_error = e
    return [ConnectionError("connection reset by peer"), OSError(errno.EIO, "I/O error"), library_value_error]


@pytest.mark.parametrize("error", list(PERMANENT), ids=lambda c: c.__name__)
def test_each_error_that_cannot_heal_is_permanent_and_keeps_its_base(error):
    assert issubclass(error, Permanent)
    assert issubclass(error, PERMANENT[error])


@pytest.mark.parametrize("error", [c("injected") for c in PERMANENT] + _transient(), ids=repr)
def test_the_retry_condition_retries_exactly_what_is_not_permanent(error):
    state = asyncio.run(exception_to_failed_state(error))  # the Failed state Prefect gives the task
    assert units._may_heal(None, None, state) is not isinstance(error, Permanent)


@pytest.mark.parametrize(
    "errors",
    [{2: UnexpectedScores("injected")}, {1: MissingEmbeddings("injected"), 3: LookupMiss("injected")},
     {1: UnexpectedScores("injected"), 3: OSError(errno.EIO, "I/O error")}, {0: ConnectionError("reset")}],
    ids=repr,
)  # fmt: skip
def test_a_score_task_run_is_retried_unless_every_failed_layer_cannot_heal(errors):
    """A score task run scores several layers (issue 15); its error names each failed one, and a retry
    would fail the same way only if each of them is Permanent. It pickles by its errors (a SLURM
    worker ships it to the flow), the message and the class kept."""
    error = units._layers_failed(errors)
    permanent = all(isinstance(e, Permanent) for e in errors.values())
    assert isinstance(error, units.LayersFailed) and isinstance(error, Permanent) is permanent
    assert error.errors == {b: f"{type(e).__name__}: {e}" for b, e in errors.items()}
    state = asyncio.run(exception_to_failed_state(error))
    assert units._may_heal(None, None, state) is not permanent
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.errors, str(again)) == (type(error), error.errors, str(error))
    # The layers whose embeddings were missing or rejected: the flow embeds them again.
    unembedded = tuple(b for b, e in errors.items() if isinstance(e, MissingEmbeddings))
    assert again.unembedded == error.unembedded == unembedded


# --- where the user sees it: task runs in the Prefect API ------------------------------------------


@flow
def _one_recording(task_name: str, spec_path: str):
    return units.record(task_name, load_spec(spec_path), return_state=True)


FLOW_CASES = [CorpusError("injected"), MissingDatasetError("injected"), LookupMiss("injected")] + _transient()


@pytest.mark.slow
@pytest.mark.parametrize("error", FLOW_CASES, ids=repr)
def test_the_record_task_retries_a_transient_error_and_never_a_permanent_one(prefect_api, error, monkeypatch):
    calls = []

    def failing(task, *args):
        calls.append(task)
        raise error

    monkeypatch.setattr(record, "task_texts", failing)
    state = _one_recording("DemoSTS", SPEC, return_state=True)
    assert state.is_failed()
    run = task_runs(state.state_details.flow_run_id)["record[DemoSTS]"]
    tries = 1 if isinstance(error, Permanent) else 1 + units.record.retries
    assert (run.state.name, run.run_count, len(calls)) == ("Failed", tries, tries)


_task_texts = record.task_texts


@pytest.mark.slow
def test_the_flow_heals_a_transient_error_and_fails_a_permanent_one_at_once(
    prefect_api, hub, tmp_path, monkeypatch
):
    """DemoClassification's recording meets a library's ValueError once (retried: its units are scored);
    DemoSTS's meets a CorpusError (tried once: the flow fails naming it)."""
    failed_once = []

    def texts(task, *args):
        if task == "DemoSTS":
            raise CorpusError("injected: metrics corpus gone")
        if task == "DemoClassification" and not failed_once:
            failed_once.append(task)
            json.loads('{"half": ')
        return _task_texts(task, *args)

    monkeypatch.setattr(record, "task_texts", texts)
    grid = {"run_root": str(tmp_path / "demo"), "hf_cache": str(hub), "checkpoints": ["step1000"],
            "layers": [3], "tasks": ["DemoSTS", "DemoClassification"], "metrics": None}  # fmt: skip
    state = layer_by_layer(SPEC, overrides=grid, return_state=True)
    with pytest.raises(UnitsFailed, match=r"1 unit\(s\) failed:\nrecord\[DemoSTS\]: CorpusError: injected"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id)
    assert (runs["record[DemoSTS]"].state.name, runs["record[DemoSTS]"].run_count) == ("Failed", 1)
    healed = runs["record[DemoClassification]"]
    assert (healed.state.name, healed.run_count) == ("Completed", 2)
    assert runs["score[step1000 · DemoClassification · L3]"].state.name == "Completed"
