"""mteb's reranking scores on arrays: the same floats as mteb 2.26, without its per-candidate Python objects.

MindSmallReranking is 2.36M sub-queries of ~41 candidates each: mteb builds a dict per sub-query (97M
entries), hands them to pytrec_eval, sorts each list again for MRR and the confidence scores, and merges
the sub-queries of a query in more dicts (`max_over_subqueries`). Here every step is the same float
operation on the same values, on arrays (docs/design.md §10):

- **Prepared once per task load** (`prepare`, kept with the task): mteb's query filter, the texts its
  encoder is asked for (the corpus' `Dataset.map` included), each candidate's corpus position and qrels
  value, each query's ideal DCG, the sub-query groups of `max_over_subqueries`. None of it depends on the
  embeddings: every layer a process scores reuses it.
- **Similarity** (`similarities`): per sub-query mteb's own `[1, d] @ [d, k]` product of normalised
  rows (a row normalised inside a matrix equals it normalised alone: `fastmteb.normalized_rows`). One
  big product would change the floats (MKL computes the last `k mod 4` columns of a wider product
  differently), so the loop stays; a candidate matrix equal to the previous sub-query's is gathered once.
- **mteb's results order without its dicts** (`result_rows`): with no tied scores `torch.topk` returns
  the candidates in descending order, and `heappush`ing a strictly decreasing sequence leaves item i at
  a heap slot that depends on the count alone (`heap_order`). A query with a tie, a repeated candidate
  or more than `top_k` candidates goes through mteb's own `topk`, `heappush` and dict, one at a time.
- **trec_eval** (pytrec_eval's numbers: trec_eval 9's `form_res_rels`, `m_ndcg_cut`, `m_map_cut`, `m_P`,
  `m_recall`, `m_success`): rank by score descending, ties by document id descending; with rel_i the
  qrels value at rank i (-1: not judged), R = #{qrels values >= 1}, m = min(k, retrieved) and
  c_k = #{i < m: rel_i >= 1}:

      P@k = c_k / k     recall@k = c_k / R (0 if R = 0)     success@k = 1.0 if c_k else 0.0
      map@k = (Σ_{i < m, rel_i >= 1} c_(i+1) / (i + 1)) / R                       (0 if R = 0)
      ndcg@k = DCG@k / IDCG@k (DCG@k if IDCG@k = 0),  DCG@k = Σ_{i < m, rel_i > 0} rel_i / d_i,
               d_i = log2(i + 2); IDCG@k the same sum over the query's positive qrels values
               sorted descending, its first min(k, #positive) terms

  each sum accumulated rank by rank in float64 (`np.cumsum` adds in order, as trec_eval's loops), log2
  from the C library (`math.log2`), as trec_eval's. tests/test_reranking.py checks every value against
  pytrec_eval on random rankings (ties, graded and unjudged documents, short and long lists).
- **MRR, confidence scores, nAUC, averages**: mteb's expressions on the same per-query values; each
  average is Python's `sum` of the per-query list in mteb's order, as mteb's.

The per-query values (`QueryValues`) of a query depend on that query alone, so the queries can be
split over processes (layertime/scoreparts.py) and put back in mteb's order before any average.

**Order.** mteb's loader builds the qrels from a polars `group_by(maintain_order=False)`, so their order
(which orders `max_over_subqueries`' queries, hence its sums) changes from load to load, and mteb's own
MindSmall scores with it, in the last bits. `prepare` puts the qrels in the queries' order first: a
result is then the one mteb computes on that order, the same in every process and run.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cache
from itertools import chain, repeat
from typing import Any

import numpy as np

from layertime.partload import base_query, part_of

logger = logging.getLogger(__name__)

NONPOOL = -1  # trec_eval's relevance of a retrieved document that is not in the qrels
CONFIDENCE = ("max", "std", "diff1")  # mteb's `confidence_scores` keys, in its order


class NotOnArrays(Exception):
    """The evaluation is outside what the arrays path reproduces; mteb's own code runs instead."""


# ---------------------------------------------------------------------------------------------- prepared


@dataclass
class Prepared:
    """One (split, subset) of a reranking task as arrays, independent of the embeddings: mteb's queries
    after its filter, in its results order, or the part of them a split evaluation computes."""

    query_ids: list[str]
    position: np.ndarray  # int64 [q]: index among all of mteb's queries (the order values are put back in)
    query_text_index: np.ndarray  # int64 [q]: into query_texts
    query_texts: list[str]  # distinct texts mteb's encoder gets for the queries, first-seen order
    doc_texts: list[str]  # per corpus document, the text mteb's encoder gets for it
    offsets: np.ndarray  # int64 [q + 1]: query i's candidates are [offsets[i], offsets[i + 1])
    candidate: np.ndarray  # int32 [c]: corpus position of each candidate
    relevance: np.ndarray  # int32 [c]: its qrels value for the query, NONPOOL if not judged
    one_at_a_time: np.ndarray  # bool [q]: a repeated candidate or more than top_k: mteb's own steps
    loop_order: np.ndarray  # int64 [q]: the order similarities are computed in (a group's together)
    same_as_previous: np.ndarray  # bool [q]: in loop order, the previous query has the same candidates
    num_rel: np.ndarray  # int64 [q]: R, qrels values >= 1
    idcg: np.ndarray  # float64 [q, K]: ideal DCG at each cutoff
    id_rank: np.ndarray  # int64 [corpus]: each document id's rank in string order (trec_eval's ties)
    qrels: Mapping[str, Mapping[str, int]]  # mteb's, for the queries merged one at a time
    top_ranked: Mapping[str, list[str]]
    k_values: tuple[int, ...]
    top_k: int
    groups: list[np.ndarray] | None  # max_over_subqueries: each query's sub-queries, in mteb's order
    group_aligned: np.ndarray | None  # bool [g]: its sub-queries all have one candidate list, no repeats

    @property
    def size(self) -> int:
        return len(self.query_ids)


