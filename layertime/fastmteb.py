"""mteb's reranking scores from stored embeddings, computed faster and bit-identically (docs/design.md §10).

MindSmallReranking is most of the scoring CPU (2.36M sub-queries of ~41 candidates each). mteb 2.26
spends it on per-sub-query overhead (normalising the same vectors again and again, Python loops) and on
metrics that sort and take np.std per query twice. Two changes, each doing the same float operations on
the same values, so every score mteb writes stays bit-identical:

- `FastRerankSearch`, a `SearchEncoderWrapper` over a `bridge.LookupEncoder` (mteb uses a model that
  is a SearchProtocol directly, and since it is a SearchEncoderWrapper it records the same timing
  phases). With pre-ranked candidates it normalises each document and each unique query vector once,
  then per sub-query runs mteb's own `a_norm @ b_norm.transpose(0, 1)` ([1, d] x [d, k], fresh operands
  as in mteb), `torch.topk` and heap, and builds the results dict in mteb's insertion order. It never
  materialises the [sub-queries, d] query matrix mteb's `encode` would return (~10 GB for MindSmall).
- `calculate_retrieval_scores`, installed over mteb's while layertime scores (`installed()`): the
  same pytrec_eval call and per-query arithmetic, with the confidence scores of the abstention metrics
  computed once per results (mteb computes them twice) and batched per candidate count, argsorts
  shared between metrics, and MRR sorted with `operator.itemgetter` instead of a lambda.

Both reimplement mteb code, so they are used only while the mteb sources they mirror hash to the
values checked here (`mteb_unchanged`); otherwise layertime falls back to mteb's own code, with a
warning: correct, only slower. tests/test_fastmteb.py fails when the hash moves, so a new mteb is
re-verified rather than silently trusted.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import inspect
import logging
import operator
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import datasets
import numpy as np
from mteb._evaluators import retrieval_metrics as _retrieval_metrics
from mteb.models.search_wrappers import SearchEncoderWrapper

logger = logging.getLogger(__name__)

# sha256 of the sources below in mteb 2.26.24 (`mirrored_source_hash`). Re-verify before changing it:
# run tests/test_fastmteb.py against the new mteb and read the diff of these functions.
MIRRORED_SOURCE_SHA256 = "18102cb8371df5570c554e5c010aa90ff9c4161cb2b0a99b70fd61fb4e766362"


def _mirrored() -> list[Any]:
    """The mteb code this module and layertime.reranking reproduce or rely on: the reranking search
    and its dispatch to a SearchProtocol model, the retrieval metrics, the evaluation of a retrieval
    subset and of a legacy clustering subset, the dataloaders that decide the texts encoded, and the
    building of a TaskResult that a split evaluation's merge repeats."""
    import importlib

    from mteb import _create_dataloaders, similarity_functions
    from mteb._evaluators import clustering_evaluator, retrieval_evaluator, retrieval_metrics
    from mteb.abstasks import abstask, clustering_legacy, retrieval
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.models import abs_encoder, search_wrappers
    from mteb.results import task_result
    from mteb.tasks.reranking.eng.mind_small_reranking import MindSmallReranking

    return [
        search_wrappers.SearchEncoderWrapper,
        search_wrappers.rerank_top_ranked_documents,
        abs_encoder.AbsEncoder.similarity,
        similarity_functions.cos_sim,
        similarity_functions._normalize_embeddings,
        similarity_functions._convert_to_tensor,
        similarity_functions._compute_on_best_device,
        retrieval_evaluator.RetrievalEvaluator,
        AbsTaskRetrieval._evaluate_subset,
        retrieval_metrics.calculate_retrieval_scores,
        retrieval_metrics.parse_metrics_from_scores,
        retrieval_metrics.mrr,
        retrieval_metrics.evaluate_abstention,
        retrieval_metrics.confidence_scores,
        retrieval_metrics.nauc,
        retrieval_metrics.max_over_subqueries,
        retrieval_metrics.make_score_dict,
        retrieval._filter_queries_without_positives,
        AbsTaskRetrieval.task_specific_scores,
        MindSmallReranking.task_specific_scores,
        abstask.AbsTask.evaluate,
        abstask.AbsTask._add_main_score,
        importlib.import_module("mteb.evaluate")._evaluate_task,  # the package's `evaluate` is the function
        task_result.TaskResult.from_task_results,
        _create_dataloaders.create_dataloader,
        _create_dataloaders._prepare_dataset,
        _create_dataloaders._corpus_to_dict,
        _create_dataloaders._combine_queries_with_instruction_text,
        _create_dataloaders._create_dataloader_from_texts,
        clustering_legacy.AbsTaskClusteringLegacy._evaluate_subset,
        clustering_evaluator.ClusteringEvaluator.__call__,
    ]


