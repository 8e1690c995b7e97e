"""A unit's embeddings depend only on its inputs (texts, checkpoint, settings), never on what the
process did before (issue 17.5).

`--plain` embeds and scores in one process: scoring pins BLAS and OpenMP to one thread
(bridge.prepare_scoring_process), and a CPU encoder that inherited that limit summed in another order
than one in a fresh process (up to 3.6e-7 apart, DemoClassification · L3 0.373333 vs 0.374167).
Each scenario runs in a fresh subprocess: this pytest process's own state depends on which tests ran
before, and a process that already scored would hide the difference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from layertime.encoder import MultiLayerEncoder

ROOT = Path(__file__).resolve().parents[1]
TASK, OTHER_TASK = "DemoClassification", "DemoSTS"

# argv: hub, work dir, output .npz, scenario ("alone" or "history")
SCENARIO = """
import sys
import threading
from pathlib import Path

import numpy as np

import layertime
from layertime.checkpoints import Checkpoint
from layertime.demo.model import DEMO_REPO
from layertime.encoder import MultiLayerEncoder
from layertime.phases import embed, record, score
from layertime.phases.context import Context
from layertime.plan import make_plan
from layertime.rundir import RunDir
from layertime.settings import Settings
from layertime.spec import load_spec

hub, work, out, scenario = sys.argv[1:5]
TASK, OTHER_TASK = {task!r}, {other!r}
run = RunDir.of(Path(work) / "run", Path(work) / "store")
settings = Settings("all", "mean", False, 128, "float32", 16384, "cpu", "rule-a", "test")
demo = Path(layertime.__file__).resolve().parents[1] / "deployments/demo.yaml"
spec = load_spec(demo, run_root=run.root, store=run.store, hf_cache=hub, layers=[3], metrics=None)
ctx = Context(make_plan(spec, resolve=False), run, settings)
texts = record.task_texts(TASK, run, "rule-a").texts
other = record.task_texts(OTHER_TASK, run, "rule-a").texts


def encoder(revision):
    return MultiLayerEncoder(DEMO_REPO, revision, "all", max_length=128, dtype="float32", device="cpu",
                             tokens_per_batch=4096, cache_dir=hub)


saved = {{}}
saved.update({{f"alone_{{b}}": v for b, v in encoder("step1000").encode(texts).items()}})
if scenario == "history":
    # What --plain does before step1000: embed and score step0 (scoring pins BLAS/OpenMP threads) ...
    step0 = Checkpoint(DEMO_REPO, "step0", None)
    path = embed.embed_unit(encoder("step0"), ctx, step0, TASK, texts, [3])
    score.score_unit(ctx, step0, TASK, [3], path)
    # ... and the flow's GPU task embeds the checkpoint's other tasks with the same encoder first.
    enc = encoder("step1000")
    enc.encode(other)
    saved.update({{f"after_{{b}}": v for b, v in enc.encode(texts).items()}})
    # ... and a Dask worker embeds in a thread of its own.
    worker = threading.Thread(target=lambda: saved.update(
        {{f"thread_{{b}}": v for b, v in encoder("step1000").encode(texts).items()}}))
    worker.start()
    worker.join()