def prepare(
    task: Any, split: dict[str, Any], hf_split: str, hf_subset: str, part: tuple[int, int] | None = None
) -> Prepared:
    """The arrays of one (split, subset) of a reranking task, or of part `(p, parts)` of its queries.

    Mirrors mteb's `AbsTaskRetrieval._evaluate_subset` up to the search (its query filter, applied to
    `split` in place as mteb applies it), `SearchEncoderWrapper.search` and
    `rerank_top_ranked_documents` (the texts encoded, `doc_id_to_idx`, each query's candidates). The
    qrels are put in the queries' order (module doc). NotOnArrays where the arrays path does not
    reproduce mteb; an unknown candidate id raises mteb's KeyError.
    """
    if split.get("top_ranked") is None:
        raise NotOnArrays("no pre-ranked candidates (full retrieval)")
    grouped = _max_over_subqueries(task)
    k_values = tuple(task.k_values)
    if list(k_values) != sorted(set(k_values)) or k_values[0] < 1:
        raise NotOnArrays(f"k values {k_values} are not increasing and positive")
    split["relevant_docs"], split["queries"] = _without_positives_filtered(
        split["relevant_docs"], split["queries"]
    )  # as mteb's _evaluate_subset, which keeps the filtered data too
    query_ids = list(split["queries"]["id"])
    if not query_ids or len(set(query_ids)) != len(query_ids):
        raise NotOnArrays("no queries, or repeated query ids")
    qrels = split["relevant_docs"] = _in_query_order(split["relevant_docs"], query_ids)
    if grouped and len(qrels) != len(query_ids):
        raise NotOnArrays("qrels of a query that is not in the queries (mteb's max_over_subqueries fails)")
    query_texts, doc_texts = encoded_texts(task, split)
    loaded = split.get("layertime_position")  # the part-loading loader's: each query's place in the data
    position = [loaded[q] for q in query_ids] if loaded is not None else list(range(len(query_ids)))
    mine = range(len(query_ids))
    if part is not None:
        mine = [i for i, q in enumerate(query_ids) if part_of(q, part[1], grouped) == part[0]]
    ids = [query_ids[i] for i in mine]
    distinct: dict[str, int] = {}
    text_index = [distinct.setdefault(query_texts[i], len(distinct)) for i in mine]
    corpus_ids = list(split["corpus"]["id"])
    groups = _subquery_groups(ids, qrels) if grouped else None
    loop_order = np.concatenate(groups) if groups else np.arange(len(ids), dtype=np.int64)
    candidates = _candidates(ids, split["top_ranked"], qrels, corpus_ids, task._top_k, loop_order)
    id_rank = np.empty(len(corpus_ids), dtype=np.int64)
    id_rank[sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__)] = np.arange(len(corpus_ids))
    prepared = Prepared(
        query_ids=ids,
        position=np.asarray([position[i] for i in mine], dtype=np.int64),
        query_text_index=np.asarray(text_index, dtype=np.int64),
        query_texts=list(distinct),
        doc_texts=doc_texts,
        id_rank=id_rank,
        qrels=qrels,
        top_ranked=split["top_ranked"],
        k_values=k_values,
        top_k=task._top_k,
        idcg=judged_idcg(*candidates.pop("judged"), len(ids), k_values),
        loop_order=loop_order,
        groups=groups,
        group_aligned=None,
        **candidates,
    )
    if groups is not None:
        same = np.empty(len(ids), dtype=bool)
        same[loop_order] = prepared.same_as_previous  # by query
        prepared.group_aligned = np.array(
            [not prepared.one_at_a_time[g].any() and same[g[1:]].all() for g in groups], dtype=bool
        )
    return prepared


def recorded_texts(task: Any, hf_cache: Any = None) -> tuple[list[str], int] | None:
    """What a recording pass of a reranking task (an unloaded task object) gives without scoring it:
    mteb's encoder gets, per (split, subset), every query mteb keeps (its filter) then every corpus
    document (`SearchEncoderWrapper.search`, then `rerank_top_ranked_documents`): (the distinct texts
    in first-seen order, how many texts it was passed). The task is loaded without its candidate lists
    (`partload.loading_part`: MindSmall's 97M ids are most of its memory). None for any other task,
    or another mteb than the verified one: those are recorded by an evaluation."""
    from layertime import fastmteb, partload

    if task.metadata.type != "Reranking" or not fastmteb.mteb_unchanged():
        return None
    with partload.loading_part((0, 1), splits_by_group(task), candidates=False):
        task.load_data()
    fastmteb.as_list_columns(task.dataset)
    seen: dict[str, None] = {}
    requested = 0
    for _, _, split in subsets(task):
        split["relevant_docs"], split["queries"] = _without_positives_filtered(
            split["relevant_docs"], split["queries"]
        )
        query_texts, doc_texts = encoded_texts(task, split)
        seen.update(dict.fromkeys(query_texts))
        seen.update(dict.fromkeys(doc_texts))
        requested += len(query_texts) + len(doc_texts)
    return list(seen), requested