def mirrored_source_hash() -> str:
    """sha256 of the source of every mteb function and class in `_mirrored()`."""
    digest = hashlib.sha256()
    for obj in _mirrored():
        digest.update(inspect.getsource(obj).encode())
    return digest.hexdigest()


_GUARD_LOCK = threading.Lock()


def mteb_unchanged() -> bool:
    """Whether the installed mteb is the one the fast paths were verified against; warns once if not.

    Computed once per process, under a lock: `inspect.getsource` parses mteb's modules with `ast`,
    and parsing in several threads at once raised `SystemError: AST constructor recursion depth
    mismatch` on Python 3.11 (issue 14.3), so no two threads ever compute it.
    """
    with _GUARD_LOCK:
        return _mteb_unchanged()


@functools.cache
def _mteb_unchanged() -> bool:
    if mirrored_source_hash() == MIRRORED_SOURCE_SHA256:
        return True
    warnings.warn(
        "layertime.fastmteb: mteb's retrieval code differs from the version its fast reranking and "
        "metrics were verified against; scoring falls back to mteb's own (slower) code. Re-verify "
        "with tests/test_fastmteb.py and update MIRRORED_SOURCE_SHA256.",
        stacklevel=3,
    )
    return False


mteb_unchanged.cache_clear = _mteb_unchanged.cache_clear  # type: ignore[attr-defined]  # tests re-check


# ---------------------------------------------------------------------------------------------- columns


class ListColumns(datasets.Dataset):
    """A Dataset whose `ds["col"]` is a list, as in datasets 3.x, read in one batch.

    datasets >= 4 returns a lazy Column that sklearn and mteb's sampling read row by row: scoring a
    classification task took 10-80x longer (docs/design.md §10) for the same numbers. `select` keeps the
    class, since mteb scores the undersampled training split it selects. `from_dict` makes one too:
    `installed()` hands it to mteb's legacy clustering, which builds a dataset per cluster set.
    """

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        return value[:] if isinstance(key, str) else value

    def select(self, *args: Any, **kwargs: Any) -> Any:
        return as_list_columns(super().select(*args, **kwargs))


def as_list_columns(data: Any) -> Any:
    """Every Dataset inside a task's loaded data (nested dicts, DatasetDicts, split objects) as ListColumns."""
    if isinstance(data, datasets.Dataset):
        data.__class__ = ListColumns
    elif isinstance(data, Mapping):
        for value in data.values():
            as_list_columns(value)
    elif hasattr(data, "__dict__") and not isinstance(data, type):
        for value in vars(data).values():
            if isinstance(value, datasets.Dataset | Mapping):
                as_list_columns(value)
    return data


ENCODE_BATCH = 4096  # texts per mteb DataLoader batch; lookups are cheap, so large batches cut overhead


def batch_texts(inputs: Any) -> list[str]:
    """The texts of an mteb DataLoader, read from its dataset column when there is one (fast path)."""
    dataset = getattr(inputs, "dataset", None)
    names = getattr(dataset, "column_names", None) or []
    if "text" in names:
        texts = dataset["text"]
        return texts if isinstance(texts, list) else texts[:]  # a datasets Column: one batched read
    return [text for batch in inputs for text in batch["text"]]


# ---------------------------------------------------------------------------------------------- search


