"""The flow keeps its promises (issue 14 items 1, 3, 4, 6, 11, 13; issue 17 items 3 and 7): the
completion records are the one truth for "done", a failure anywhere still ends the flow the documented
way, `gpu` tasks overlap and scoring starts as soon as a checkpoint's GPU work ends, progress can be
watched, and `--plain` loads each checkpoint once. Flow-level: real flow runs through Dask under a
real Prefect server (the session's), task-run states and timestamps read back from the API."""

import contextvars
import json
import shutil
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterTaskRunId
from prefect.client.schemas.sorting import ArtifactSort
from prefect_runs import artifact, task_runs  # tests/prefect_runs.py
from specs import demo_overrides  # tests/specs.py

from flows.layer_by_layer import UnitsFailed, layer_by_layer
from layertime import fastmteb
from layertime.encoder import NonFiniteEmbedding
from layertime.phases import embed, record
from layertime.phases.plain import run_spec
from layertime.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "deployments/demo.yaml")
PROGRESS_KEY = "layer-by-layer-progress"


def _run(overrides: dict, cluster_overrides: dict | None = None):
    state = layer_by_layer(SPEC, overrides=overrides, cluster_overrides=cluster_overrides, return_state=True)
    return state, task_runs(state.state_details.flow_run_id)


def _unit_runs(runs: dict) -> list[str]:
    return sorted(n for n in runs if n.startswith(("gpu[", "score[")))


def _grid(tmp_path: Path, hub: Path, **fields) -> dict:
    return demo_overrides(tmp_path, hub, **{"layers": [2, 3], **fields})


def _rows(record: Path) -> list[dict]:
    return [
        {k: r[k] for k in ("subset", "split", "main_score")} for r in json.loads(record.read_text())["rows"]
    ]


@pytest.mark.slow
def test_the_records_are_the_one_truth_for_done_wherever_the_store_is(prefect_api, hub, tmp_path):
    grid = _grid(tmp_path / "a", hub)
    state, _ = _run(grid)
    assert state.is_completed(), state.message
    first = pl.read_parquet(tmp_path / "a/demo/tables/scores.parquet").drop("seconds", "peak_memory_gb")
    record = next((tmp_path / "a/store/scores").rglob("DemoSTS/layer_3.json"))
    scored = _rows(record)
    record.write_text(record.read_text()[:40])  # a damaged completion record

    state, runs = _run(grid)
    assert state.is_completed(), state.message
    # the damaged unit is computed again, with nothing standing in for its record (its score task
    # run takes only the missing layer, not the (checkpoint, task)'s layers 2-3)...
    assert _unit_runs(runs) == ["gpu[step1000]", "score[step1000 · DemoSTS · L3]"]
    assert runs["score[step1000 · DemoSTS · L3]"].state.name == "Completed"
    # ...and its record is written again, with the same numbers (mteb's cache hands them back rounded
    # to 6 decimals: issue 14.2, the keys' part)
    assert _rows(record) == [
        {**row, "main_score": pytest.approx(row["main_score"], abs=1e-6)} for row in scored
    ]

    state, runs = _run(grid)
    assert state.is_completed() and _unit_runs(runs) == []  # healed for good: no GPU work at all
    healed = pl.read_parquet(tmp_path / "a/demo/tables/scores.parquet").drop("seconds", "peak_memory_gb")
    assert healed.drop("main_score").equals(first.drop("main_score"))

    # Moved: the run root and its store now live at another path; nothing points to the old one.
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    shutil.rmtree(tmp_path / "a")
    state, runs = _run({**grid, "run_root": str(tmp_path / "b/demo")})
    assert state.is_completed(), state.message
    assert _unit_runs(runs) == []  # nothing recomputed
    moved = pl.read_parquet(tmp_path / "b/demo/tables/scores.parquet").drop("seconds", "peak_memory_gb")
    assert moved.equals(healed)
    assert not (tmp_path / "b/store/prefect").exists()  # no Prefect result that could go stale or bad


_embed_unit = embed.embed_unit


def _embed_all_but_sts(encoder, ctx, ckpt, task, *args):
    if task == "DemoSTS":
        raise NonFiniteEmbedding("injected NaN embeddings")
    return _embed_unit(encoder, ctx, ckpt, task, *args)


