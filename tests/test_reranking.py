"""layertime.reranking: mteb's reranking scores on arrays, equal to mteb's and pytrec_eval's bit for bit
(docs/design.md §10). Every comparison is `==` on floats (json of the values, so NaN equals NaN)."""

import heapq
import json

import numpy as np
import pytest
from datasets import Dataset
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

from layertime import bridge, fastmteb, reranking, suite

K_VALUES = (1, 3, 5, 10, 20, 100, 1000)  # mteb's retrieval cutoffs
META = bridge.model_meta("layertime/tiny-neox", "c" * 40, 16, {"layer": 0})


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def random_run(rng: np.random.Generator, queries: int = 400):
    """Results and qrels shaped to reach every branch of trec_eval's measures: lists of 1 to 1,200
    results (past every cutoff), tied scores, ids ordered differently as strings and numbers ("d10" <
    "d9"), graded qrels, judged documents never retrieved, unjudged retrieved ones, queries without a
    relevant document."""
    results, qrels = {}, {}
    for q in range(queries):
        n = int(rng.choice([1, 2, 3, 7, 41, 150])) if q % 50 else int(rng.integers(1001, 1200))
        ids = [f"d{j}" for j in rng.choice(5000, size=n, replace=False)]
        scores = rng.standard_normal(n)
        if q % 3 == 0:
            scores = np.round(scores, 1)  # ties
        results[f"q{q}"] = dict(zip(ids, scores.astype(np.float32).tolist(), strict=True))
        judged = {d: int(rng.choice([0, 0, 1, 2, 3])) for d in ids if rng.random() < 0.4}
        judged.update({f"x{j}": int(rng.integers(0, 3)) for j in range(int(rng.integers(0, 3)))})
        if q % 7 == 0:
            judged = {d: 0 for d in judged} or {"x": 0}  # nothing relevant
        qrels[f"q{q}"] = judged or {ids[0]: 1}
    return results, qrels


def arrays_of(results, qrels) -> reranking.QueryValues:
    single = {i: reranking._dict_row(found, qrels[qid], {}) for i, (qid, found) in enumerate(results.items())}
    rows = reranking.Rows(len(results), reranking._stacked(single))
    num_rel = np.array([reranking.relevant_count(list(qrels[q].values())) for q in results])
    idcg = reranking.ideal_dcg([reranking.ideal_gains(list(qrels[q].values())) for q in results], K_VALUES)
    return reranking.query_values(rows, num_rel, idcg, np.arange(len(results)), K_VALUES)


@pytest.mark.parametrize("seed", [0, 1])
def test_trec_eval_measures_equal_pytrec_eval_per_query_and_on_average(seed):
    results, qrels = random_run(np.random.default_rng(seed))
    theirs = fastmteb._MTEB_CALCULATE_RETRIEVAL_SCORES(results, qrels, list(K_VALUES))  # pytrec_eval
    ours = arrays_of(results, qrels)
    for i, qid in enumerate(results):
        per_query = theirs.all_scores[qid]
        for j, k in enumerate(K_VALUES):
            assert ours.ndcg[i, j] == per_query[f"ndcg_cut_{k}"], (qid, k)
            assert ours.map[i, j] == per_query[f"map_cut_{k}"], (qid, k)
            assert ours.rel_ret[i, j] / k == per_query[f"P_{k}"]
            assert (ours.rel_ret[i, j] > 0) == (per_query[f"success_{k}"] == 1.0)
    scores = reranking.retrieval_scores(ours, K_VALUES)
    expected = theirs._asdict()
    for name, key in [("ndcg", "ndcg"), ("_map", "map"), ("recall", "recall"), ("precision", "precision"),
                      ("naucs", "naucs"), ("mrr", "mrr"), ("naucs_mrr", "naucs_mrr"), ("hit_rate", "hit_rate")]:  # fmt: skip
        assert same(scores[name], expected[key]), name
        assert list(scores[name]) == list(expected[key]), name  # key order: mteb writes them in it


def test_heap_order_is_where_heappush_puts_a_decreasing_sequence():
    rng = np.random.default_rng(0)
    for n in [*range(1, 70), 295, 1000]:
        values = np.sort(rng.standard_normal(n))[::-1].tolist()  # strictly decreasing (a.s.)
        heap: list[float] = []
        for v in values:
            heapq.heappush(heap, v)
        assert heap == [values[i] for i in reranking.heap_order(n)]