class FastRerankSearch(SearchEncoderWrapper):
    """mteb's `SearchEncoderWrapper` over a LookupEncoder, with a fast path for pre-ranked candidates.

    `encoder` must have `matrix` (float32 [n, d]), `encode_rows(dataloader)` (the matrix rows of the
    texts its `encode` would return) and cosine similarity. Without `top_ranked` (full retrieval)
    everything is mteb's own code.
    """

    def search(  # noqa: PLR0913 (mteb's signature)
        self,
        queries: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        top_k: int,
        encode_kwargs: Any,
        top_ranked: Any = None,
        num_proc: int | None = None,
        timer: Any = None,
        **kwargs: Any,
    ) -> dict[str, dict[str, float]]:
        if top_ranked is None or not fast_rerank_applies(self.model) or self.index_backend is not None:
            return super().search(
                queries,
                task_metadata=task_metadata,
                hf_split=hf_split,
                hf_subset=hf_subset,
                top_k=top_k,
                encode_kwargs=encode_kwargs,
                top_ranked=top_ranked,
                num_proc=num_proc,
                timer=timer,
                **kwargs,
            )
        return self._rerank(queries, task_metadata, hf_split, hf_subset, top_k, encode_kwargs,
                            top_ranked, num_proc, timer)  # fmt: skip

    def _rerank(  # noqa: PLR0913
        self,
        queries: Any,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        top_k: int,
        encode_kwargs: Any,
        top_ranked: Mapping[str, list[str]],
        num_proc: int | None,
        timer: Any,
    ) -> dict[str, dict[str, float]]:
        """`SearchEncoderWrapper.search` + `rerank_top_ranked_documents`, step for step, on matrix rows."""
        from mteb._create_dataloaders import create_dataloader
        from mteb.timing import TimingStack
        from mteb.types import PromptType

        if self.task_corpus is None:
            raise ValueError("Corpus must be indexed before searching.")
        timer = timer or TimingStack()
        corpus, encoder = self.task_corpus, self.model
        queries_dataloader = create_dataloader(
            queries, task_metadata=task_metadata, prompt_type=PromptType.query, num_proc=num_proc,
            **encode_kwargs,
        )  # fmt: skip
        with timer("Encoding queries", split=hf_split, subset=hf_subset):
            query_rows = np.asarray(encoder.encode_rows(queries_dataloader), dtype=np.int64)
        query_idx_to_id = dict(enumerate(queries["id"]))
        logger.info("Reranking pre-ranked documents...")
        doc_id_to_idx = {doc: idx for idx, doc in enumerate(corpus["id"])}
        with timer("Encoding corpus", split=hf_split, subset=hf_subset):
            doc_rows = np.asarray(
                encoder.encode_rows(
                    create_dataloader(
                        corpus, task_metadata=task_metadata, prompt_type=PromptType.document,
                        batch_size=encode_kwargs.get("batch_size", 32), num_proc=num_proc,
                    )
                ),
                dtype=np.int64,
            )  # fmt: skip
        with timer("Computing similarity", split=hf_split, subset=hf_subset):
            result_heaps = rerank_heaps(
                encoder.matrix, query_rows, doc_rows, query_idx_to_id, doc_id_to_idx, top_ranked, top_k
            )
        self.task_corpus = None  # as mteb: free the corpus
        # mteb assigns results[qid][corpus_id] = score along each heap list: a comprehension inserts
        # in the same order (a repeated id keeps its first position and its last score, as there)
        results: dict[str, dict[str, float]] = {qid: {} for qid in query_idx_to_id.values()}
        for qid, heap in result_heaps.items():
            results[qid] = {corpus_id: score for score, corpus_id in heap}
        return results


def fast_rerank_applies(encoder: Any) -> bool:
    """The fast path reproduces mteb only for float32 cosine scoring on the CPU, with the mirrored mteb.

    mteb's `cos_sim` converts other dtypes first, and may move work to a GPU or torch.compile it unless
    `bridge.prepare_scoring_process` pinned both off.
    """
    from mteb import similarity_functions as sf
    from mteb.models.model_meta import ScoringFunction

    matrix = getattr(encoder, "matrix", None)
    if not (isinstance(matrix, np.ndarray) and matrix.dtype == np.float32 and matrix.ndim == 2):
        return False
    if not hasattr(encoder, "encode_rows"):
        return False
    meta = getattr(encoder, "mteb_model_meta", None)
    if meta is None or meta.similarity_fn_name is not ScoringFunction.COSINE:
        return False
    import torch

    probe = torch.zeros(1, 1)
    if sf._select_device(probe, probe).type != "cpu" or sf._use_torch_compile():
        return False
    return mteb_unchanged()


def normalized_rows(matrix: np.ndarray, rows: np.ndarray) -> Any:
    """`torch.nn.functional.normalize(p=2, dim=1)` of `matrix[rows]`, as one float32 [len(rows), d] tensor.

    Identity: torch reduces each row of a last-dim norm separately (the same vectorised loop over the
    row's d values whatever the number of rows, with unaligned loads), and clamp and division are
    elementwise; so a row normalised inside this matrix equals the same row normalised alone or
    inside any [k, d] candidate matrix, as mteb does per sub-query. tests/test_fastmteb.py checks it
    for k = 1..300, several d and magnitudes, and misaligned inputs.
    """
    import torch

    return torch.nn.functional.normalize(torch.from_numpy(matrix[rows]), p=2, dim=1)


