"""Loading a part of a reranking task: mteb's retrieval loader keeping only some queries' rows, so a
process of a split evaluation (layertime/scoreparts.py) never holds the others (docs/design.md §10).

Which part a query is in is a hash of its group (`part_of`): the query of mteb's `max_over_subqueries`
for MindSmallReranking, so a group is never split, the same in every process.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def base_query(query_id: str) -> str:
    """The query a sub-query id belongs to, as mteb's `max_over_subqueries` groups them ("<q>_<n>")."""
    return "_".join(query_id.split("_")[:-1])


def part_of(query_id: str, parts: int, grouped: bool) -> int:
    """The part (0 .. parts-1) of a split evaluation a query is in: a hash of its group (its query of
    `max_over_subqueries` when `grouped`), so a group is never split, the same in every process."""
    key = base_query(query_id) if grouped else query_id
    return zlib.crc32(key.encode()) % parts


_PART = threading.local()  # the part this thread's task loads are for (`loading_part`)
_INSTALLED: list[bool] = []
_INSTALL = threading.Lock()


@contextmanager
def loading_part(part: tuple[int, int] | None, grouped: bool, candidates: bool = True) -> Iterator[None]:
    """mteb's retrieval loader, in this thread, keeps only part `(p, parts)`'s queries: their qrels and
    candidate lists are filtered while still arrow/polars rows, so the others never become Python
    objects (MindSmall's 97M candidate ids are most of its memory); without `candidates`, none at all
    (a recording pass needs only the texts). See `_load`."""
    _install_loader()
    _PART.value = (part, grouped, candidates)
    try:
        yield
    finally:
        _PART.value = None


def _install_loader() -> None:
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalDatasetLoader

    with _INSTALL:
        if not _INSTALLED:
            own = RetrievalDatasetLoader.load

            def load(self: Any, num_proc: int | None = None) -> Any:
                active = getattr(_PART, "value", None)
                return own(self, num_proc) if active is None else _load(self, num_proc, *active)

            RetrievalDatasetLoader.load = load
            _INSTALLED.append(True)


def _load(loader: Any, num_proc: int | None, part: tuple[int, int], grouped: bool, candidates: bool) -> Any:
    """mteb's `RetrievalDatasetLoader.load` (and its `_load_qrels`, `_load_top_ranked`) for the queries
    of `part` only: the same steps on their rows, and each query's position in the queries dataset
    (`layertime_position`, the order a merge puts them back in)."""
    import polars as pl
    from datasets import Features, Sequence, Value
    from mteb.abstasks.retrieval_dataset_loaders import (
        RetrievalSplitData,
        _combine_queries_with_instructions_datasets,
    )

    queries = loader._load_queries(num_proc)
    all_ids = list(queries["id"])
    mine = pl.Series([q for q in all_ids if part_of(q, part[1], grouped) == part[0]], dtype=pl.String)

    config = f"{loader.config}-qrels" if loader.config is not None else "default"
    if config == "default" and config not in loader.dataset_configs:
        if "qrels" not in loader.dataset_configs:
            raise ValueError(
                "No qrels or default config found. Please specify a valid config or ensure the dataset has qrels."
            )
        config = "qrels"
    qrels_ds = loader._load_dataset_split(config, num_proc).select_columns(["query-id", "corpus-id", "score"])
    qrels_ds = qrels_ds.cast(
        Features({"query-id": Value("string"), "corpus-id": Value("string"), "score": Value("int32")})
    )
    qrels_ds = qrels_ds.to_polars().filter(pl.col("query-id").is_in(mine))
    qrels = {
        query_id[0]: dict(zip(group["corpus-id"], group["score"], strict=True))
        for query_id, group in qrels_ds.group_by("query-id", maintain_order=False)
    }
    del qrels_ds
    corpus = loader._load_corpus(num_proc)
    indices = [i for i, id_ in enumerate(all_ids) if id_ in qrels]
    queries = queries.select(indices)

    top_ranked = None
    top_config = f"{loader.config}-top_ranked" if loader.config is not None else "top_ranked"
    if top_config in loader.dataset_configs and candidates:
        ranked_ds = loader._load_dataset_split(top_config, num_proc)
        ranked_ds = ranked_ds.cast(
            Features({"query-id": Value("string"), "corpus-ids": Sequence(Value("string"))})
        )
        ranked_ds = ranked_ds.select_columns(["query-id", "corpus-ids"]).to_polars()
        ranked_ds = ranked_ds.filter(pl.col("query-id").is_in(mine))
        top_ranked = dict(
            zip(ranked_ds["query-id"].to_list(), ranked_ds["corpus-ids"].to_list(), strict=True)
        )
        del ranked_ds
    instruction_config = f"{loader.config}-instruction" if loader.config is not None else "instruction"
    if instruction_config in loader.dataset_configs:
        queries = _combine_queries_with_instructions_datasets(
            queries, loader._load_instructions(num_proc), num_proc
        )
    split = RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=qrels, top_ranked=top_ranked)
    split["layertime_position"] = {all_ids[i]: i for i in indices}
    return split