def _split(rng: np.random.Generator, shape: str) -> tuple[dict, list[str], np.ndarray]:
    """A reranking split in mteb's format with the cases the arrays path must match mteb on."""
    n_docs = 60
    doc_ids = [f"doc-{j}" for j in range(n_docs)]
    ids, texts, qrels, top_ranked = [], [], {}, {}
    for q in range(40):
        qid = f"q{q}"
        k = int(rng.integers(1, 25))
        candidates = [doc_ids[j] for j in rng.choice(n_docs, size=k, replace=False)]
        if shape == "repeats" and q % 5 == 0 and k > 1:
            candidates[1] = candidates[0]  # a repeated candidate id
        ids.append(qid)
        texts.append(f"query text {q % 30}")
        top_ranked[qid] = candidates
        qrels[qid] = {d: int(rng.choice([0, 1, 2])) for d in candidates if rng.random() < 0.5}
        qrels[qid][doc_ids[int(rng.integers(n_docs))]] = 1  # judged, maybe not a candidate
        if q % 9 == 0:
            qrels[qid] = {}  # filtered out by mteb (no qrels)
    doc_texts = [f"document {j}" for j in range(n_docs)]
    split = RetrievalSplitData(
        corpus=Dataset.from_dict(
            {"id": doc_ids, "text": doc_texts, "title": [f"t{j % 3}" for j in range(n_docs)]}
        ),
        queries=Dataset.from_dict({"id": ids, "text": texts}),
        relevant_docs=qrels,
        top_ranked=top_ranked,
    )
    all_texts = sorted(set(texts)) + [f"t{j % 3} document {j}" for j in range(n_docs)]
    vectors = rng.standard_normal((len(all_texts), 16)).astype(np.float32)
    vectors[len(set(texts)) + 3] = vectors[len(set(texts)) + 4]  # two documents, one vector: ties
    return {"default": {"test": split}}, all_texts, vectors


_LAYER_VALUES = reranking.layer_values


def _task(name: str, data, top_k: int | None = None):
    task = suite.build_task(name)
    task.dataset, task.data_loaded = data, True
    if top_k is not None:
        task._top_k = top_k  # fewer results kept than candidates: mteb's topk cuts the lists
    return task


@pytest.mark.parametrize("shape", ["plain", "repeats", "top_k"])
@pytest.mark.parametrize("name", ["SciDocsRR", "AskUbuntuDupQuestions"])
def test_a_reranking_task_on_arrays_scores_every_key_as_mteb(name, shape, monkeypatch):
    seed = ["SciDocsRR", "AskUbuntuDupQuestions"].index(name) * 10 + ["plain", "repeats", "top_k"].index(
        shape
    )
    top_k = 8 if shape == "top_k" else None
    data, texts, vectors = _split(np.random.default_rng(seed), shape)
    plain = bridge._evaluate(
        bridge.LookupEncoder(texts, vectors, META), _task(name, data, top_k), None, fast=False
    )
    calls = []
    monkeypatch.setattr(reranking, "layer_values", lambda *a, **k: calls.append(1) or _LAYER_VALUES(*a, **k))
    data, texts, vectors = _split(np.random.default_rng(seed), shape)
    task = _task(name, data, top_k)
    encoder = bridge.LookupEncoder(texts, vectors, META)
    fast = [bridge._evaluate(encoder, task, None) for _ in range(2)]  # the second reuses the prepared data
    assert calls == [1, 1]
    for result in fast:
        assert same(result.scores, plain.scores) and list(result.scores["test"][0]) == list(
            plain.scores["test"][0]
        )


def test_what_arrays_do_not_cover_runs_mteb_own_code_with_the_same_scores(monkeypatch):
    """A query without candidates (mteb: an empty results dict) leaves the arrays path; mteb's code
    (with fastmteb's reranking and metrics) scores it, identically to plain mteb."""
    data, texts, vectors = _split(np.random.default_rng(3), "plain")
    data["default"]["test"]["top_ranked"]["q1"] = []
    plain = bridge._evaluate(
        bridge.LookupEncoder(texts, vectors, META), _task("SciDocsRR", data), None, fast=False
    )
    calls = []
    monkeypatch.setattr(reranking, "layer_values", lambda *a, **k: calls.append(1) or _LAYER_VALUES(*a, **k))
    data, texts, vectors = _split(np.random.default_rng(3), "plain")
    data["default"]["test"]["top_ranked"]["q1"] = []
    fast = bridge._evaluate(bridge.LookupEncoder(texts, vectors, META), _task("SciDocsRR", data), None)
    assert calls == [] and same(fast.scores, plain.scores)
