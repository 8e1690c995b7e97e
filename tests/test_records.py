"""layertime/records.py: a record or embedding file is accepted only when it is whole (its version,
its digest), typed (its model) and what its unit asked for (issue 24); anything else is absent, with
one log line naming the file and why, never merged or scored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from layertime import records, suite
from layertime.measure import PER_PROMPT, metric_names

COMMIT = "a" * 40
SETTINGS = {"pooling": "mean", "code_version": "3"}
STS = records.ScoreAsk("org/m", COMMIT, "DemoSTS", 1, SETTINGS, frozenset({("test", "default")}), (-1.0, 1.0))


def _row(**fields) -> dict:
    return {"model": "org/m", "commit": COMMIT, "layer": 1, "hidden_state": 2, "depth": 0.5, "task": "DemoSTS",
            "task_type": "STS", "subset": "default", "split": "test", "main_score": 0.70771, "mteb_version": "2.26.24",
            "dataset_revision": "r1", "seconds": 1.5, "peak_memory_gb": 0.9, **fields}  # fmt: skip


def _score_record(tmp_path: Path, rows: list[dict] | None = None) -> Path:
    path = tmp_path / "scores/layer_1.json"
    records.write_score(path, STS, rows or [_row()], SETTINGS, {"host": "h"}, "b" * 64)
    return path


def _resealed(path: Path, edit) -> None:
    """An attacker who knows the format: the content edited and its digest computed again."""
    data = json.loads(path.read_text())
    edit(data)
    data["digest"] = records.content_digest(data)
    path.write_text(json.dumps(data))


def _rejections(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "layertime.records" and "rejected" in r.getMessage()
    ]


def test_a_score_record_reads_back_as_written(tmp_path, caplog):
    path = _score_record(tmp_path)
    assert records.read_score(path, STS) == [_row()]
    record = json.loads(path.read_text())
    assert record["version"] == records.VERSION and record["embeddings_sha256"] == "b" * 64
    assert record["digest"] == records.content_digest(record)
    assert _rejections(caplog) == []


SCORE_ATTACKS = {
    "main_score NaN": (lambda d: d["rows"][0].update(main_score=math.nan), "rows.0.main_score: Input should be a finite number"),
    "main_score inf": (lambda d: d["rows"][0].update(main_score=math.inf), "rows.0.main_score: Input should be a finite number"),
    "main_score 7.5": (lambda d: d["rows"][0].update(main_score=7.5), "main_score 7.5 of test/default is outside [-1, 1]"),
    "an extra subset row": (lambda d: d["rows"].append({**d["rows"][0], "subset": "extra"}), "the unit asks for [('test', 'default')]"),
    "split train": (lambda d: d["rows"][0].update(split="train"), "scores of (split, subset) [('train', 'default')]"),
    "another layer's row": (lambda d: d["rows"][0].update(layer=3, hidden_state=4), "a row of org/m@aaaa"),
    "another commit's row": (lambda d: d["rows"][0].update(commit="c" * 40), "a row of org/m@cccc"),
    "other settings": (lambda d: d.update(settings={"pooling": "last", "code_version": "3"}), "other settings"),
    "an unknown key": (lambda d: d.update(note="hi"), "note: Extra inputs are not permitted"),
    "a string for a number": (lambda d: d["rows"][0].update(main_score="0.7"), "rows.0.main_score: Input should be a valid number"),
    "no embeddings digest": (lambda d: d.update(embeddings_sha256="not a digest"), "embeddings_sha256: String should match"),
}  # fmt: skip


@pytest.mark.parametrize("attack", SCORE_ATTACKS)
def test_a_score_record_that_is_not_what_its_unit_asked_for_is_rejected_with_one_line(
    attack, tmp_path, caplog
):
    path = _score_record(tmp_path)
    edit, why = SCORE_ATTACKS[attack]
    _resealed(path, edit)
    assert records.read_score(path, STS) is None
    assert not path.exists()  # absent: computed again
    (line,) = _rejections(caplog)
    assert line.startswith(f"rejected {path}: ") and why in line, line


def test_a_score_record_edited_by_one_digit_or_of_another_version_is_rejected(tmp_path, caplog):
    path = _score_record(tmp_path)
    path.write_text(
        path.read_text().replace("0.70771", "0.70781")
    )  # in range, finite: only the digest sees it
    assert records.read_score(path, STS) is None
    path = _score_record(tmp_path)
    _resealed(path, lambda d: d.update(version=2))
    assert records.read_score(path, STS) is None
    path = _score_record(tmp_path)
    path.write_text(json.dumps({"rows": [_row()]}))  # the layout before versioned records
    assert records.read_score(path, STS) is None
    assert [line.split(": ", 1)[1] for line in _rejections(caplog)] == [
        "its digest does not match its content (edited or damaged); computed again",
        "schema version 2, this code reads version 1; computed again",
        "schema version None, this code reads version 1; computed again",
    ]


def test_a_score_record_that_would_be_rejected_is_never_written(tmp_path):
    with pytest.raises(records.InvalidRecord, match="main_score 1.5 of test/default is outside"):
        _score_record(tmp_path, [_row(main_score=1.5)])
    with pytest.raises(ValueError, match="finite"):
        _score_record(tmp_path, [_row(main_score=math.nan)])
    assert not (tmp_path / "scores/layer_1.json").exists()


# --- metrics records --------------------------------------------------------------------------------

METRICS = records.MetricsAsk("org/m", COMMIT, 1, SETTINGS, "key1", frozenset(metric_names(0, 0)), PER_PROMPT)


def _metric_rows(**values) -> list[dict]:
    return [{"model": "org/m", "commit": COMMIT, "depth": 0.5, "layer": 1, "hidden_state": 2, "corpus": "c", "metric": m,
             "normalization": n, "value": values.get(m, 0.25), "n_prompts": 10, "n_skipped": 0} for m, n in metric_names(0, 0)]  # fmt: skip


def _metrics_record(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "metrics/layer_1.json"
    records.write_metrics(path, METRICS, rows, {"views": 0}, {"host": "h"})
    return path


def test_a_metric_is_nan_only_where_no_prompt_could_be_measured(tmp_path, caplog):
    rows = _metric_rows(curvature=math.nan)
    rows[1]["n_skipped"] = 10  # curvature: every prompt too short, its mean is NaN (docs/design.md §5)
    path = _metrics_record(tmp_path, rows)
    found = records.read_metrics(path, METRICS)
    assert found is not None and math.isnan(found[1]["value"]) and found[1]["metric"] == "curvature"
    attacks = {
        "a NaN where prompts were measured": lambda d: d["rows"][1].update(n_skipped=3),
        "a NaN dataset metric": lambda d: d["rows"][2].update(value=math.nan),
        "an infinite value": lambda d: d["rows"][3].update(value=math.inf),
        "a metric row missing": lambda d: d["rows"].pop(),
        "a metric row added": lambda d: d["rows"].append(
            {**d["rows"][0], "metric": "lidar", "normalization": "raw"}
        ),
        "another metrics key": lambda d: d.update(metrics_key="key2"),
    }
    for edit in attacks.values():
        path = _metrics_record(tmp_path, rows)
        _resealed(path, edit)
        assert records.read_metrics(path, METRICS) is None and not path.exists()
    assert len(_rejections(caplog)) == len(attacks)
    with pytest.raises(records.InvalidRecord, match="dataset_entropy/max_entropy is nan"):
        _metrics_record(tmp_path, _metric_rows(dataset_entropy=math.nan))


# --- cost records -----------------------------------------------------------------------------------


def test_a_cost_record_reads_back_and_a_damaged_one_is_removed(tmp_path, caplog):
    path = tmp_path / "costs/embed__DemoSTS.json"
    cost = records.CostRecord.seal(
        phase="embed", task="DemoSTS", seconds=2.5, device="cpu", texts=10, oom_splits=0
    )
    records.write_cost(path, cost)
    assert records.read_cost(path) == cost and cost.row()["texts"] == 10
    _resealed(path, lambda d: d.update(seconds=-1.0))
    assert records.read_cost(path) is None and not path.exists()
    assert records.read_cost(path) is None  # absent: no second line
    (line,) = _rejections(caplog)
    assert "seconds: Input should be greater than or equal to 0" in line


# --- a unit's embeddings ----------------------------------------------------------------------------

TEXTS = ["one", "two", "three"]
UNIT = records.EmbeddingsAsk.of("org/m", COMMIT, "DemoSTS", TEXTS)


def _unit(tmp_path: Path) -> Path:
    """A unit's embeddings as embed_unit writes them: texts.json, two layers, the manifest last."""
    path = tmp_path / "unit"
    path.mkdir()
    (path / "texts.json").write_text(json.dumps(TEXTS))
    files = {"texts.json": records.embedding_file(path / "texts.json", None, 3, None)}
    for b in (1, 3):
        np.save(path / f"layer_{b}.npy", np.arange(3 * 4, dtype=np.float32).reshape(3, 4) * (b + 1))
        files[f"layer_{b}.npy"] = records.embedding_file(path / f"layer_{b}.npy", b, 3, 4)
    cost = records.CostRecord.seal(phase="embed", task="DemoSTS", seconds=1.0, device="cpu")
    records.write_manifest(path, records.EmbeddingsManifest.seal(model="org/m", commit=COMMIT, task="DemoSTS",
                           texts_sha256=UNIT.texts_sha256, texts=3, files=files, cost=cost))  # fmt: skip
    return path