def rerank_heaps(  # noqa: PLR0913
    matrix: np.ndarray,
    query_rows: np.ndarray,
    doc_rows: np.ndarray,
    query_idx_to_id: Mapping[int, str],
    doc_id_to_idx: Mapping[str, int],
    top_ranked: Mapping[str, list[str]],
    top_k: int,
) -> dict[str, list[tuple[float, str]]]:
    """mteb's `rerank_top_ranked_documents` loop on precomputed normalised rows: the same heaps.

    Per sub-query the similarity is mteb's `a_norm @ b_norm.transpose(0, 1)`: a fresh [1, d] query
    tensor and a fresh [k, d] gather of the candidates (new allocations, as mteb's are, so the BLAS
    call sees the same shapes, strides and alignment); then the same `torch.topk` and `heappush`es in
    the same order.
    - NaN: with every normalised row finite, |a_i| and |b_i| are at most ~1 and a dot product of d
      such terms cannot overflow, so no score can be NaN and the per-sub-query check is skipped;
      otherwise it runs as in mteb and raises the same error.
    - Candidate ids are mapped to corpus positions in one pass first (`_candidate_spans`): an id
      missing from the corpus raises mteb's KeyError before any sub-query is scored, not at its own.
    """
    import torch

    unique_rows, query_slot = np.unique(query_rows, return_inverse=True)
    query_norm = normalized_rows(matrix, unique_rows)
    query_vectors = [query_norm[i : i + 1].clone() for i in range(len(unique_rows))]  # fresh [1, d]
    doc_norm = normalized_rows(matrix, doc_rows)
    check_nan = not (bool(torch.isfinite(query_norm).all()) and bool(torch.isfinite(doc_norm).all()))
    del query_norm
    flat, spans = _candidate_spans(query_idx_to_id, doc_id_to_idx, top_ranked)
    slots = query_slot.reshape(-1).tolist()
    result_heaps: dict[str, list[tuple[float, str]]] = {qid: [] for qid in query_idx_to_id.values()}
    index_select, topk, heappush = torch.index_select, torch.topk, heapq.heappush
    for q_idx, qid in query_idx_to_id.items():
        if qid not in top_ranked:
            logger.warning(f"No pre-ranked documents found for query {qid}")
            continue
        ranked_ids = top_ranked[qid]
        if not ranked_ids:
            continue
        start, stop = spans[qid]
        candidates = index_select(doc_norm, 0, flat[start:stop])
        scores = query_vectors[slots[q_idx]] @ candidates.transpose(0, 1)
        if check_nan:
            is_nan = torch.isnan(scores)
            if is_nan.sum() > 0:
                raise ValueError(f"NaN values detected in the similarity scores: {is_nan.sum()}")
        values, indices = topk(scores, min(top_k, len(ranked_ids)), dim=1, largest=True)
        heap = result_heaps[qid]
        for item in zip(values.tolist()[0], map(ranked_ids.__getitem__, indices.tolist()[0]), strict=True):
            heappush(heap, item)  # (score, corpus_id), as mteb pushes it
    return result_heaps