def _without_positives_filtered(qrels: Mapping[str, Any], queries: Any) -> tuple[dict[str, Any], Any]:
    """mteb's `_filter_queries_without_positives`: the qrels with documents, and the queries that have
    them (`select` of the same rows; given as an array, whose fingerprint datasets hashes as one
    buffer, not element by element: 10 s for MindSmall's list)."""
    kept = {idx: docs for idx, docs in qrels.items() if len(docs) != 0}
    ids = queries["id"]
    indices = np.fromiter((i for i, id_ in enumerate(ids) if id_ in kept), dtype=np.int64)
    return kept, queries if len(indices) == len(ids) else queries.select(indices)


def encoded_texts(task: Any, split: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The texts mteb's encoder gets for the queries (each query's, in order) and for the corpus
    (each document's): mteb's own dataloaders for the corpus (titles, `Dataset.map`) and for queries
    that are not plain texts; plain text queries as `_combine_queries_with_instruction_text` makes
    them (a column that datasets would otherwise fingerprint text by text)."""
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    from layertime.fastmteb import ENCODE_BATCH, batch_texts

    def texts(data: Any, prompt_type: Any) -> list[str]:
        loader = create_dataloader(
            data, task_metadata=task.metadata, prompt_type=prompt_type, batch_size=ENCODE_BATCH
        )
        return batch_texts(loader)

    queries = split["queries"]
    if task.metadata.get_modalities(PromptType.query) == ["text"] and not isinstance(
        queries["text"][0], list
    ):
        query_texts = list(queries["text"])
        if "instruction" in queries.column_names:
            instructions = queries["instruction"]
            query_texts = [
                t + " " + i if i is not None else t for t, i in zip(query_texts, instructions, strict=True)
            ]
    else:
        query_texts = texts(queries, PromptType.query)
    return query_texts, texts(split["corpus"], PromptType.document)


def _in_query_order(qrels: Mapping[str, Any], query_ids: Sequence[str]) -> dict[str, Any]:
    """`qrels` with the queries' keys first, in the queries' order, then any others in theirs."""
    first = {q: qrels[q] for q in query_ids if q in qrels}
    return {**first, **{q: v for q, v in qrels.items() if q not in first}}


def splits_by_group(task: Any) -> bool:
    """Whether a split evaluation of `task` keeps `max_over_subqueries` groups together (MindSmall)."""
    from mteb.tasks.reranking.eng.mind_small_reranking import MindSmallReranking

    return type(task).task_specific_scores is MindSmallReranking.task_specific_scores


def _max_over_subqueries(task: Any) -> bool:
    """Whether the task's extra scores are MindSmall's `max_over_subqueries` (else none); NotOnArrays
    for any other extra scores or evaluation options (the arrays path has no pytrec_eval dicts)."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.tasks.reranking.eng.mind_small_reranking import MindSmallReranking

    if task.ignore_identical_ids or task.skip_first_result or task._previous_results_model_meta:
        raise NotOnArrays("identical-id filtering, a skipped first result or merged earlier results")
    specific = type(task).task_specific_scores
    if specific is MindSmallReranking.task_specific_scores:
        return True
    if specific is AbsTaskRetrieval.task_specific_scores:
        return False
    raise NotOnArrays(f"task-specific scores of {type(task).__name__}")


def _candidates(
    query_ids: Sequence[str],
    top_ranked: Mapping[str, list[str]],
    qrels: Mapping[str, Mapping[str, int]],
    corpus_ids: Sequence[str],
    top_k: int,
    loop_order: np.ndarray,
) -> dict[str, Any]:
    """Each query's candidates (corpus positions, qrels values), R and ideal DCGs, in compact arrays;
    whether each query in `loop_order` has the same candidate list as the one before it. Vectorised:
    MindSmall has 97M candidates, 2.36M qrels dicts.

    mteb's `doc_id_to_idx` maps a repeated corpus id to its last position: such a corpus, an unknown
    candidate id (mteb's KeyError), a query without candidates (an empty results dict) or qrels values
    that are not non-negative integers leave the arrays path (NotOnArrays).
    """
    lists = [top_ranked.get(q) for q in query_ids]
    if not all(lists):
        raise NotOnArrays("a query without pre-ranked documents")
    position_of = {doc: idx for idx, doc in enumerate(corpus_ids)}
    if len(position_of) != len(corpus_ids):
        raise NotOnArrays("repeated corpus ids")
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    try:
        candidate = np.fromiter(
            map(position_of.__getitem__, chain.from_iterable(lists)), np.int64, offsets[-1]
        )
    except KeyError:
        raise NotOnArrays("a candidate id that is not in the corpus (mteb: KeyError)") from None
    judged = [qrels[q] for q in query_ids]
    judged_lengths = np.fromiter(map(len, judged), dtype=np.int64, count=len(judged))
    values = list(chain.from_iterable(j.values() for j in judged))
    if not set(map(type, values)) <= {int} or (values and min(values) < 0):
        raise NotOnArrays("qrels values that are not non-negative integers")
    value = np.asarray(values, dtype=np.int64)
    judged_query = np.repeat(np.arange(len(judged)), judged_lengths)
    # each candidate's qrels value: (query, corpus position) keys looked up in the qrels' sorted keys
    n = len(corpus_ids) + 1
    at = np.fromiter(map(position_of.get, chain.from_iterable(judged), repeat(-1)), np.int64, len(values))
    keys = np.where(at >= 0, judged_query * n + at, -1)
    order = np.argsort(keys, kind="stable")
    keys, by_key = keys[order], value[order]
    wanted = np.repeat(np.arange(len(lists)), lengths) * n + candidate
    found = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    relevance = np.where(keys[found] == wanted, by_key[found], NONPOOL)
    one_at_a_time = lengths > top_k
    for k, members in _by_length(lengths):
        block = np.sort(candidate[offsets[members][:, None] + np.arange(k)], axis=1)
        one_at_a_time[members] |= (block[:, 1:] == block[:, :-1]).any(axis=1)  # a repeated id
    order = loop_order.tolist()
    same = [False] + [lists[a] == lists[b] for a, b in zip(order[1:], order[:-1], strict=True)]
    return {
        "offsets": offsets,
        "candidate": candidate.astype(np.int32),
        "relevance": relevance.astype(np.int32),
        "one_at_a_time": one_at_a_time,
        "same_as_previous": np.asarray(same, dtype=bool),
        "num_rel": np.bincount(judged_query, weights=value >= 1, minlength=len(judged)).astype(np.int64),
        "judged": (judged_query, value),
    }


def relevant_count(values: Sequence[int]) -> int:
    """trec_eval's R of a query: its qrels values >= 1 (pytrec_eval's relevance level)."""
    return sum(v >= 1 for v in values)


def ideal_gains(values: Sequence[int]) -> list[int]:
    """The gains of trec_eval's ideal ranking: the positive qrels values, largest first."""
    return sorted((v for v in values if v > 0), reverse=True)


def _subquery_groups(query_ids: Sequence[str], qrels: Mapping[str, Any]) -> list[np.ndarray]:
    """mteb's `max_over_subqueries` groups of `query_ids` (indices): the qrels keys in their order
    grouped by `base_query`, groups in the order of their first key (keys of other parts skipped)."""
    index = {q: i for i, q in enumerate(query_ids)}
    groups: dict[str, list[int]] = defaultdict(list)
    for key in qrels:
        if key in index:
            groups[base_query(key)].append(index[key])
    return [np.asarray(g, dtype=np.int64) for g in groups.values()]


def judged_idcg(query: np.ndarray, value: np.ndarray, queries: int, k_values: Sequence[int]) -> np.ndarray:
    """`ideal_dcg` of every query from its qrels values (`value[i]` is query `query[i]`'s)."""
    positive = value > 0
    query, value = query[positive], value[positive]
    order = np.lexsort((-value, query))  # by query, each one's values largest first
    query, value = query[order], value[order]
    counts = np.bincount(query, minlength=queries)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.zeros((queries, len(k_values)))
    for n, members in _by_length(counts):
        if n:
            gains = value[starts[members][:, None] + np.arange(n)].astype(np.float64)
            sums = np.cumsum(_discounted(gains), axis=1)
            out[members] = sums[:, [min(k, n) - 1 for k in k_values]]
    return out


def ideal_dcg(ideal: Sequence[Sequence[int]], k_values: Sequence[int]) -> np.ndarray:
    """trec_eval's ideal DCG of each query at each cutoff (module doc): float64 [q, K]."""
    out = np.zeros((len(ideal), len(k_values)))
    for n, members in _by_length(np.array([len(g) for g in ideal], dtype=np.int64)):
        if n == 0:
            continue
        sums = np.cumsum(_discounted(np.array([ideal[i] for i in members], dtype=np.float64)), axis=1)
        for j, k in enumerate(k_values):
            out[members, j] = sums[:, min(k, n) - 1]
    return out


@cache
def _log2_table(n: int) -> np.ndarray:
    """The DCG discounts d_i = log2(i + 2) of ranks i < n (the C library's log2, as trec_eval's)."""
    return np.array([math.log2(float(i + 2)) for i in range(n)])


def _discounted(gains: np.ndarray) -> np.ndarray:
    """gain_i / d_i rank by rank ([n, k] float64); gains <= 0 add nothing (0.0)."""
    terms = gains / _log2_table(gains.shape[1])
    terms[gains <= 0] = 0.0
    return terms


@cache
def heap_order(n: int) -> np.ndarray:
    """Where `heapq.heappush` puts the items of a strictly decreasing sequence of n: heap slot j holds
    item `heap_order(n)[j]`. Each new item is below all before it and rises to the root along the same
    path whatever the values, so the layout depends on n alone."""
    heap: list[int] = []
    for item in range(n):
        heapq.heappush(heap, n - item)  # decreasing keys
    return np.array([n - key for key in heap], dtype=np.int64)


def _by_length(length: np.ndarray, rows: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(n, the rows of length n in order) for each length n among `rows` (default: all)."""
    rows = np.arange(len(length)) if rows is None else rows
    if rows.size == 0:
        return
    lengths = length[rows]
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    bounds = np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        yield int(sorted_lengths[a]), rows[order[a:b]]


# ---------------------------------------------------------------------------------------------- similarity


def query_rows(prepared: Prepared, encoder: Any) -> np.ndarray:
    """The embedding row of each distinct query text (LookupMiss for one the embeddings lack)."""
    return np.asarray(encoder.rows(prepared.query_texts), dtype=np.int64)


def doc_rows(prepared: Prepared, encoder: Any) -> np.ndarray:
    return np.asarray(encoder.rows(prepared.doc_texts), dtype=np.int64)


def similarities(
    prepared: Prepared, matrix: np.ndarray, q_rows: np.ndarray, d_rows: np.ndarray
) -> np.ndarray:
    """Each candidate's cosine similarity with its query, float32 [c], by mteb's per-sub-query product
    `a_norm @ b_norm.transpose(0, 1)` of a fresh [1, d] query and a fresh [k, d] candidate gather.

    A NaN score raises mteb's ValueError for the first query that has one (with its count), after all
    are computed: with every normalised row finite no score can be NaN, so that is rare.
    """
    import torch

    from layertime.fastmteb import normalized_rows

    query_norm = normalized_rows(matrix, q_rows)
    vectors = [query_norm[i : i + 1].clone() for i in range(len(q_rows))]  # fresh [1, d] tensors
    del query_norm
    doc_norm = normalized_rows(matrix, d_rows)
    out = np.empty(len(prepared.candidate), dtype=np.float32)
    positions = torch.from_numpy(prepared.candidate.astype(np.int64))
    offsets, slots = prepared.offsets.tolist(), prepared.query_text_index.tolist()
    index_select, candidates = torch.index_select, None
    for i, same in zip(prepared.loop_order.tolist(), prepared.same_as_previous.tolist(), strict=True):
        start, stop = offsets[i], offsets[i + 1]
        if not same:  # else the previous query's list: the same [k, d] values, gathered once
            candidates = index_select(doc_norm, 0, positions[start:stop])
        out[start:stop] = (vectors[slots[i]] @ candidates.transpose(0, 1)).numpy()[0]
    if np.isnan(out).any():
        first = int(np.searchsorted(prepared.offsets, np.flatnonzero(np.isnan(out))[0], side="right")) - 1
        is_nan = torch.isnan(torch.from_numpy(out[offsets[first] : offsets[first + 1]]))
        raise ValueError(f"NaN values detected in the similarity scores: {is_nan.sum()}")
    return out


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Block:
    """mteb's results of queries with the same number of results, as arrays: the scores in the results
    dict's order (what np.std sums), the qrels values of the results in trec_eval's ranking, and (for
    `max_over_subqueries`) each dict entry's index in the query's candidate list (-1: not known)."""

    queries: np.ndarray  # int64 [m]
    values: np.ndarray  # float64 [m, n], dict order
    ranked_relevance: np.ndarray  # int64 [m, n], rank order
    dict_candidates: np.ndarray  # int64 [m, n], dict order


@dataclass
class Rows:
    """mteb's results of `size` queries (or `max_over_subqueries` groups), in blocks by length."""

    size: int
    blocks: list[Block]

    def dict_candidates(self, queries: np.ndarray) -> np.ndarray:
        """[len(queries), n] candidate indices in dict order, for queries that all have n results."""
        block_of = np.empty(self.size, dtype=np.int64)
        row_of = np.empty(self.size, dtype=np.int64)
        for b, block in enumerate(self.blocks):
            block_of[block.queries], row_of[block.queries] = b, np.arange(len(block.queries))
        out = None
        for b in np.unique(block_of[queries]).tolist():
            mine = block_of[queries] == b
            found = self.blocks[b].dict_candidates[row_of[queries[mine]]]
            out = np.empty((len(queries), found.shape[1]), dtype=np.int64) if out is None else out
            out[mine] = found
        return out


def result_rows(prepared: Prepared, scores: np.ndarray) -> Rows:
    """mteb's results of every prepared query from its candidates' scores (module doc)."""
    blocks = []
    scores64 = scores.astype(np.float64)
    one_at_a_time = np.flatnonzero(prepared.one_at_a_time).tolist()
    length = np.diff(prepared.offsets)
    for k, members in _by_length(length, np.flatnonzero(~prepared.one_at_a_time)):
        cells = prepared.offsets[members][:, None] + np.arange(k)  # [m, k] flat candidate indices
        block = scores64[cells]
        # float32 keys sort as their float64 values do, and faster
        descending = np.argsort(-scores[cells], axis=1, kind="stable")
        ranked = np.take_along_axis(block, descending, axis=1)
        tied = (ranked[:, 1:] == ranked[:, :-1]).any(axis=1)
        one_at_a_time += members[tied].tolist()
        keep = ~tied
        descending, cells = descending[keep], cells[keep]
        in_dict = descending[:, heap_order(k)]
        blocks.append(
            Block(
                members[keep],
                np.take_along_axis(block[keep], in_dict, axis=1),
                prepared.relevance[np.take_along_axis(cells, descending, axis=1)].astype(np.int64),
                in_dict,
            )
        )
    singles = {
        i: _one_query(prepared, prepared.query_ids[i], scores[prepared.offsets[i] : prepared.offsets[i + 1]])
        for i in sorted(one_at_a_time)
    }
    return Rows(prepared.size, blocks + _stacked(singles))


def _stacked(rows: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[Block]:
    """Rows computed one at a time ({query: (values, ranked relevance, dict candidates)}) as blocks."""
    if not rows:
        return []
    queries = np.array(list(rows), dtype=np.int64)
    lengths = np.array([len(r[0]) for r in rows.values()], dtype=np.int64)
    listed = list(rows.values())
    return [
        Block(queries[members], *(np.stack([listed[i][f] for i in members]) for f in range(3)))
        for _, members in _by_length(lengths)
    ]


def _one_query(prepared: Prepared, qid: str, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mteb's own steps for one query: `torch.topk`, `heappush`s, the results dict
    (`rerank_top_ranked_documents`, `SearchEncoderWrapper.search`); then trec_eval's ranking by
    (score, id) descending and the qrels values in it."""
    import torch

    ranked_ids = prepared.top_ranked[qid]
    tensor = torch.from_numpy(scores.copy()).unsqueeze(0)
    top_values, top_index = torch.topk(tensor, min(prepared.top_k, len(ranked_ids)), dim=1, largest=True)
    heap: list[tuple[float, str]] = []
    for doc_idx, score in zip(top_index[0].tolist(), top_values[0].tolist(), strict=True):
        heapq.heappush(heap, (score, ranked_ids[doc_idx]))
    results = {corpus_id: score for score, corpus_id in heap}
    first = {doc_id: j for j, doc_id in reversed(list(enumerate(ranked_ids)))}
    return _dict_row(results, prepared.qrels[qid], first)


def _dict_row(
    results: Mapping[str, float], judged: Mapping[str, int], candidate_index: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A results dict as a row: its values, the qrels values in trec_eval's ranking, candidate indices."""
    ranking = sorted(results.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return (
        np.array(list(results.values()), dtype=np.float64),
        np.array([judged.get(doc_id, NONPOOL) for doc_id, _ in ranking], dtype=np.int64),
        np.array([candidate_index.get(doc_id, -1) for doc_id in results], dtype=np.int64),
    )


def merged_rows(prepared: Prepared, rows: Rows, scores: np.ndarray) -> Rows:
    """mteb's `max_over_subqueries` results, one per group: each document's score the running Python
    `max(score, kept)` over the sub-queries in order (kept unless the new score is greater), in the order
    documents first appear; its qrels are the group's last sub-query's ("all the same" in mteb)."""
    groups, aligned = prepared.groups, prepared.group_aligned
    scores64 = scores.astype(np.float64)
    offsets = prepared.offsets
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    lengths = np.array([offsets[g[0] + 1] - offsets[g[0]] for g in groups], dtype=np.int64)
    blocks = []
    for (m, k), members in _by_pair(sizes, lengths, np.flatnonzero(aligned)):
        subs = np.stack([groups[g] for g in members])  # [G, m] sub-queries, in order
        cells = offsets[subs][:, :, None] + np.arange(k)  # [G, m, k]
        merged = scores64[cells[:, 0]]
        for t in range(1, m):
            new = scores64[cells[:, t]]
            merged = np.where(merged > new, merged, new)  # Python's max(new, kept)
        first_dict = rows.dict_candidates(subs[:, 0])  # [G, k]: the first sub-query's dict order
        last_rel = prepared.relevance[cells[:, -1]].astype(np.int64)  # [G, k], candidate order
        ranked = _ranking(merged, prepared.id_rank[prepared.candidate[cells[:, 0]]])
        values = np.take_along_axis(merged, first_dict, axis=1)
        blocks.append(Block(members, values, np.take_along_axis(last_rel, ranked, axis=1), first_dict))
    singles = {}
    for g in np.flatnonzero(~aligned).tolist():
        doc_scores: dict[str, float] = {}
        for s in groups[g].tolist():
            ranked_ids = prepared.top_ranked[prepared.query_ids[s]]
            found = _row_of(rows, s)
            for j, score in zip(found[2].tolist(), found[0].tolist(), strict=True):
                doc_id = ranked_ids[j]
                doc_scores[doc_id] = score if doc_id not in doc_scores else max(score, doc_scores[doc_id])
        last = prepared.query_ids[groups[g][-1]]
        singles[g] = _dict_row(doc_scores, prepared.qrels[last], {})
    return Rows(len(groups), blocks + _stacked(singles))


def _row_of(rows: Rows, query: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query's (values, ranked relevance, dict candidates)."""
    for block in rows.blocks:
        hit = np.flatnonzero(block.queries == query)
        if hit.size:
            r = hit[0]
            return block.values[r], block.ranked_relevance[r], block.dict_candidates[r]
    raise KeyError(query)


def _by_pair(a: np.ndarray, b: np.ndarray, rows: np.ndarray) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """((a, b), the rows with those values, in order) for each pair among `rows`."""
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for r, x, y in zip(rows.tolist(), a[rows].tolist(), b[rows].tolist(), strict=True):
        buckets[x, y].append(r)
    for key, members in buckets.items():
        yield key, np.asarray(members, dtype=np.int64)


def _ranking(values: np.ndarray, id_rank: np.ndarray) -> np.ndarray:
    """trec_eval's ranking of each row ([n, k]): score descending, ties by document id descending."""
    order = np.argsort(-values, axis=1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=1)
    tied = np.flatnonzero((ranked[:, 1:] == ranked[:, :-1]).any(axis=1))
    if tied.size:
        order[tied] = np.lexsort((-id_rank[tied], -values[tied]), axis=-1)
    return order


# ---------------------------------------------------------------------------------------------- values


@dataclass
class QueryValues:
    """Per query, what mteb's averages and nAUCs of its reranking scores are computed from.

    P, recall, success and MRR are exact functions of the counts kept here (`retrieval_scores`).
    """

    position: np.ndarray  # int64 [n]: the order of the queries in mteb's lists
    ndcg: np.ndarray  # float64 [n, K]
    map: np.ndarray  # float64 [n, K]
    rel_ret: np.ndarray  # int64 [n, K]: c_k, relevant results in the first min(k, retrieved)
    num_rel: np.ndarray  # int64 [n]: R
    first_relevant: np.ndarray  # int64 [n]: rank of the first result with qrels value > 0, -1 if none
    confidence: np.ndarray  # float64 [n, 3]: mteb's max, std, diff1 of the result scores

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def joined(cls, parts: Sequence[QueryValues]) -> QueryValues:
        """The parts' queries together, in the order of their positions (mteb's)."""
        position = np.concatenate([p.position for p in parts])
        order = np.argsort(position, kind="stable")
        if np.any(np.diff(position[order]) == 0):
            raise ValueError("a query is in two parts")
        return cls(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts])[order] for f in fields(cls)}
        )


def query_values(
    rows: Rows, num_rel: np.ndarray, idcg: np.ndarray, position: np.ndarray, k_values: Sequence[int]
) -> QueryValues:
    """trec_eval's and mteb's per-query values of `rows` (module doc), block by block."""
    n, K = rows.size, len(k_values)
    out = QueryValues(
        position=position.astype(np.int64),
        ndcg=np.zeros((n, K)),
        map=np.zeros((n, K)),
        rel_ret=np.zeros((n, K), dtype=np.int64),
        num_rel=num_rel.astype(np.int64),
        first_relevant=np.full(n, -1, dtype=np.int64),
        confidence=np.zeros((n, len(CONFIDENCE))),
    )
    for block in rows.blocks:
        members, rel, values = block.queries, block.ranked_relevance, block.values
        k = rel.shape[1]
        if k == 0:
            raise NotOnArrays("a query without results")
        relevant = rel >= 1
        count = np.cumsum(relevant, axis=1)
        precision_terms = np.where(relevant, count / np.arange(1, k + 1, dtype=np.float64), 0.0)
        map_sums = np.cumsum(precision_terms, axis=1)
        dcg = np.cumsum(_discounted(rel.astype(np.float64)), axis=1)
        r = num_rel[members].astype(np.float64)[:, None]
        cut = [min(kv, k) - 1 for kv in k_values]
        out.rel_ret[members] = count[:, cut]
        with np.errstate(divide="ignore", invalid="ignore"):
            out.map[members] = np.where(r > 0, map_sums[:, cut] / r, 0.0)
            ideal = idcg[members]
            out.ndcg[members] = np.where(ideal > 0.0, dcg[:, cut] / ideal, dcg[:, cut])
        hit = rel > 0
        out.first_relevant[members] = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
        ascending = np.sort(values, axis=1, kind="stable")
        out.confidence[members, 0] = ascending[:, -1]
        out.confidence[members, 1] = np.std(values, axis=1)
        out.confidence[members, 2] = ascending[:, -1] - ascending[:, -2] if k > 1 else 0.0
    return out


def layer_values(
    prepared: Prepared, encoder: Any, timer: Any = None, split: str = "", subset: str = ""
) -> tuple[QueryValues, QueryValues | None]:
    """The per-query values of one layer's embeddings (`encoder`: a bridge.LookupEncoder) on the prepared
    queries, and of their `max_over_subqueries` groups (None for other tasks). `timer` (mteb's
    TimingStack) records mteb's phases."""
    from contextlib import nullcontext

    def phase(name: str) -> Any:
        return timer(name, split=split, subset=subset) if timer is not None else nullcontext()

    with phase("Encoding queries"):
        q_rows = query_rows(prepared, encoder)
    with phase("Encoding corpus"):
        d_rows = doc_rows(prepared, encoder)
    with phase("Computing similarity"):
        scores = similarities(prepared, encoder.matrix, q_rows, d_rows)
    with phase("Scoring"):
        rows = result_rows(prepared, scores)
        sub = query_values(rows, prepared.num_rel, prepared.idcg, prepared.position, prepared.k_values)
        base = None
        if prepared.groups is not None:
            merged = merged_rows(prepared, rows, scores)
            last = np.array([g[-1] for g in prepared.groups], dtype=np.int64)
            first = np.array([g[0] for g in prepared.groups], dtype=np.int64)
            base = query_values(
                merged,
                prepared.num_rel[last],
                prepared.idcg[last],
                prepared.position[first],
                prepared.k_values,
            )
    return sub, base


# ---------------------------------------------------------------------------------------------- scores


def retrieval_scores(values: QueryValues, k_values: Sequence[int]) -> dict[str, dict[str, float]]:
    """mteb's `calculate_retrieval_scores` results (but the per-query dicts) from per-query values:
    keyword arguments of mteb's `make_score_dict`."""
    from layertime.fastmteb import abstention_naucs

    n = len(values.position)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(values.num_rel[:, None] > 0, values.rel_ret / values.num_rel[:, None], 0.0)
    precision = values.rel_ret / np.asarray(k_values, dtype=np.float64)
    hit = np.where(values.rel_ret > 0, 1.0, 0.0)
    first = values.first_relevant[:, None]
    with np.errstate(divide="ignore"):
        mrr = np.where((first >= 0) & (first < np.asarray(k_values)), 1.0 / (first + 1), 0.0)
    # Per-query columns stay arrays: as Python lists (mteb's form) MindSmall's 2.4M sub-queries x 6
    # measures x len(k_values) floats took ~3 GiB in the merge process. A sum is taken over one column's
    # list at a time (Python's `sum` over Python floats, in order, as mteb's: bit-identical), and
    # `abstention_naucs` reads the arrays as it read the lists (np.array of either: the same float64s).
    lists: dict[str, dict[str, np.ndarray]] = {
        "NDCG": {},
        "MAP": {},
        "Recall": {},
        "P": {},
        "HitRate": {},
        "MRR": {},
    }
    for j, k in enumerate(k_values):
        for name, table in (("NDCG", values.ndcg), ("MAP", values.map), ("Recall", recall), ("P", precision),
                            ("HitRate", hit), ("MRR", mrr)):  # fmt: skip
            lists[name][f"{name}@{k}"] = table[:, j]

    def mean(name: str) -> dict[str, float]:  # parse_metrics_from_scores: Python's sum, in order
        return {key: round(sum(column.tolist()) / n, 5) for key, column in lists[name].items()}

    confidence = {fct: values.confidence[:, j] for j, fct in enumerate(CONFIDENCE)}
    metrics = {**lists["NDCG"], **lists["MAP"], **lists["Recall"], **lists["P"]}
    return {
        "ndcg": mean("NDCG"),
        "_map": mean("MAP"),
        "recall": mean("Recall"),
        "precision": mean("P"),
        "naucs": abstention_naucs(confidence, metrics),
        "mrr": {key: sum(column.tolist()) / len(column) for key, column in lists["MRR"].items()},
        "naucs_mrr": abstention_naucs(confidence, lists["MRR"]),
        "hit_rate": mean("HitRate"),
    }


def score_dict(sub: QueryValues, base: QueryValues | None, k_values: Sequence[int]) -> dict[str, Any]:
    """What mteb's `AbsTaskRetrieval._evaluate_subset` returns for the queries of `sub` (and, for
    MindSmall, `max_over_subqueries` of the groups of `base`), keys in its order."""
    from mteb._evaluators.retrieval_metrics import make_score_dict

    task_scores = {}
    if base is not None:  # max_over_subqueries
        merged = make_score_dict(**retrieval_scores(base, k_values), task_scores={})
        task_scores = {"max_over_subqueries_" + k: v for k, v in merged.items()}
    return make_score_dict(
        **retrieval_scores(sub, k_values), task_scores=task_scores, previous_results_model_meta=None
    )


# ---------------------------------------------------------------------------------------------- in mteb


def prepared_for(
    task: Any, split: dict[str, Any], hf_split: str, hf_subset: str, part: tuple[int, int] | None = None
) -> Prepared | None:
    """`prepare`d once per loaded (split, subset) [and part] and kept on the task (None: NotOnArrays)."""
    kept = task.__dict__.setdefault("_layertime_prepared", {})
    key = (hf_split, hf_subset, part)
    if key in kept and kept[key][0] is split:
        return kept[key][1]
    try:
        prepared = prepare(task, split, hf_split, hf_subset, part)
    except NotOnArrays as e:
        logger.info(f"{task.metadata.name}: mteb's own reranking and metrics ({e})")
        prepared = None
    kept[key] = (split, prepared)
    return prepared


def evaluate_subset(
    task: Any,
    mteb_evaluate_subset: Any,
    model: Any,
    data_split: dict[str, Any],
    *,
    encode_kwargs: Any,
    hf_split: str,
    hf_subset: str,
    prediction_folder: Any = None,
    num_proc: int | None = None,
    timer: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    """`AbsTaskRetrieval._evaluate_subset` on arrays when it applies (same scores, same phase names),
    else mteb's own (`mteb_evaluate_subset`)."""
    from layertime.fastmteb import fast_rerank_applies

    encoder = getattr(model, "model", model)  # fastmteb.FastRerankSearch wraps the encoder
    if prediction_folder is None and not kwargs and fast_rerank_applies(encoder):
        prepared = prepared_for(task, data_split, hf_split, hf_subset)
        if prepared is not None:
            sub, base = layer_values(prepared, encoder, timer, hf_split, hf_subset)
            return score_dict(sub, base, prepared.k_values)
    return mteb_evaluate_subset(
        model, data_split, encode_kwargs=encode_kwargs, hf_split=hf_split, hf_subset=hf_subset,
        prediction_folder=prediction_folder, num_proc=num_proc, timer=timer, **kwargs,
    )  # fmt: skip


@contextmanager
def on_arrays(task: Any, active: bool = True) -> Iterator[None]:
    """A retrieval task's `_evaluate_subset` through `evaluate_subset` while the context lasts (when
    `active`): set on this task object only (the caller holds its lock), so no other evaluation sees it."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    from layertime.fastmteb import mteb_unchanged

    if not (active and isinstance(task, AbsTaskRetrieval) and mteb_unchanged()):
        yield
        return
    own = type(task)._evaluate_subset.__get__(task)
    task._evaluate_subset = functools.partial(evaluate_subset, task, own)
    try:
        yield
    finally:
        del task._evaluate_subset


# ---------------------------------------------------------------------------------------------- split


def subsets(task: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(split, subset, its data) of every evaluation `mteb.evaluate` runs on `task`, in its order
    (`_evaluate_task` per eval split, `AbsTask.evaluate` per subset)."""
    for split in task.eval_splits:
        for subset in list(task.hf_subsets):
            data = (
                task.dataset[split]
                if subset not in task.dataset and subset == "default"
                else task.dataset[subset][split]
            )
            yield split, subset, data


def part_values(
    task: Any, encoder: Any, part: tuple[int, int]
) -> dict[tuple[str, str], tuple[QueryValues, QueryValues | None]]:
    """The per-query values of part `part = (p, parts)` of every (split, subset) of a loaded reranking
    task, for one layer's embeddings. A task the arrays path cannot score cannot be split (NotOnArrays)."""
    from layertime.fastmteb import fast_rerank_applies, mteb_unchanged

    if not (mteb_unchanged() and fast_rerank_applies(encoder)):
        raise NotOnArrays(
            f"{task.metadata.name} cannot be scored in parts: mteb or the embeddings are not the verified kind"
        )
    out = {}
    for split, subset, data in subsets(task):
        prepared = prepared_for(task, data, split, subset, part)
        if prepared is None:
            raise NotOnArrays(
                f"{task.metadata.name} ({split}, {subset}) cannot be scored in parts (logged why)"
            )
        out[split, subset] = layer_values(prepared, encoder)
    return out


def merged_scores(
    task: Any, parts: Sequence[Mapping[tuple[str, str], tuple[QueryValues, QueryValues | None]]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """The scores mteb's evaluation of the whole task gives, from its parts' values: split -> subset ->
    scores (main score included), as `_evaluate_task` collects them."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split, subset in _names(task):
        sub = QueryValues.joined([p[split, subset][0] for p in parts])
        bases = [p[split, subset][1] for p in parts]
        base = None if bases[0] is None else QueryValues.joined(bases)
        scores = score_dict(sub, base, tuple(task.k_values))
        task._add_main_score(scores)
        out.setdefault(split, {})[subset] = scores
    return out


def _names(task: Any) -> Iterator[tuple[str, str]]:
    """(split, subset) in `subsets`' order, without the task's data."""
    for split in task.eval_splits:
        for subset in list(task.hf_subsets):
            yield split, subset
