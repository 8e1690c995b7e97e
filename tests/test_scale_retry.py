"""`prefect flow-run retry` of a scale run after 5 injected failures recomputes only those 5 units
(issue 15's target), through a real Prefect server on PostgreSQL, a process work pool and a worker.

The scale world at 2 checkpoints × 4 layers × 32 tasks (256 evaluations, 64 score task runs: one per
(checkpoint, task), its 4 layers each an evaluation with its own completion record). Five (checkpoint,
task, layer) units, in 5 different (checkpoint, task) pairs, fail to score on the first run: the
worker's Python loads a `sitecustomize` that makes `phases.score.score_unit` raise for the units listed in
a file (the flow process and its scoring processes alike). The flow must name each failed layer. The
file is then removed and the failed flow run retried with the CLI, as a user would. The retried
attempt's task runs (the API's `flow_run_run_count`) must be 5 score task runs, one per (checkpoint,
task) with a failed layer, each scoring that layer alone, and no GPU work (their embeddings were kept
for the re-run); every other completion record, its first batch-mates' included, must be untouched,
and the tables hold each unit once.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import orchestration as orch  # noqa: E402 -- benchmarks/ is not a package

from layertime.plan import make_plan  # noqa: E402
from layertime.spec import load_spec  # noqa: E402

pytestmark = pytest.mark.slow
CHECKPOINTS = 2

# Loaded by every Python the worker starts (PYTHONPATH): the listed units fail to score, while the
# file exists. functools.wraps keeps the name, so the scoring processes unpickle this wrapper too.
# Every completion record written is appended to another file: a unit scored twice shows there.
_FAIL_LISTED_UNITS = """
import functools, os
from pathlib import Path
from layertime import records
from layertime.phases import score

real_write = records.atomic_write_text

def atomic_write_text(path, text):
    written = real_write(path, text)
    if "scores" in Path(path).parts and Path(path).name.startswith("layer_"):
        with open(os.environ["LAYERTIME_TEST_SCORE_WRITES"], "a") as log:
            log.write(f"{path}\\n")
    return written

records.atomic_write_text = atomic_write_text
real = score.score_unit

@functools.wraps(real)
def score_unit(ctx, ckpt, task, blocks, *args):
    listed = Path(os.environ["LAYERTIME_TEST_FAIL_UNITS"])
    if listed.exists() and any(f"{ckpt.revision}|{task}|{b}" in listed.read_text().split() for b in blocks):
        raise ValueError(f"injected failure of {ckpt.revision} {task} {blocks}")
    return real(ctx, ckpt, task, blocks, *args)

score.score_unit = score_unit
"""


def _records(store: Path) -> dict[Path, tuple[int, bytes]]:
    """Every score completion record: its mtime (ns) and content."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (store / "scores").rglob("layer_*.json")}


def _attempts(server: orch.Server, flow_run: str) -> dict[int, list[str]]:
    """Task-run names of `flow_run` by the flow run's attempt that made them (flow_run_run_count)."""
    runs = orch.read_all(
        server.api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}, "sort": "ID_DESC"}
    )
    by_attempt: dict[int, list[str]] = {}
    for r in runs:
        by_attempt.setdefault(r["flow_run_run_count"], []).append(r["name"])
    return by_attempt