def _candidate_spans(
    query_idx_to_id: Mapping[int, str], doc_id_to_idx: Mapping[str, int], top_ranked: Mapping[str, list[str]]
) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The corpus positions of every query's candidates, as one int64 tensor and each query's span of it."""
    import torch

    positions: list[int] = []
    spans: dict[str, tuple[int, int]] = {}
    for qid in dict.fromkeys(query_idx_to_id.values()):
        ranked_ids = top_ranked[qid] if qid in top_ranked else None
        if ranked_ids:
            start = len(positions)
            positions.extend([doc_id_to_idx[doc_id] for doc_id in ranked_ids])
            spans[qid] = (start, len(positions))
    return torch.tensor(positions, dtype=torch.int64), spans


# ---------------------------------------------------------------------------------------------- metrics


def calculate_retrieval_scores(
    results: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int],
    skip_first_result: bool = False,
) -> Any:
    """mteb's `retrieval_metrics.calculate_retrieval_scores`, the same floats in fewer CPU-seconds.

    pytrec_eval and every average are mteb's own expressions; what changes is only how often and how
    fast the same per-query values are computed (see `parse_metrics`, `mrr`, `abstention_naucs`).
    Cases this was not verified for run mteb's own function: no results (mteb fails on them) and
    repeated k values (mteb then pools a k's values twice into one list).
    """
    from mteb._evaluators import retrieval_metrics as rm

    if not results or len(set(k_values)) != len(k_values):
        return _MTEB_CALCULATE_RETRIEVAL_SCORES(results, qrels, k_values, skip_first_result)
    import pytrec_eval
    from mteb.types import RetrievalEvaluationResult

    if skip_first_result:
        results = {
            qid: dict(sorted(doc_scores.items(), key=lambda x: x[1], reverse=True)[1:])
            for qid, doc_scores in results.items()
        }
    measures = ("map_cut", "ndcg_cut", "recall", "P", "success")
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {f"{m}." + ",".join(str(k) for k in k_values) for m in measures}
    )
    scores = evaluator.evaluate(results)
    ndcg, _map, recall, precision, all_ndcgs, all_aps, all_recalls, all_precisions, hit_rate = parse_metrics(
        scores, k_values
    )
    mrr_scores = mrr(qrels, results, k_values)
    confidence = confidence_arrays(results)
    metric_lists = {**all_ndcgs, **all_aps, **all_recalls, **all_precisions}
    if confidence is None:  # scores that are not plain floats, or NaN: mteb's own abstention code
        naucs = rm.evaluate_abstention(results, metric_lists)
        naucs_mrr = rm.evaluate_abstention(results, mrr_scores)
    else:
        naucs = abstention_naucs(confidence, metric_lists)
        naucs_mrr = abstention_naucs(confidence, mrr_scores)
    avg_mrr = {k: sum(mrr_scores[k]) / len(mrr_scores[k]) for k in mrr_scores}
    return RetrievalEvaluationResult(
        all_scores=scores,
        ndcg=ndcg,
        map=_map,
        recall=recall,
        precision=precision,
        naucs=naucs,
        mrr=avg_mrr,
        naucs_mrr=naucs_mrr,
        hit_rate=hit_rate,
    )


def parse_metrics(scores: Mapping[str, Mapping[str, float]], k_values: Sequence[int]) -> tuple:
    """mteb's `parse_metrics_from_scores`, one list comprehension per (metric, k) instead of a Python
    loop of appends: the per-k lists hold the same values in the same (query) order, and each average
    is the same `round(sum(list) / len(scores), 5)`.
    """
    rows = list(scores.values())

    def column(name: str) -> list[float]:
        return [query_scores[name] for query_scores in rows]

    ndcgs = [column(f"ndcg_cut_{k}") for k in k_values]
    aps = [column(f"map_cut_{k}") for k in k_values]
    recalls = [column(f"recall_{k}") for k in k_values]
    precisions = [column(f"P_{k}") for k in k_values]
    hits = [column(f"success_{k}") for k in k_values]
    n = len(scores)
    all_ndcgs = defaultdict(list, {f"NDCG@{k}": ndcgs[j] for j, k in enumerate(k_values)})
    all_aps = defaultdict(list, {f"MAP@{k}": aps[j] for j, k in enumerate(k_values)})
    all_recalls = defaultdict(list, {f"Recall@{k}": recalls[j] for j, k in enumerate(k_values)})
    all_precisions = defaultdict(list, {f"P@{k}": precisions[j] for j, k in enumerate(k_values)})
    return (
        {f"NDCG@{k}": round(sum(ndcgs[j]) / n, 5) for j, k in enumerate(k_values)},
        {f"MAP@{k}": round(sum(aps[j]) / n, 5) for j, k in enumerate(k_values)},
        {f"Recall@{k}": round(sum(recalls[j]) / n, 5) for j, k in enumerate(k_values)},
        {f"P@{k}": round(sum(precisions[j]) / n, 5) for j, k in enumerate(k_values)},
        all_ndcgs,
        all_aps,
        all_recalls,
        all_precisions,
        {f"HitRate@{k}": round(sum(hits[j]) / n, 5) for j, k in enumerate(k_values)},
    )


_SCORE_THEN_ID = operator.itemgetter(1, 0)  # the key (score, doc_id) of mteb's lambda, at C speed


def mrr(
    qrels: Mapping[str, Mapping[str, int]],
    results: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int],
) -> dict[str, list[float]]:
    """mteb's `retrieval_metrics.mrr`: the same ranking, the same reciprocal ranks.

    The ranking is mteb's sort with an identical key tuple (`itemgetter(1, 0)` returns
    `(item[1], item[0])`). mteb scans the top k hits for the first relevant one for each k; that hit is
    the first relevant one of the top k_max list whenever its rank is below k, so it is found once
    and `1.0 / (rank + 1)` is the same float.
    """
    mrr_metrics: dict[str, list[float]] = defaultdict(list)
    k_max = max(k_values)
    columns = [mrr_metrics[f"MRR@{k}"] for k in k_values] if results else []
    for query_id, doc_scores in results.items():
        top_hits = sorted(doc_scores.items(), key=_SCORE_THEN_ID, reverse=True)[0:k_max]
        relevant = qrels[query_id]
        query_relevant_docs = {doc_id for doc_id in relevant if relevant[doc_id] > 0}
        first = next((rank for rank, hit in enumerate(top_hits) if hit[0] in query_relevant_docs), None)
        for column, k in zip(columns, k_values, strict=True):
            column.append(1.0 / (first + 1) if first is not None and first < k else 0.0)
    return mrr_metrics


CONFIDENCE_FUNCTIONS = ("max", "std", "diff1")  # mteb's `confidence_scores` keys, in its order


def confidence_arrays(results: Mapping[str, Mapping[str, float]]) -> dict[str, np.ndarray] | None:
    """mteb's per-query `confidence_scores` of `results`, as the arrays `evaluate_abstention` builds.

    Queries are grouped by candidate count and each group is one [n, k] float64 array of the scores
    in dict order (the order mteb's `np.std(list)` sums them in):
    - std: `np.std(rows, axis=1)` reduces each row with the same pairwise summation as `np.std` of
      that row alone (tests/test_fastmteb.py checks it for k = 1..1025 and 100k rows);
    - max and diff1: a stable ascending sort orders the floats as Python's `sorted` does (both stable,
      same `<`), so columns -1 and -2 are `sorted(scores)[::-1][0]` and `[1]`, and diff1 is the same
      subtraction. An empty query gives mteb's zeros.

    None where that argument does not hold: scores that are not Python floats (mteb's `np.std` would
    then compute in their dtype) or NaN (which `sorted` and `np.sort` order differently).
    """
    values = [list(doc_scores.values()) for doc_scores in results.values()]
    out = {name: np.zeros(len(values)) for name in CONFIDENCE_FUNCTIONS}
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(values):
        by_length[len(row)].append(i)
    for length, members in by_length.items():
        if length == 0:
            continue  # mteb: max = std = diff1 = 0.0
        rows = np.array([values[i] for i in members])
        if rows.dtype != np.float64 or np.isnan(rows).any():
            return None
        ascending = np.sort(rows, axis=1, kind="stable")
        out["max"][members] = ascending[:, -1]
        out["std"][members] = np.std(rows, axis=1)
        if length > 1:
            out["diff1"][members] = ascending[:, -1] - ascending[:, -2]
    return out


def abstention_naucs(
    confidence: Mapping[str, np.ndarray], metric_scores: Mapping[str, Sequence[float] | np.ndarray]
) -> dict[str, float]:
    """mteb's `evaluate_abstention` on precomputed confidence arrays: the same nAUCs, keys in its order.

    mteb's `nauc(conf, metric)` sorts `conf` and `metric` for every (metric, confidence function)
    pair. The argsort and tie groups of a confidence array do not depend on the metric, nor the
    oracle curve of a metric on the confidence function: each is computed once and reused, and every
    remaining step is mteb's expression on the same arrays. Metrics with equal values (NDCG@100 and
    NDCG@1000 when no query has 100 results) get the nAUCs computed for the first of them.
    """
    from sklearn.metrics import auc

    rates = _abstention_rates()
    orders = {fct: _sorted_groups(conf) for fct, conf in confidence.items()}
    naucs = {}
    done: dict[tuple, list[tuple[np.ndarray, list[float]]]] = defaultdict(list)  # equal metrics' nAUCs
    for metric_name, values in metric_scores.items():
        metric = np.array(values)
        seen = done[(metric.size, float(metric.sum()), metric[:: max(1, metric.size // 64)].tobytes())]
        found = next((found for other, found in seen if np.array_equal(other, metric)), None)
        if found is None:
            oracle = _abstention_curve(_sorted_groups(metric), metric, rates)
            or_auc = auc(rates, oracle)
            flat_auc = oracle[0] * (rates[-1] - rates[0])
            found = []
            for fct in confidence:
                abst_auc = auc(rates, _abstention_curve(orders[fct], metric, rates))
                found.append(np.nan if or_auc == flat_auc else (abst_auc - flat_auc) / (or_auc - flat_auc))
            seen.append((metric, found))
        for fct, value in zip(confidence, found, strict=True):
            naucs[f"nAUC_{metric_name}_{fct}"] = value
    return naucs


def _abstention_rates() -> np.ndarray:
    from mteb._evaluators.retrieval_metrics import _DEFAULT_ABSTENTION_RATES

    return _DEFAULT_ABSTENTION_RATES


def _sorted_groups(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stable argsort of `conf` and its groups of equal values, as mteb's `abstention_curve` has them."""
    order = np.argsort(conf, stable=True)
    sorted_conf = conf[order]
    group_start = np.flatnonzero(np.r_[True, sorted_conf[1:] != sorted_conf[:-1]])
    group_size = np.diff(np.r_[group_start, len(sorted_conf)])
    return order, group_start, group_size


