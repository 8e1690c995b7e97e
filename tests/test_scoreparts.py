"""A layer scored in parts (layertime/scoreparts.py) records exactly what one evaluation records: its
queries split over processes, each part a file in the store, merged into the one completion record,
resumable part by part (docs/design.md §10)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from test_fastmteb import META, every_score, mind_task, mini_mind  # noqa: E402

from layertime import bridge, partload, records, reranking, scoreparts, splitscore, suite
from layertime.checkpoints import Checkpoint
from layertime.phases import embed, score
from layertime.phases import record as recording
from layertime.phases.context import Context
from layertime.plan import make_plan
from layertime.rundir import RunDir
from layertime.settings import Settings
from layertime.spec import load_spec

DEMO = Path(__file__).resolve().parents[1] / "deployments/demo.yaml"


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_mindsmall_parts_merge_to_the_scores_of_one_evaluation(parts, tmp_path):
    """Sub-queries grouped by query (max_over_subqueries) in parts of very different sizes, through
    part files: the merged TaskResult's scores are mteb's, key by key and in its key order."""
    data, texts, vectors = mini_mind(np.random.default_rng(parts))
    plain = bridge._evaluate(bridge.LookupEncoder(texts, vectors, META), mind_task(data), None, fast=False)
    data, texts, vectors = mini_mind(np.random.default_rng(parts))
    task = mind_task(data)
    record = tmp_path / "layer_0.json"
    sizes = []
    for p in range(parts):
        path = scoreparts.part_file(record, p, parts)
        scoreparts.compute_part(task, bridge.LookupEncoder(texts, vectors, META), p, parts, path)
        sizes.append(len(scoreparts.read_part(path)[0]["test", "default"][0].position))
    assert all(sizes) and len(set(sizes)) > 1  # every part has queries, in unequal numbers
    merged, _ = scoreparts.merged_result(mind_task({}), record, parts)
    assert every_score(merged) == every_score(plain)
    assert merged.main_score == plain.main_score


def _local_dataset(root: Path, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """A MindSmall-shaped dataset in mteb's retrieval format on disk (corpus, queries, qrels, top_ranked
    configs), as its local snapshot is: loaded by mteb's own loader."""
    docs = [f"N{j}" for j in range(30)]
    qids, qtexts, qrel_rows, ranked = [], [], [], []
    for base in range(25):
        candidates = [docs[j] for j in rng.choice(len(docs), size=int(rng.integers(2, 12)), replace=False)]
        for sub in range(int(rng.integers(1, 4))):
            qid = f"U{base}_{sub}"
            qids.append(qid)
            qtexts.append(f"history title {(base * 3 + sub) % 20}")
            ranked.append(candidates)
            qrel_rows += [(qid, d, int(i == 0 or rng.random() < 0.2)) for i, d in enumerate(candidates)]
    configs = {
        "corpus": {"_id": docs, "text": [f"news {j}" for j in range(len(docs))], "title": [""] * len(docs)},
        "queries": {"_id": qids, "text": qtexts},
        "default": {
            "query-id": [r[0] for r in qrel_rows],
            "corpus-id": [r[1] for r in qrel_rows],
            "score": [r[2] for r in qrel_rows],
        },  # fmt: skip
        "top_ranked": {"query-id": qids, "corpus-ids": ranked},
    }
    lines = ["---", "configs:"]
    for name, columns in configs.items():
        (root / name).mkdir(parents=True)
        Dataset.from_dict(columns).to_parquet(root / name / "test.parquet")
        lines += [
            f"- config_name: {name}",
            "  data_files:",
            "  - split: test",
            f"    path: {name}/test.parquet",
        ]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    texts = sorted(set(qtexts)) + [f"news {j}" for j in range(len(docs))]
    return texts, rng.standard_normal((len(texts), 16)).astype(np.float32)


def _local_task(root: Path):
    task = suite.build_task("MindSmallReranking")
    task.metadata = task.metadata.model_copy(update={"dataset": {**task.metadata.dataset, "path": str(root)}})
    return task