@pytest.mark.slow
def test_a_failed_embed_keeps_the_rows_whose_records_are_valid(prefect_api, hub, tmp_path, monkeypatch):
    grid = _grid(tmp_path, hub)
    state, _ = _run(grid)
    assert state.is_completed(), state.message
    next((tmp_path / "store/scores").rglob("DemoSTS/layer_3.json")).unlink()
    monkeypatch.setattr(embed, "embed_unit", _embed_all_but_sts)
    state, _ = _run(grid)
    with pytest.raises(
        UnitsFailed, match=r"1 unit\(s\) failed:\nembed\[step1000 · DemoSTS\]: NonFiniteEmbedding"
    ):
        state.result()
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")
    assert scores.select("revision", "task", "layer").rows() == [("step1000", "DemoSTS", 2)]  # layer 2 kept


_task_texts = record.task_texts


def _texts_but_sts(task, *args):
    if task == "DemoSTS":
        raise SystemError("AST constructor recursion depth mismatch (injected)")
    return _task_texts(task, *args)


@pytest.mark.slow
def test_an_unexpected_error_in_a_recording_fails_only_its_units_by_name(
    prefect_api, hub, tmp_path, monkeypatch
):
    monkeypatch.setattr(record, "task_texts", _texts_but_sts)
    state, runs = _run(_grid(tmp_path, hub, layers=[3], tasks=["DemoSTS", "DemoClassification"]))
    with pytest.raises(
        UnitsFailed, match=r"1 unit\(s\) failed:\nrecord\[DemoSTS\]: SystemError: AST constructor"
    ):
        state.result()
    assert runs["record[DemoSTS]"].state.name == "Failed"
    assert runs["score[step1000 · DemoClassification · L3]"].state.name == "Completed"
    scores = pl.read_parquet(tmp_path / "demo/tables/scores.parquet")  # the tables of what exists
    assert scores.select("task", "layer").rows() == [("DemoClassification", 3)]
    progress = artifact(state.state_details.flow_run_id)
    assert progress.description == "1/2 units scored, 1 failed; 1/1 (checkpoint, task) embedded"


def test_the_mteb_guard_is_computed_once_per_process_whatever_the_threads(monkeypatch):
    calls, real = [], fastmteb.mirrored_source_hash

    def counted() -> str:
        calls.append(threading.get_ident())
        return real()

    monkeypatch.setattr(fastmteb, "mirrored_source_hash", counted)
    fastmteb.mteb_unchanged.cache_clear()
    start = threading.Barrier(8)
    answers, errors = [], []

    def ask() -> None:
        start.wait()
        try:
            answers.append(fastmteb.mteb_unchanged())
        except Exception as e:  # the race of issue 14.3 raised SystemError here
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and answers == [True] * 8
    assert len(calls) == 1  # parsed once, by one thread
    fastmteb.mteb_unchanged()
    assert len(calls) == 1  # and never again


class _Watcher(threading.Thread):
    """Reads the newest progress artifact from the API while a flow runs: (time, percent, description)."""

    def __init__(self, since) -> None:
        super().__init__(daemon=True)
        self.since, self.seen, self.stop = since, [], threading.Event()
        self.context = contextvars.copy_context()  # the test's Prefect settings: the server its flows use

    def run(self) -> None:
        self.context.run(self._watch)

    def _watch(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.stop.wait(0.3):
                found = client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROGRESS_KEY])),
                    sort=ArtifactSort.CREATED_DESC,
                    limit=1,
                )
                if found and found[0].created >= self.since:
                    self.seen.append((time.time(), found[0].data, found[0].description))


def _logs(task_run, *expected: str) -> str:
    """The task run's log, once it holds every `expected` line (logs reach the API in batches)."""
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])))
            text = "\n".join(entry.message for entry in logs)
            if all(e in text for e in expected) or time.monotonic() > deadline:
                return text
            time.sleep(1)