def _nan_into(npy: Path) -> None:
    """NaN written over the last float of an array: its header and size intact."""
    data = bytearray(npy.read_bytes())
    data[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    npy.write_bytes(bytes(data))


def test_whole_embeddings_are_accepted_and_loaded(tmp_path):
    path = _unit(tmp_path)
    found = records.check_embeddings(path, UNIT)
    assert found.holds([1, 3]) and not found.holds([1, 2]) and found.rejected == {}
    vectors, digest = records.load_layer(path, UNIT, 3)
    assert np.array_equal(vectors, np.load(path / "layer_3.npy")) and digest == records.sha256(
        (path / "layer_3.npy").read_bytes()
    )


def test_a_layer_file_that_is_not_the_one_its_manifest_lists_is_rejected(tmp_path):
    path = _unit(tmp_path)
    (path / "layer_3.npy").write_bytes(
        (path / "layer_1.npy").read_bytes()
    )  # another layer's array copied over
    _nan_into(path / "layer_1.npy")  # NaN in a kept array, header and size intact
    found = records.check_embeddings(path, UNIT)
    assert found.holds([]) and not found.holds([1]) and not found.holds([3])
    assert found.rejected == {"layer_1.npy": "its content digest differs from the manifest's (edited or damaged)",
                              "layer_3.npy": "its content digest differs from the manifest's (edited or damaged)"}  # fmt: skip
    with pytest.raises(records.RejectedEmbeddings, match=r"layer_3\.npy: its content digest differs"):
        records.load_layer(path, UNIT, 3)


def test_non_finite_values_are_rejected_even_under_a_manifest_that_lists_them(tmp_path):
    path = _unit(tmp_path)
    _nan_into(path / "layer_1.npy")
    manifest = json.loads((path / "done.json").read_text())  # the manifest made to agree with the file
    manifest["files"]["layer_1.npy"]["sha256"] = records.sha256((path / "layer_1.npy").read_bytes())
    manifest["digest"] = records.content_digest(manifest)
    (path / "done.json").write_text(json.dumps(manifest))
    assert records.check_embeddings(path, UNIT).rejected == {"layer_1.npy": "1 non-finite values"}
    with pytest.raises(records.RejectedEmbeddings, match=r"layer_1\.npy: 1 non-finite values"):
        records.load_layer(path, UNIT, 1)


def test_embeddings_of_another_unit_or_text_set_are_all_rejected(tmp_path):
    path = _unit(tmp_path)
    other = records.EmbeddingsAsk.of("org/m", COMMIT, "DemoSTS", [*TEXTS, "four"])
    found = records.check_embeddings(path, other)
    assert (
        found.good == {}
        and list(found.rejected) == ["done.json"]
        and "the unit is org/m" in found.rejected["done.json"]
    )
    with pytest.raises(records.RejectedEmbeddings, match="another unit or another text set"):
        records.load_layer(path, other, 1)
    (path / "done.json").write_text("{}")
    assert records.check_embeddings(path, UNIT).rejected == {
        "done.json": "schema version None, this code reads version 1"
    }


# --- what a task asks for ---------------------------------------------------------------------------


def test_every_suite_task_has_its_scores_and_main_score_range():
    for name in sorted(suite.known_tasks()):
        asked = suite.requested(name, "rule-a")
        assert asked.scores and {split for split, _ in asked.scores} == {suite.SPLIT}, name
        assert (
            asked.bounds == (-1.0, 1.0) if suite.task_type(name) == "STS" else asked.bounds == (0.0, 1.0)
        ), name
    assert suite.requested("AmazonCounterfactualClassification").scores == {
        ("test", "en"),
        ("test", "en-ext"),
    }
    assert suite.requested("STS17").scores == {("test", "en-en")}
    assert suite.requested("MindSmallReranking").metric == "max_over_subqueries_map_at_1000"