def test_a_part_loads_only_its_queries_and_the_parts_score_as_the_whole(tmp_path):
    """mteb's loader for a part keeps only that part's queries (qrels, candidates, queries), with their
    places in the queries dataset; parts loaded so, scored and merged, give mteb's scores of the
    whole task (its qrels put in the queries' order, as layertime loads them)."""
    root = tmp_path / "MindSmallReranking"
    texts, vectors = _local_dataset(root, np.random.default_rng(0))
    whole = _local_task(root)
    whole.load_data()
    full = whole.dataset["default"]["test"]
    ids = list(full["queries"]["id"])
    full["relevant_docs"] = {q: full["relevant_docs"][q] for q in ids}  # the queries' order
    plain = bridge._evaluate(bridge.LookupEncoder(texts, vectors, META), whole, None, fast=False)
    parts, record, seen = 3, tmp_path / "layer_0.json", []
    for p in range(parts):
        with partload.loading_part((p, parts), grouped=True):
            task = _local_task(root)
            task.load_data()
        split = task.dataset["default"]["test"]
        mine = list(split["queries"]["id"])
        assert all(partload.part_of(q, parts, True) == p for q in mine)
        assert set(split["top_ranked"]) == set(split["relevant_docs"]) == set(mine)
        assert split["layertime_position"] == {q: ids.index(q) for q in mine}
        assert all(split["top_ranked"][q] == full["top_ranked"][q] for q in mine)
        assert all(split["relevant_docs"][q] == full["relevant_docs"][q] for q in mine)
        seen += mine
        path = scoreparts.part_file(record, p, parts)
        scoreparts.compute_part(task, bridge.LookupEncoder(texts, vectors, META), p, parts, path)
    assert sorted(seen) == sorted(ids)
    merged, _ = scoreparts.merged_result(_local_task(root), record, parts)
    assert every_score(merged) == every_score(plain)


# ---------------------------------------------------------------------------------------------- store


class _Fixed:
    """An encoder of fixed random vectors (the same for every run): embed_unit writes them as the GPU
    step does (files, digests, manifest last)."""

    device, last_stats = "cpu", None

    def encode(self, texts: list[str]) -> dict[int, np.ndarray]:
        return {0: np.random.default_rng(7).standard_normal((len(texts), 16)).astype(np.float32)}


def _unit(tmp_path: Path, name: str, task: str) -> tuple[Context, Checkpoint, Path]:
    """A run with DemoReranking's layer 0 of one checkpoint embedded in its store."""
    run = RunDir.of(tmp_path / name / "root", tmp_path / name / "store")
    spec = load_spec(DEMO, run_root=run.root, store=run.store, tasks=[task], layers=[0], metrics=None)
    plan = dataclasses.replace(make_plan(spec, resolve=False), num_blocks=4)
    ctx = Context(plan, run, Settings("none", "mean", False, 64, "float32", 4096, "cpu", "rule-a", "t"))
    ckpt = Checkpoint("layertime/tiny-neox", "step1", "a" * 40)
    texts = recording.task_texts(task, run, "rule-a").texts
    return ctx, ckpt, embed.embed_unit(_Fixed(), ctx, ckpt, task, texts, [0])


