"""layertime.fastmteb gives every score mteb writes bit-identically, only faster (docs/design.md §10)."""

import json

import datasets
import mteb
import numpy as np
import pytest
import torch
from mteb._evaluators import retrieval_evaluator, retrieval_metrics

from layertime import bridge, fastmteb, reranking, suite

META = bridge.model_meta("layertime/tiny-neox", "c" * 40, 16, {"layer": 0})


def every_score(result) -> tuple[list[str], str]:
    """All scores of a TaskResult: key order, and values written exactly (json repr; NaN as NaN)."""
    keys = [key for subset in result.scores["test"] for key in subset]
    return keys, json.dumps(result.scores, sort_keys=True)


def mini_mind(rng: np.random.Generator, dim: int = 16):
    """MindSmallReranking's shape in miniature: sub-queries `<query>_<n>`, shared documents and query
    texts, variable candidate counts (one, several, many), and exact ties: duplicated document vectors
    (tied scores within a sub-query) and duplicated query vectors (tied confidence scores)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    n_docs, n_texts = 40, 12
    doc_ids = [f"n{j}" for j in range(n_docs)]
    ids, texts, qrels, top_ranked = [], [], {}, {}
    for base in range(30):
        for sub in range(int(rng.integers(1, 5))):
            qid = f"u{base}_{sub}"
            k = 1 if base == 0 else int(rng.integers(2, 15))
            candidates = [doc_ids[j] for j in rng.choice(n_docs, size=k, replace=False)]
            ids.append(qid)
            texts.append(f"query{(base + sub) % n_texts}")
            top_ranked[qid] = candidates
            qrels[qid] = {d: int(i == 0 or rng.random() < 0.2) for i, d in enumerate(candidates)}
    split = RetrievalSplitData(
        corpus=Dataset.from_dict({"id": doc_ids, "text": [f"doc {j}" for j in range(n_docs)]}),
        queries=Dataset.from_dict({"id": ids, "text": texts}),
        relevant_docs=qrels,
        top_ranked=top_ranked,
    )
    all_texts = [f"query{i}" for i in range(n_texts)] + [f"doc {j}" for j in range(n_docs)]
    vectors = (
        rng.standard_normal((len(all_texts), dim)) * rng.uniform(0.01, 100, (len(all_texts), 1))
    ).astype(np.float32)
    vectors[n_texts + 1] = vectors[n_texts]  # doc 1 == doc 0
    vectors[n_texts + 3] = 2 * vectors[n_texts + 2]  # doc 3 ∝ doc 2: the same cosine
    vectors[1] = vectors[0]  # query1 == query0
    return {"default": {"test": split}}, all_texts, vectors


def mind_task(data):
    task = suite.build_task("MindSmallReranking")
    task.dataset, task.data_loaded = data, True
    return task


def score_mind(seed: int, fast: bool, vectors_edit=None):
    data, texts, vectors = mini_mind(np.random.default_rng(seed))
    if vectors_edit:
        vectors_edit(vectors, texts)
    return bridge._evaluate(bridge.LookupEncoder(texts, vectors, META), mind_task(data), None, fast=fast)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the arrays path's similarity loop and of the fast abstention metrics."""
    calls = {"rerank": 0, "naucs": 0}

    def counted(module, name, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(reranking, "similarities", "rerank")
    counted(fastmteb, "abstention_naucs", "naucs")
    return calls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reranking_every_score_is_bit_identical_to_mteb(seed, spy):
    plain = score_mind(seed, fast=False)
    assert spy == {"rerank": 0, "naucs": 0}
    fast = score_mind(seed, fast=True)
    assert spy["rerank"] == 1 and spy["naucs"] == 4  # the arrays path ran: sub-queries and merged queries
    assert every_score(fast) == every_score(plain)
    assert fast.main_score == plain.main_score
    assert [p["name"] for p in fast.evaluation_phases] == [p["name"] for p in plain.evaluation_phases]
    assert (
        retrieval_metrics.calculate_retrieval_scores is fastmteb._MTEB_CALCULATE_RETRIEVAL_SCORES
    )  # restored
    assert retrieval_evaluator.calculate_retrieval_scores is fastmteb._MTEB_CALCULATE_RETRIEVAL_SCORES


def test_a_nan_embedding_raises_as_in_mteb():
    def poison(vectors, texts):
        vectors[texts.index("doc 5")] = np.nan

    errors = []
    for fast in (False, True):
        with pytest.raises(ValueError, match="NaN values detected") as raised:
            score_mind(0, fast=fast, vectors_edit=poison)
        errors.append(str(raised.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("task_name", list(suite.DEMO_TASK_TYPES))
def test_demo_tasks_every_score_is_bit_identical_to_mteb(task_name, tmp_path):
    recorded = bridge.recorded_texts(task_name, tmp_path / "texts")
    vectors = np.random.default_rng(0).standard_normal((len(recorded.texts), 16)).astype(np.float32)
    vectors[1] = vectors[0]  # ties
    encoder = bridge.LookupEncoder(recorded.texts, vectors, META)
    fast = bridge._evaluate(encoder, bridge.load_task(task_name), None, fast=True)
    plain = mteb.evaluate(encoder, suite.build_task(task_name), cache=None, show_progress_bar=False)
    assert every_score(fast) == every_score(plain.task_results[0])


def test_normalising_a_row_does_not_depend_on_the_matrix_around_it():
    """The identity `normalized_rows` rests on: mteb normalises each sub-query's [k, d] candidates;
    a row normalised alone, inside the whole matrix or inside any candidate subset is the same."""
    torch.set_num_threads(1)  # as in a scoring process
    rng = np.random.default_rng(0)
    for d in (7, 16, 50, 768, 1024, 2048):
        n = 300
        matrix = (rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-20, 18, (n, 1))).astype(np.float32)
        matrix[3], matrix[4] = 0, matrix[5]
        whole = fastmteb.normalized_rows(matrix, np.arange(n))
        for i in range(0, n, 29):  # alone, as mteb normalises the query
            alone = torch.nn.functional.normalize(torch.as_tensor(matrix[i]).unsqueeze(0), p=2, dim=1)
            assert torch.equal(alone, whole[i : i + 1])
        for k in [*range(1, 45), 100, 299, 300]:  # as mteb normalises the candidates
            idx = rng.integers(0, n, k)
            subset = torch.nn.functional.normalize(torch.as_tensor(matrix[idx]), p=2, dim=1)
            assert torch.equal(subset, whole[idx]), (d, k)
        for offset in (1, 3):  # misaligned memory
            buffer = torch.empty(n * d + offset)
            view = buffer[offset:].view(n, d)
            view.copy_(torch.from_numpy(matrix))
            assert torch.equal(torch.nn.functional.normalize(view, p=2, dim=1), whole)


def test_batched_confidence_scores_equal_mteb_per_query():
    """np.std over rows of equal length, and max / diff1 from a stable sort, equal mteb's
    `confidence_scores` of each list, bit for bit (also with ties and one- and zero-length lists)."""
    rng = np.random.default_rng(1)
    results = {}
    for i in range(3000):
        k = int(rng.integers(0, 140)) if i % 10 else int(rng.choice([1, 128, 129, 257, 1025]))
        scores = (rng.standard_normal(k).astype(np.float32) * 10.0 ** rng.uniform(-3, 3)).tolist()
        if k > 3 and i % 7 == 0:
            scores[1] = scores[0] = max(scores)  # tied top scores
        results[f"q{i}"] = {f"d{j}": s for j, s in enumerate(scores)}
    ours = fastmteb.confidence_arrays(results)
    theirs = [retrieval_metrics.confidence_scores(list(r.values())) for r in results.values()]
    for name in fastmteb.CONFIDENCE_FUNCTIONS:
        expected = np.array([c[name] for c in theirs])
        assert np.array_equal(ours[name].view(np.int64), expected.view(np.int64)), name
    many = rng.standard_normal((100_000, 41)).astype(np.float32).astype(float)  # MindSmall's row count scale
    picks = rng.integers(0, len(many), 2000)
    per_list = np.array([np.std(many[i].tolist()) for i in picks])
    assert np.array_equal(np.std(many, axis=1)[picks].view(np.int64), per_list.view(np.int64))


def test_mteb_is_the_version_the_fast_paths_were_verified_against():
    """Fails when mteb's mirrored code changes: re-verify fastmteb, then update the hash."""
    assert fastmteb.mirrored_source_hash() == fastmteb.MIRRORED_SOURCE_SHA256
    assert fastmteb.mteb_unchanged()


def test_a_changed_mteb_falls_back_to_mteb_own_code(monkeypatch, spy):
    real = fastmteb._mirrored
    monkeypatch.setattr(
        fastmteb, "_mirrored", lambda: [*real(), test_a_changed_mteb_falls_back_to_mteb_own_code]
    )
    fastmteb.mteb_unchanged.cache_clear()
    try:
        with pytest.warns(UserWarning, match="falls back to mteb's own"):
            assert not fastmteb.mteb_unchanged()
        encoder = bridge.LookupEncoder(["a"], np.ones((1, 16), np.float32), META)
        assert fastmteb.search_model(encoder, mind_task({})) is encoder
        with fastmteb.installed() as active:
            assert not active
            assert retrieval_metrics.calculate_retrieval_scores is fastmteb._MTEB_CALCULATE_RETRIEVAL_SCORES
        fallback = score_mind(0, fast=True)
        assert spy == {"rerank": 0, "naucs": 0}
        assert every_score(fallback) == every_score(score_mind(0, fast=False))
    finally:
        fastmteb.mteb_unchanged.cache_clear()


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_search_returns_mteb_results_in_mteb_order(seed):
    """The results dict itself, insertion order included (mteb's np.std sums in that order)."""
    from mteb.models.search_wrappers import SearchEncoderWrapper

    data, texts, vectors = mini_mind(np.random.default_rng(seed))
    split, task = data["default"]["test"], mind_task(data)
    encoder = bridge.LookupEncoder(texts, vectors, META)
    bridge.prepare_scoring_process()
    out = []
    for searcher in (SearchEncoderWrapper(encoder), fastmteb.FastRerankSearch(encoder)):
        kwargs = dict(task_metadata=task.metadata, hf_split="test", hf_subset="default")
        encode_kwargs = {"batch_size": 7, "show_progress_bar": False}
        searcher.index(split["corpus"], encode_kwargs=encode_kwargs, **kwargs)
        results = searcher.search(split["queries"], top_k=1000, top_ranked=split["top_ranked"],
                                  encode_kwargs=encode_kwargs, **kwargs)  # fmt: skip
        out.append([(qid, list(docs.items())) for qid, docs in results.items()])
    assert out[0] == out[1]
    assert any(len({s for _, s in docs}) < len(docs) for _, docs in out[0])  # tied scores occurred


def _cluster_sets(rng: np.random.Generator):
    """A legacy clustering task's data as mteb loads it: rows of (sentences, labels), one per cluster
    set, texts shared between sets, one set with a single label (mteb skips its encoding)."""
    from datasets import Dataset, DatasetDict

    texts = [f"text {i}" for i in range(120)]
    sentences, labels = [], []
    for s in range(5):
        picks = rng.choice(len(texts), size=int(rng.integers(30, 60)), replace=False)
        sentences.append([texts[i] for i in picks])
        labels.append([0] * len(picks) if s == 2 else [int(i % (3 + s)) for i in picks])
    data = {"default": DatasetDict({"test": Dataset.from_dict({"sentences": sentences, "labels": labels})})}
    vectors = rng.standard_normal((len(texts), 16)).astype(np.float32)
    vectors[:, 0] *= 300.0  # a huge-magnitude dimension, as hidden states have
    return data, texts, vectors


def test_legacy_clustering_on_list_columns_scores_every_key_as_mteb(monkeypatch):
    """mteb's legacy clustering builds a Dataset per cluster set and reads its lazy columns row by row;
    with `installed()` it builds ListColumns (one batched read): the same scores, key by key."""
    results = []
    for fast in (False, True):
        data, texts, vectors = _cluster_sets(np.random.default_rng(0))
        task = suite.build_task("RedditClustering")
        task.dataset, task.data_loaded = data, True
        results.append(bridge._evaluate(bridge.LookupEncoder(texts, vectors, META), task, None, fast=fast))
    built = []
    real = fastmteb.ListColumns.from_dict.__func__
    monkeypatch.setattr(
        fastmteb.ListColumns,
        "from_dict",
        classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k)),
    )
    data, texts, vectors = _cluster_sets(np.random.default_rng(0))
    task = suite.build_task("RedditClustering")
    task.dataset, task.data_loaded = data, True
    again = bridge._evaluate(bridge.LookupEncoder(texts, vectors, META), task, None)
    assert every_score(results[0]) == every_score(results[1]) == every_score(again)
    assert len(built) == 4  # one per cluster set with more than one label
    from mteb.abstasks import clustering_legacy

    assert clustering_legacy.Dataset is datasets.Dataset  # restored