def test_a_flow_run_retry_after_5_failures_recomputes_only_those_5_units(postgres_url, tmp_path):
    from layertime.demo.scale_model import ensure_scale_model

    ensure_scale_model(ROOT / ".cache" / "scale-hub")
    overrides = orch.scale_overrides(CHECKPOINTS, tmp_path)
    plan = make_plan(load_spec(orch.SPEC, **overrides))
    revisions = [c.revision for c in plan.distinct_checkpoints()]
    a, b, c = plan.tasks[0], plan.tasks[7], plan.tasks[20]
    # 5 failed layers in 5 different (checkpoint, task) pairs: 5 score task runs, each with 3 layers
    # that score and one that fails.
    failing = [(revisions[0], a, 0), (revisions[0], b, 3), (revisions[1], a, 2), (revisions[1], c, 1),
               (revisions[0], c, 3)]  # fmt: skip
    assert len({(r, t) for r, t, _ in failing}) == 5 and plan.blocks == [0, 1, 2, 3]
    listed = tmp_path / "fail-units.txt"
    listed.write_text("\n".join(f"{r}|{t}|{layer}" for r, t, layer in failing))
    writes = tmp_path / "score-records-written.txt"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAIL_LISTED_UNITS)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "LAYERTIME_TEST_FAIL_UNITS": str(listed), "LAYERTIME_TEST_SCORE_WRITES": str(writes)}  # fmt: skip

    database = orch.fresh_postgres_database(postgres_url, f"layertime_test_retry_{os.getpid()}")
    server = orch.start_server(tmp_path / "prefect-home", orch.free_port(), database)
    worker = None
    try:
        orch.deploy(server)
        worker = orch.start_worker(server, tmp_path / "worker.log", env)
        flow_run = orch.run_deployment(server, overrides, {"scoring_processes": 2})
        first = orch.watch(server, flow_run, worker, timeout=1500, every=10)
        assert first.state == "FAILED", (first.state, first.message)
        # Each failed layer is named on a line of its own, with its own error.
        assert "5 unit(s) failed" in first.message, first.message
        for r, t, layer in failing:
            line = f"score[{r} · {t} · L{layer}]: ValueError: injected failure of {r} {t} [{layer}]"
            assert line in first.message.splitlines(), first.message
        before = _records(Path(overrides["store"]))
        assert len(before) == plan.evaluations - 5

        listed.unlink()  # the cause is fixed; the user retries the failed run from the CLI
        orch.prefect(server.env, "flow-run", "retry", flow_run)
        again = orch.watch(server, flow_run, worker, timeout=1500, every=10)
        attempts = _attempts(server, flow_run)
    finally:
        if worker is not None:
            orch.stop(worker)
        orch.stop(server.proc)

    assert again.state == "COMPLETED", (
        again.state,
        again.message,
        (tmp_path / "worker.log").read_text()[-3000:],
    )
    assert sorted(attempts) == [1, 2]
    first_scores = [n for n in attempts[1] if n.startswith("score[")]
    # One score task run per (checkpoint, task), its 4 layers at once, each once in the first attempt.
    assert sorted(first_scores) == sorted(f"score[{r} · {t} · L0-3]" for r in revisions for t in plan.tasks)
    assert len(first_scores) == CHECKPOINTS * 32 == plan.evaluations // 4
    retried = sorted(n for n in attempts[2] if not n.startswith("record["))
    # The retried attempt plans from the records: one score task run per (checkpoint, task) with a
    # failed layer, holding that layer alone (its 3 batch-mates are recorded; the records below).
    expected = sorted(f"score[{r} · {t} · L{layer}]" for r, t, layer in failing)
    # Exactly the 5 failed units are scored again; no model is loaded again (their embeddings were kept).
    assert retried == sorted([*expected, f"merge[{plan.spec.name}]"]), retried
    assert sorted(n for n in attempts[2] if n.startswith("record[")) == sorted(
        f"record[{t}]" for t in plan.tasks
    )

    after = _records(Path(overrides["store"]))
    assert {p: after[p] for p in before} == before  # every other unit's record untouched, batch-mates too
    commits = {c.revision: c.commit for c in plan.distinct_checkpoints()}
    new = sorted((p.parts[-3], p.parent.name, int(p.stem.split("_")[1])) for p in set(after) - set(before))
    assert new == sorted((commits[r], t, layer) for r, t, layer in failing)
    # Each completion record written once over both attempts: the task's own retries in the first
    # attempt read the batch-mates back from their records and scored only the failed layer again.
    written = sorted(Path(w).parts[-4:] for w in writes.read_text().splitlines())  # (.., commit, task, layer)
    assert written == sorted(p.parts[-4:] for p in after), [w for w in written if written.count(w) > 1][:10]
    tables = orch.table_check(Path(overrides["run_root"]), plan)
    assert tables["distinct units"] == tables["score rows"] == plan.evaluations and tables["units twice"] == 0