np.savez(out, **saved)
"""


def _scenario(hub: Path, work: Path, scenario: str) -> dict[str, np.ndarray]:
    out = work / f"{scenario}.npz"
    script = SCENARIO.format(task=TASK, other=OTHER_TASK)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(hub), str(work), str(out), scenario],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as arrays:
        return dict(arrays)


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def test_embeddings_do_not_depend_on_what_the_process_did_before(hub, tmp_path):
    history = _scenario(hub, tmp_path / "one", "history")
    alone = {k: v for k, v in history.items() if k.startswith("alone_")}
    after = {k.replace("after_", "alone_"): v for k, v in history.items() if k.startswith("after_")}
    assert sorted(alone) == [f"alone_{b}" for b in range(4)] and sorted(after) == sorted(alone)
    # In one process: step1000 alone (fresh encoder), then after embedding and scoring step0 and
    # embedding another task of step1000 with the same encoder.
    # In a worker thread, as the flow's GPU task embeds.
    thread = {k.replace("thread_", "alone_"): v for k, v in history.items() if k.startswith("thread_")}
    for other in (after, thread):
        differing = [k for k in alone if not np.array_equal(alone[k], other[k])]
        assert not differing, f"{differing} differ by up to {_max_diff(alone, other):.3g}"
    # Across processes: a fresh process that does nothing else.
    fresh = _scenario(hub, tmp_path / "two", "alone")
    differing = [k for k in fresh if not np.array_equal(fresh[k], after[k])]
    assert not differing, f"{differing} differ by up to {_max_diff(fresh, after):.3g}"


def test_running_out_of_gpu_memory_once_changes_no_later_call(hub, demo_repo, monkeypatch):
    """A batch split after running out of GPU memory (simulated: only 4 texts fit) is split alone:
    the next call plans its batches as a fresh encoder does, so its numbers are the same bits."""
    import torch

    from layertime.demo.corpus import labelled_sentences

    def encoder() -> MultiLayerEncoder:
        return MultiLayerEncoder(demo_repo, "step1000", max_length=128, dtype="float32", device="cpu",
                                 tokens_per_batch=4096, cache_dir=str(hub))  # fmt: skip

    texts = [text for text, _ in labelled_sentences(60, seed=7)]
    enc = encoder()
    forward = enc.model.forward

    def four_texts_fit(*args, input_ids, **kwargs):
        if input_ids.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(enc.model, "forward", four_texts_fit)
    enc.encode(texts[30:])
    assert enc.oom_splits > 0
    monkeypatch.setattr(enc.model, "forward", forward)
    other = encoder()
    got, fresh = enc.encode(texts[:30]), other.encode(texts[:30])
    for b in fresh:
        assert np.array_equal(got[b], fresh[b]), f"layer {b}: up to {np.abs(got[b] - fresh[b]).max():.3g}"
    assert enc.last_stats == other.last_stats  # the same batch plan, no split


@pytest.mark.slow
def test_plain_scores_of_a_checkpoint_are_the_same_alone_and_after_another(hub, tmp_path):
    """`layertime run --plain` over step0 and step1000 against step1000 alone: the same embeddings and
    the same scores (they once differed by 8e-4 on DemoClassification · L3)."""

    def run(name: str, checkpoints: list[str]) -> Path:
        spec = yaml.safe_load((ROOT / "deployments/demo.yaml").read_text())
        spec.update(name=name, checkpoints=checkpoints, layers=[1, 3], tasks=[TASK], metrics=None,
                    run_root=str(tmp_path / name), store=str(tmp_path / f"{name}-store"), hf_cache=str(hub),
                    keep_embeddings=True)  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, "-m", "flows.commands", "run", "--plain", str(path)],
            capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return tmp_path / name

    both, alone = run("both", ["step0", "step1000"]), run("alone", ["step1000"])
    for layer in (1, 3):
        assert np.array_equal(_embeddings(both, "step1000", layer), _embeddings(alone, "step1000", layer))
    key = ["revision", "layer", "task", "subset", "split"]

    def scores(root: Path) -> pl.DataFrame:
        table = pl.read_parquet(root / "tables/scores.parquet")
        return table.filter(pl.col("revision") == "step1000").select(*key, "main_score").sort(key)

    assert scores(both).height == 2
    assert scores(both).equals(scores(alone)), (scores(both), scores(alone))


def _embeddings(root: Path, revision: str, layer: int) -> np.ndarray:
    """A kept embedding of the run at `root`, found through the library's own paths."""
    from layertime.checkpoints import Checkpoint
    from layertime.rundir import RunDir
    from layertime.settings import Settings
    from layertime.spec import load_spec

    spec = load_spec(root / "spec.yaml")
    commit = json.loads((root / "environment.json").read_text())["checkpoints"][revision]
    run = RunDir.of(spec.run_root, spec.store)
    path = run.embeddings(Settings.of(spec, "cpu").id, Checkpoint(spec.model, revision, commit), TASK)
    return np.load(path / f"layer_{layer}.npy")