def _abstention_curve(
    groups: tuple[np.ndarray, np.ndarray, np.ndarray], metrics: np.ndarray, rates: np.ndarray
) -> np.ndarray:
    """The rest of mteb's `nauc.abstention_curve`: each tied group's mean metric, then suffix means."""
    order, group_start, group_size = groups
    if order.size == 0:
        return np.full(len(rates), np.nan)
    sorted_metrics = metrics[order]
    group_mean = np.add.reduceat(sorted_metrics, group_start) / group_size
    sorted_metrics = np.repeat(group_mean, group_size)
    curve = np.zeros(len(rates))
    for i, rate in enumerate(rates):
        num_instances_abst = min(round(rate * order.shape[0]), len(order) - 1)
        curve[i] = sorted_metrics[num_instances_abst:].mean()
    return curve


# ---------------------------------------------------------------------------------------------- install

_MTEB_CALCULATE_RETRIEVAL_SCORES: Callable[..., Any] = _retrieval_metrics.calculate_retrieval_scores
_INSTALL_LOCK = threading.Lock()
_INSTALL_DEPTH = [0]


def _metric_modules() -> list[Any]:
    """Where mteb looks `calculate_retrieval_scores` up at call time (`max_over_subqueries` included)."""
    from mteb._evaluators import retrieval_evaluator, retrieval_metrics

    return [retrieval_metrics, retrieval_evaluator]


