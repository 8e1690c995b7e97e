"""Every number has a complete identity (issue 14, items 2 and 8): whatever changes a number is in the
key it is stored under, a unit returns exactly what it asked for at full precision, and a spec whose
grid differs never overwrites another grid's run root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mteb.mocks.mock_tasks.classification import MockMultilingualClassificationTask
from prefect_runs import states  # tests/prefect_runs.py

from layertime import bridge, runroot
from layertime.phases.plain import run_spec
from layertime.runroot import IncompatibleRun
from layertime.settings import Settings
from layertime.spec import ExperimentSpec, SearchSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "deployments/demo.yaml")

# Every spec field, by what it does to a number. A new field fails the first test until it is placed.
CHANGES_NUMBERS = {"final_norm": "last", "pooling": "last", "normalize": True, "max_length": 64,
                   "dtype": "bfloat16", "tokens_per_batch": 64, "aggregation": "mteb-v1"}  # fmt: skip
IN_THE_UNIT_PATH = {"model", "checkpoints", "layers", "tasks", "metrics"}  # its path, the metrics key
NO_NUMBER_CHANGES = {
    "name",
    "run_root",
    "store",
    "hf_cache",
    "keep_embeddings",
    "search",
}  # search: which units, not their numbers


def _demo(hub: Path, run_root: Path, **fields) -> ExperimentSpec:
    small = {"checkpoints": ["step1000"], "layers": [3], "tasks": ["DemoSTS"], "metrics": None}
    return load_spec(SPEC, run_root=str(run_root), hf_cache=str(hub), **{**small, **fields})


def _records(store: Path) -> dict[str, dict]:
    """Score records by path relative to the store -> the record."""
    return {
        str(p.relative_to(store)): json.loads(p.read_text())
        for p in sorted((store / "scores").rglob("*.json"))
    }


def test_every_setting_that_changes_a_number_is_in_the_settings_id(tmp_path):
    assert set(ExperimentSpec.model_fields) == set(CHANGES_NUMBERS) | IN_THE_UNIT_PATH | NO_NUMBER_CHANGES
    spec = load_spec(SPEC, run_root=str(tmp_path / "demo"))
    base = Settings.of(spec, "cpu")
    for field, value in CHANGES_NUMBERS.items():
        assert getattr(spec, field) != value, field
        assert Settings.of(spec.model_copy(update={field: value}), "cpu").id != base.id, field
    # where it embeds (float32 on a GPU gives other bits than on a CPU), mteb's and our code's version
    assert Settings.of(spec, "cuda").id != base.id
    import mteb

    from layertime import CODE_VERSION

    assert base.as_dict()["mteb"] == mteb.__version__ and base.as_dict()["code_version"] == CODE_VERSION
    for field in NO_NUMBER_CHANGES - {"name"}:
        other = {"run_root": tmp_path / "x", "store": tmp_path / "s", "hf_cache": tmp_path / "h",
                 "keep_embeddings": True, "search": SearchSpec(epsilon=2.0, seed=7)}[field]  # fmt: skip
        assert Settings.of(spec.model_copy(update={field: other}), "cpu").id == base.id, field


def _mock_task(subsets: list[str] | None = None) -> MockMultilingualClassificationTask:
    task = MockMultilingualClassificationTask()
    if subsets is not None:
        task.filter_languages(None, hf_subsets=subsets)
    return task


def test_a_unit_gets_exactly_the_subsets_it_asks_for_even_after_others_were_scored(tmp_path):
    recorder = bridge.RecordingEncoder()
    bridge._evaluate(recorder, _mock_task(), None)
    texts = list(recorder.seen)
    vectors = np.random.default_rng(0).standard_normal((len(texts), 16)).astype(np.float32)
    meta = bridge.model_meta("layertime/tiny-neox", "c" * 40, 16, {"layer": 0})
    results = tmp_path / "mteb"
    both = bridge._evaluate(bridge.LookupEncoder(texts, vectors, meta), _mock_task(), results)
    subsets = [s["hf_subset"] for s in both.scores["test"]]
    assert len(subsets) == 2
    one = bridge._evaluate(bridge.LookupEncoder(texts, vectors, meta), _mock_task(subsets[:1]), results)
    assert [s["hf_subset"] for s in one.scores["test"]] == subsets[:1]  # not the other one scored before


@pytest.mark.slow
def test_a_rescored_unit_equals_its_first_score_bit_for_bit(hub, tmp_path):
    spec = _demo(hub, tmp_path / "demo", tasks=["DemoSTS", "DemoClassification"])
    first = run_spec(spec)
    records = _records(tmp_path / "store")
    assert len(records) == 2
    for path in records:
        (tmp_path / "store" / path).unlink()  # e.g. a record lost with a disk: the unit is scored again
    again = run_spec(spec)
    assert (again.scored, again.skipped) == (2, 0)
    rescored = _records(tmp_path / "store")
    assert rescored.keys() == records.keys()
    for path, record in records.items():
        # The very same float: not mteb's cached copy of it, rounded to 6 decimals.
        assert [r["main_score"] for r in rescored[path]["rows"]] == [r["main_score"] for r in record["rows"]]
    assert any(len(repr(r["main_score"])) > 10 for rec in records.values() for r in rec["rows"])
    assert pl.read_parquet(again.tables["scores"])["main_score"].to_list() == (
        pl.read_parquet(first.tables["scores"])["main_score"].to_list()
    )


@pytest.mark.slow
def test_runs_of_two_aggregation_rules_sharing_a_store_never_read_each_others_records(hub, tmp_path):
    rule_a = run_spec(_demo(hub, tmp_path / "rule-a", aggregation="rule-a"))
    mteb_v1 = run_spec(_demo(hub, tmp_path / "mteb-v1", aggregation="mteb-v1"))
    assert (rule_a.scored, mteb_v1.scored, mteb_v1.skipped) == (1, 1, 0)
    records = _records(tmp_path / "store")
    assert sorted(r["settings"]["aggregation"] for r in records.values()) == ["mteb-v1", "rule-a"]
    again = run_spec(_demo(hub, tmp_path / "rule-a", aggregation="rule-a"))
    assert (again.scored, again.skipped) == (0, 1)  # and each still finds its own


@pytest.mark.slow
def test_metrics_of_a_task_corpus_are_keyed_by_its_tasks(hub, tmp_path):
    metrics = {"corpus": "tasks", "sample": 40, "views": 0, "lidar_views": 0}
    sts = run_spec(_demo(hub, tmp_path / "sts", tasks=["DemoSTS"], metrics=metrics))
    pairs = run_spec(_demo(hub, tmp_path / "pairs", tasks=["DemoPairClassification"], metrics=metrics))
    a = pl.read_parquet(sts.tables["metrics"]).sort("metric", "normalization")
    b = pl.read_parquet(pairs.tables["metrics"]).sort("metric", "normalization")
    assert a.height == b.height > 0
    assert a["value"].to_list() != b["value"].to_list()  # measured on its own prompts, not read back


@pytest.mark.slow
def test_a_spec_that_shrinks_or_changes_the_grid_is_refused_one_that_grows_it_goes_ahead(hub, tmp_path):
    spec = _demo(hub, tmp_path / "demo", layers=[1, 3])
    run_spec(spec)
    tables = (tmp_path / "demo/tables/scores.parquet").read_bytes()
    snapshot = (tmp_path / "demo/spec.yaml").read_text()
    for change in ({"layers": [1]}, {"pooling": "last"}, {"tasks": ["DemoClassification"]}):
        with pytest.raises(IncompatibleRun, match=rf"{next(iter(change))}.*run_root.*--force"):
            run_spec(_demo(hub, tmp_path / "demo", **{"layers": [1, 3], **change}))
        assert (tmp_path / "demo/tables/scores.parquet").read_bytes() == tables
        assert (tmp_path / "demo/spec.yaml").read_text() == snapshot
    grown = run_spec(_demo(hub, tmp_path / "demo", layers=[1, 3], tasks=["DemoSTS", "DemoClassification"]))
    assert (grown.scored, grown.skipped) == (2, 2)
    assert pl.read_parquet(grown.tables["scores"]).height == 4
    forced = run_spec(_demo(hub, tmp_path / "demo", layers=[1]), force=True)
    assert (forced.scored, pl.read_parquet(forced.tables["scores"]).height) == (0, 1)


# --- through the flow: overrides on a deployment ------------------------------------------------


@pytest.mark.slow
def test_overrides_never_overwrite_another_grid_and_reuse_its_metrics_per_layer(prefect_api, hub, tmp_path):
    from flows.layer_by_layer import layer_by_layer

    metrics = {"corpus": "tasks", "sample": 40, "views": 2, "lidar_views": 4}
    base = {"hf_cache": str(hub), "checkpoints": ["step1000"], "tasks": ["DemoSTS"], "metrics": metrics}
    run_spec(load_spec(SPEC, run_root=str(tmp_path / "demo"), layers=[1, 3], **base))  # the experiment
    tables = {p.name: p.read_bytes() for p in (tmp_path / "demo/tables").iterdir()}
    snapshot = (tmp_path / "demo/spec.yaml").read_text()

    state = layer_by_layer(SPEC, overrides={**base, "run_root": str(tmp_path / "demo"), "layers": [1]},
                           return_state=True)  # fmt: skip
    assert state.is_failed()
    with pytest.raises(IncompatibleRun, match=r"layers \[1, 3\].*layers \[1\].*run_root.*force"):
        state.result()
    assert {p.name: p.read_bytes() for p in (tmp_path / "demo/tables").iterdir()} == tables
    assert (tmp_path / "demo/spec.yaml").read_text() == snapshot

    # The fix the message names: a run root of its own. Its units and metrics are all in the store.
    state = layer_by_layer(SPEC, overrides={**base, "run_root": str(tmp_path / "one"), "layers": [1]},
                           return_state=True)  # fmt: skip
    assert state.is_completed(), state
    runs = states(state.state_details.flow_run_id)
    assert not [name for name in runs if name.startswith("gpu[")], runs  # no model load, no metrics pass
    measured = pl.read_parquet(tmp_path / "one/tables/metrics.parquet")
    assert set(measured["layer"]) == {1} and measured["value"].is_not_null().all()
    first = pl.read_parquet(tmp_path / "demo/tables/metrics.parquet").filter(pl.col("layer") == 1)
    assert measured.sort("metric", "normalization")["value"].to_list() == (
        first.sort("metric", "normalization")["value"].to_list()
    )
    assert runroot.RUN_STAMP in {p.name for p in (tmp_path / "one").iterdir()}