def test_a_split_layer_in_the_store_records_what_one_evaluation_records(tmp_path, monkeypatch):
    """Parts are files beside the record until the merge writes the record (last) and removes them; a
    part whose file is whole and of the same embeddings is not computed again; a merge missing a part
    names it; the rows equal those of the layer scored whole, the mteb export's scores too."""
    task = "DemoReranking"
    whole, ckpt, emb = _unit(tmp_path, "whole", task)
    want = score.score_unit(whole, ckpt, task, [0], emb)[0]

    ctx, ckpt, emb = _unit(tmp_path, "split", task)
    record = ctx.run.score_record(ctx.settings.id, ckpt, task, 0)
    computed = []
    real = bridge.score_part
    monkeypatch.setattr(bridge, "score_part", lambda *a, **k: computed.append(a[3]) or real(*a, **k))

    def step(part):
        return splitscore.score_layer(ctx, ckpt, task, 0, emb, part, 3)

    assert step(0) is None and step(1) is None and computed == [(0, 3), (1, 3)]
    assert step(0) is None and computed == [(0, 3), (1, 3)]  # kept, not computed again
    with pytest.raises(scoreparts.MissingParts, match="3/3"):
        step(scoreparts.MERGE)
    assert not record.exists()
    scoreparts.part_file(record, 1, 3).write_bytes(b"damaged")
    assert step(1) is None and step(2) is None and computed[2:] == [(1, 3), (2, 3)]
    rows = step(scoreparts.MERGE)
    assert record.exists() and not scoreparts.parts_dir(record).exists()
    strip = ("seconds", "peak_memory_gb")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == [
        {k: v for k, v in r.items() if k not in strip} for r in want
    ]
    assert step(0) == rows and computed[4:] == []  # recorded: nothing runs
    exported = [
        json.loads(p.read_text())["scores"]
        for r in (whole.run, ctx.run)
        for p in r.mteb_results.rglob(f"{task}.json")
    ]
    assert len(exported) == 2 and same(exported[0], exported[1])


def test_a_reranking_tasks_recording_needs_no_evaluation_and_no_candidate_lists(tmp_path):
    """The texts a recording pass gives (`reranking.recorded_texts`: loaded without candidate lists,
    not evaluated) are those mteb's evaluation asks for, in the same order, counted the same."""
    root = tmp_path / "MindSmallReranking"
    _local_dataset(root, np.random.default_rng(1))
    for fresh in (lambda: _local_task(root), lambda: mind_task(mini_mind(np.random.default_rng(4))[0])):
        recorder = bridge.RecordingEncoder()
        bridge._evaluate(recorder, fresh(), None, fast=False)
        assert reranking.recorded_texts(fresh()) == (list(recorder.seen), recorder.requested)
    assert reranking.recorded_texts(suite.build_task("STS12")) is None  # not a reranking task: evaluated


def test_a_part_of_other_embeddings_is_computed_again_and_parts_of_two_never_merge(tmp_path, monkeypatch):
    """A part file names the embedding file it was scored from (the record's digest): one from other
    embeddings (the layer embedded again since) is not kept, and a merge finding parts of two removes
    them and names the layer, so a record never mixes two embeddings."""
    task = "DemoReranking"
    ctx, ckpt, emb = _unit(tmp_path, "split", task)
    record = ctx.run.score_record(ctx.settings.id, ckpt, task, 0)
    computed = []
    real = bridge.score_part
    monkeypatch.setattr(bridge, "score_part", lambda *a, **k: computed.append(a[3]) or real(*a, **k))
    for part in (0, 1):
        assert splitscore.score_layer(ctx, ckpt, task, 0, emb, part, 2) is None
    path = scoreparts.part_file(record, 0, 2)
    values, meta = scoreparts.read_part(path)
    assert meta["source"] == records.load_layer(emb, _ask(ctx, ckpt, task), 0)[1]
    other = "0" * 64
    scoreparts.write_part(path, values, meta["seconds"], meta["peak_memory_gb"], meta["dim"], other)
    assert splitscore.score_layer(ctx, ckpt, task, 0, emb, 0, 2) is None and computed == [
        (0, 2),
        (1, 2),
        (0, 2),
    ]
    scoreparts.write_part(path, values, meta["seconds"], meta["peak_memory_gb"], meta["dim"], other)
    with pytest.raises(scoreparts.MissingParts, match="different embeddings"):
        splitscore.score_layer(ctx, ckpt, task, 0, emb, scoreparts.MERGE, 2)
    assert not scoreparts.parts_dir(record).exists() and not record.exists()


def _ask(ctx: Context, ckpt: Checkpoint, task: str) -> records.EmbeddingsAsk:
    texts = recording.task_texts(task, ctx.run, "rule-a").texts
    return records.EmbeddingsAsk.of(ckpt.model, ckpt.commit, task, texts)