@contextmanager
def installed() -> Iterator[bool]:
    """mteb with our faster, identical parts while the context lasts; yields whether they are in:
    our `calculate_retrieval_scores` in place of mteb's, and `ListColumns` as the Dataset class mteb's
    legacy clustering builds each cluster set with (it read a lazy column row by row: 45% of
    RedditClustering's time).

    Counted, so overlapping scoring threads share one installation and the last to leave restores
    mteb's own (another thread's plain mteb call meanwhile gets ours: the same floats). Nothing is
    installed when `mteb_unchanged()` is false.
    """
    from mteb.abstasks import clustering_legacy

    if not mteb_unchanged():
        yield False
        return
    with _INSTALL_LOCK:
        if _INSTALL_DEPTH[0] == 0:
            for module in _metric_modules():
                module.calculate_retrieval_scores = calculate_retrieval_scores
            clustering_legacy.Dataset = ListColumns
        _INSTALL_DEPTH[0] += 1
    try:
        yield True
    finally:
        with _INSTALL_LOCK:
            _INSTALL_DEPTH[0] -= 1
            if _INSTALL_DEPTH[0] == 0:
                for module in _metric_modules():
                    module.calculate_retrieval_scores = _MTEB_CALCULATE_RETRIEVAL_SCORES
                clustering_legacy.Dataset = datasets.Dataset


def search_model(encoder: Any, task: Any) -> Any:
    """The model to hand `mteb.evaluate` for `task`: `FastRerankSearch(encoder)` for retrieval tasks
    (reranking is one) when the fast path applies, else `encoder` unchanged."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    if isinstance(task, AbsTaskRetrieval) and fast_rerank_applies(encoder):
        return FastRerankSearch(encoder)
    return encoder