@pytest.mark.slow
def test_gpu_tasks_overlap_scoring_starts_as_a_checkpoint_ends_and_progress_moves(prefect_api, hub, tmp_path):
    from datetime import UTC, datetime

    steps = ["step0", "step1000", "step2000", "step3000"]
    grid = _grid(tmp_path, hub, checkpoints=steps, layers=[1, 3], tasks=["DemoSTS", "DemoClassification"])
    del grid["metrics"]  # the demo's metrics: each checkpoint's GPU work measures, then embeds
    watcher = _Watcher(datetime.now(UTC))
    watcher.start()
    try:
        state, runs = _run(grid)
    finally:
        watcher.stop.set()
        watcher.join(timeout=30)
    assert state.is_completed(), state.message

    gpu = sorted((runs[f"gpu[{s}]"] for s in steps), key=lambda r: r.start_time)
    overlap = max(
        (min(a.end_time, b.end_time) - max(a.start_time, b.start_time)).total_seconds()
        for i, a in enumerate(gpu)
        for b in gpu[i + 1 :]
    )
    first = min(gpu, key=lambda r: r.end_time)
    step = first.name.removeprefix("gpu[").removesuffix("]")
    scores = sorted(
        (r for n, r in runs.items() if n.startswith(f"score[{step} ·")), key=lambda r: r.start_time
    )
    wait = (scores[0].start_time - first.end_time).total_seconds()
    print(f"\ngpu overlap {overlap:.1f} s; gpu[{step}] end -> its first score start {wait:.1f} s; last gpu start "
          f"{(gpu[-1].start_time - first.end_time).total_seconds():.1f} s after gpu[{step}] ended")  # fmt: skip
    assert overlap > 0, "no two checkpoints' gpu tasks ran at once"
    assert scores[0].start_time < gpu[-1].start_time, "scoring waited for the last checkpoint's GPU work"

    # Progress: in the UI before any GPU work ended, moving while units finish, done at the end.
    assert watcher.seen, "no progress artifact while the flow ran"
    assert watcher.seen[0][0] < first.end_time.timestamp()
    values = [percent for _, percent, _ in watcher.seen]
    # Moving: units embedded and scored change what it says (updates are at most every 2 s, so a
    # quick run may score every unit between two of them: the percent alone can jump 0 -> 100).
    assert values == sorted(values) and len({(p, d) for _, p, d in watcher.seen}) >= 3
    final = artifact(state.state_details.flow_run_id)
    assert (
        final.data == 100.0
        and final.description == "16/16 units scored, 0 failed; 8/8 (checkpoint, task) embedded"
    )

    # Task-run logs say what a long task is doing.
    said = ["loading checkpoint layertime/tiny-neox@step1000", "measuring step1000",
            "embedding DemoSTS at step1000:", "embedding DemoClassification at step1000:"]  # fmt: skip
    log = _logs(runs["gpu[step1000]"], *said)
    assert all(line in log for line in said), log
    # One score task run per (checkpoint, task), its layers scored in turn (issue 15), and one line
    # with each layer's numbers.
    assert sorted(n for n in runs if n.startswith("score[")) == sorted(
        f"score[{s} · {t} · L1,3]" for s in steps for t in ("DemoClassification", "DemoSTS")
    )
    said = ["scored DemoSTS layer 1: main score", "; DemoSTS layer 3: main score"]
    log = _logs(runs["score[step1000 · DemoSTS · L1,3]"], *said)
    assert all(line in log for line in said), log


@pytest.mark.slow
def test_plain_loads_each_checkpoint_once_for_its_metrics_and_embeddings(hub, tmp_path, monkeypatch):
    spec = load_spec(SPEC, run_root=str(tmp_path / "demo"), hf_cache=str(hub), checkpoints=["step1000", "step2000"],
                     layers=[3], tasks=["DemoSTS", "DemoClassification"])  # fmt: skip
    loads, real = [], embed.load_encoder

    def counted(spec, ckpt, *args, **kwargs):
        loads.append(ckpt.revision)
        return real(spec, ckpt, *args, **kwargs)

    monkeypatch.setattr(embed, "load_encoder", counted)
    result = run_spec(spec)
    assert sorted(loads) == ["step1000", "step2000"]
    assert (result.scored, result.skipped) == (2 * 2, 0)
    metrics = pl.read_parquet(result.tables["metrics"])
    assert set(metrics["revision"]) == {"step1000", "step2000"} and metrics["value"].is_finite().all()
    assert run_spec(spec).scored == 0 and sorted(loads) == ["step1000", "step2000"]  # nothing loaded
