"""The demo spec end to end in this process: plan, record, embed, score, merge, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from layertime.checkpoints import CheckpointError
from layertime.phases.plain import run_spec
from layertime.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _scores(path: Path) -> pl.DataFrame:
    """The scores table without its measured costs (a rescored unit takes other seconds and memory)."""
    return pl.read_parquet(path).drop("seconds", "peak_memory_gb")


@pytest.fixture(scope="module")
def spec(hub, tmp_path_factory):
    # The demo's shape on a smaller grid: main and step3000 share a commit.
    return load_spec(
        ROOT / "deployments/demo.yaml",
        run_root=str(tmp_path_factory.mktemp("run") / "demo"),
        hf_cache=str(hub),
        checkpoints=["step1000", "step3000", "main"],
        layers=[1, 3],
    )


@pytest.fixture(scope="module")
def first(spec):
    return run_spec(spec)


def test_a_run_writes_every_table(spec, first):
    scores = pl.read_parquet(first.tables["scores"])
    assert scores.height == 3 * 2 * 5  # revisions x layers x tasks (one subset each)
    assert scores["main_score"].is_finite().all()
    assert set(scores["hidden_state"] - scores["layer"]) == {1}
    layers = pl.read_parquet(first.tables["layers"])
    assert layers.height == 3 * 2 and (layers["n_tasks"] == 5).all() and layers["average"].is_not_null().all()
    metrics = pl.read_parquet(first.tables["metrics"])
    per_layer = metrics.group_by("revision", "layer").len()
    assert per_layer.height == 3 * 2 and per_layer["len"].n_unique() == 1  # every metric for every arm
    assert set(metrics["metric"]) == {"prompt_entropy", "curvature", "dataset_entropy", "effective_rank",
                                      "infonce", "dime", "lidar"}  # fmt: skip
    assert metrics["value"].is_finite().all()
    assert {"effective_rank", "lidar", "prompt_entropy_max_entropy"} <= set(layers.columns)
    summary = pl.read_csv(first.tables["summary"])
    assert summary.columns == [
        "model_family",
        "model_size",
        "revision",
        "layer",
        "task",
        "score",
        "output_dir",
    ]
    env = json.loads((Path(spec.run_root) / "environment.json").read_text())
    assert env["checkpoints"]["main"] == env["checkpoints"]["step3000"]
    assert (Path(spec.run_root) / "spec.yaml").is_file()


def test_revisions_sharing_a_commit_are_scored_once(spec, first):
    assert first.scored == 2 * 2 * 5  # distinct commits x layers x tasks
    scores = pl.read_parquet(first.tables["scores"])
    main = scores.filter(pl.col("revision") == "main").sort("task", "layer")["main_score"]
    last = scores.filter(pl.col("revision") == "step3000").sort("task", "layer")["main_score"]
    assert main.to_list() == last.to_list()
    metrics = pl.read_parquet(first.tables["metrics"])
    m_main = metrics.filter(pl.col("revision") == "main").sort("layer", "metric", "normalization")["value"]
    m_last = metrics.filter(pl.col("revision") == "step3000").sort("layer", "metric", "normalization")[
        "value"
    ]
    assert m_main.to_list() == m_last.to_list()
    assert (
        len(list((Path(spec.run_root).parent / "store" / "metrics").rglob("*.json"))) == 2 * 2
    )  # one per commit and layer
    assert not list(
        (Path(spec.run_root).parent / "store" / "embeddings").rglob("*.npy")
    )  # deleted after scoring


def test_a_rerun_recomputes_only_what_is_missing(spec, first):
    again = run_spec(spec)
    assert (again.scored, again.skipped) == (0, 20)
    assert pl.read_parquet(again.tables["scores"]).equals(pl.read_parquet(first.tables["scores"]))
    records = sorted((Path(spec.run_root).parent / "store" / "scores").rglob("layer_3.json"))
    lost = [r for r in records if r.parent.name == "DemoSTS"][0]
    lost.unlink()
    healed = run_spec(spec)
    assert (healed.scored, healed.skipped) == (1, 19)
    assert _scores(healed.tables["scores"]).equals(_scores(first.tables["scores"]))


def test_cli_run_prints_where_the_tables_are(spec, first, hub):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    spec_file = Path(spec.run_root) / "spec.yaml"  # the snapshot is itself a runnable spec
    out = subprocess.run([sys.executable, "-m", "flows.commands", "run", "--plain", str(spec_file)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scored 0 (checkpoint, task, layer) units, 20 already done" in out.stdout
    assert str(first.tables["layers"]) in out.stdout


def test_a_missing_checkpoint_fails_fast_naming_it(hub, tmp_path):
    spec = load_spec(ROOT / "deployments/demo.yaml", run_root=str(tmp_path), hf_cache=str(hub),
                     checkpoints=["step1000", "step9000"])  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"layertime/tiny-neox@step9000 is not in the HF cache.*prefetch"
    ):
        run_spec(spec)


def test_sibling_experiments_share_their_overlap(hub, tmp_path):
    # Like exp1 (main, many layers) and exp2 (steps incl. step143000, last layers) side by side.
    common = {"hf_cache": str(hub), "tasks": ["DemoSTS", "DemoClassification"]}
    first = load_spec(ROOT / "deployments/demo.yaml", run_root=str(tmp_path / "a"), checkpoints=["main"],
                      layers=[2, 3], **common)  # fmt: skip
    second = load_spec(ROOT / "deployments/demo.yaml", run_root=str(tmp_path / "b"),
                       checkpoints=["step2000", "step3000"], layers=[3], **common)  # fmt: skip
    assert run_spec(first).scored == 2 * 2
    result = run_spec(second)
    assert (result.scored, result.skipped) == (2, 2)  # step3000 = main, layer 3: already in the store
    a = pl.read_parquet(tmp_path / "a/tables/scores.parquet").filter(pl.col("layer") == 3).sort("task")
    b = (
        pl.read_parquet(tmp_path / "b/tables/scores.parquet")
        .filter(pl.col("revision") == "step3000")
        .sort("task")
    )
    assert a["main_score"].to_list() == b["main_score"].to_list()


def test_gpu_phases_are_timed_in_the_costs_table(spec, first):
    costs = pl.read_parquet(first.tables["costs"])
    embeds = costs.filter(pl.col("phase") == "embed")
    assert embeds.height == 2 * 5  # one per (commit, task): main = step3000 counted once
    assert (embeds["seconds"] > 0).all() and (embeds["padded_tokens"] >= embeds["real_tokens"]).all()
    assert (costs["peak_memory_gb"] > 0.1).all() and costs["peak_gpu_memory_gb"].is_null().all()  # CPU
    assert costs.filter(pl.col("phase") == "measure").height == 2


def test_a_second_run_on_the_same_run_root_is_refused(spec):
    from layertime.rundir import RunDir, RunInUse

    with RunDir.of(spec.run_root).lock():  # another run holds it
        with pytest.raises(RunInUse, match=r"run root .* is in use by pid \d+"):
            run_spec(spec)
    assert run_spec(spec).scored == 0  # released: the next run goes ahead


def test_damaged_records_and_embeddings_are_recomputed_never_merged(hub, tmp_path):
    spec = load_spec(ROOT / "deployments/demo.yaml", run_root=str(tmp_path / "demo"), hf_cache=str(hub),
                     checkpoints=["step1000"], layers=[2, 3], tasks=["DemoSTS"], keep_embeddings=True,
                     metrics=None)  # fmt: skip
    first = run_spec(spec)
    store = tmp_path / "store"
    record = next(store.rglob("scores/**/layer_3.json"))
    record.write_text(record.read_text()[:40])  # a half-written record left by a crash
    weights = next(store.rglob("embeddings/**/layer_3.npy"))
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated embedding file
    again = run_spec(spec)
    assert (again.scored, again.skipped) == (1, 1)
    assert _scores(again.tables["scores"]).equals(_scores(first.tables["scores"]))
    assert weights.stat().st_size > 100  # re-embedded, not scored from the damaged file


def test_records_carry_the_spec_hash_versions_and_measured_cost(spec, first):
    import mteb

    from layertime import CODE_VERSION

    record = json.loads(
        next((Path(spec.run_root).parent / "store" / "scores").rglob("layer_1.json")).read_text()
    )
    stamp = record["provenance"]
    assert stamp["spec"] == spec.digest and stamp["code_version"] == CODE_VERSION
    assert stamp["mteb"] == mteb.__version__ and stamp["pid"] == os.getpid()
    assert record["settings"]["code_version"] == CODE_VERSION
    scores = pl.read_parquet(first.tables["scores"])
    # Peak resident memory of the scoring process: at least the interpreter with torch and mteb loaded.
    assert (scores["peak_memory_gb"] > 0.1).all() and (scores["peak_memory_gb"] < 24).all()


def test_a_run_root_another_code_version_wrote_is_refused_unless_forced(hub, tmp_path, monkeypatch):
    from layertime import runroot, settings

    spec = load_spec(ROOT / "deployments/demo.yaml", run_root=str(tmp_path / "demo"), hf_cache=str(hub),
                     checkpoints=["step1000"], layers=[3], tasks=["DemoSTS", "DemoClustering"],
                     metrics=None)  # fmt: skip
    first = run_spec(spec)
    stamp = (tmp_path / "demo" / runroot.RUN_STAMP).read_text()
    for module in (runroot, settings):  # a release whose numbers differ
        monkeypatch.setattr(module, "CODE_VERSION", "999")
    with pytest.raises(
        runroot.IncompatibleRun,
        match=r"holds results of code_version \d+; this is code_version 999.*--force",
    ):
        run_spec(spec)
    assert (tmp_path / "demo" / runroot.RUN_STAMP).read_text() == stamp  # refused: nothing written

    forced = run_spec(spec, force=True)
    assert (forced.scored, forced.skipped) == (2, 0)  # the old version's records are not this one's
    assert json.loads((tmp_path / "demo" / runroot.RUN_STAMP).read_text())["code_version"] == "999"
    scores = pl.read_parquet(forced.tables["scores"])
    assert scores.height == pl.read_parquet(first.tables["scores"]).height == 2  # one version's rows only
    assert (tmp_path / "store" / "scores").is_dir() and len(
        list((tmp_path / "store" / "scores").iterdir())
    ) == 2
