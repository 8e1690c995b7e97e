"""Five small local mteb tasks, one of each type the suite scores, built in code from the demo corpus.

The real suite (docs/design.md §4) scores a layer on Classification, Clustering, PairClassification,
Reranking and STS tasks from `MTEB(eng, v1)`. Tests cannot reach the Hugging Face hub, so this module
gives one task of each type whose data are generated in memory by `layertime.demo.corpus`:

- `DemoClassification`: 240 train / 120 test sentences, label = topic (6 balanced classes). Scored by
  mteb's usual logistic regression on embeddings, trained on 8 sampled sentences per label in each of
  10 experiments (40 per label in train, so the undersampling really samples, as in the real tasks).
- `DemoClustering`: 2 sets of 75 short paragraphs (3 sentences on one topic), label = topic, in the
  legacy per-set format (`AbsTaskClusteringLegacy`) that all six v1 clustering tasks
  (ArxivClusteringS2S, TwentyNewsgroupsClustering, ...) use in mteb 2.26.
- `DemoPairClassification`: 200 pairs; positives are a sentence and a rewording of it, negatives are
  two sentences of the same topic or of two different topics.
- `DemoReranking`: 30 queries, each with its own list of 10 candidates (3 relevant: a rewording of the
  query and two more sentences on its topic; 7 on other topics), in the retrieval-style format with
  `top_ranked` that the v1 reranking tasks (SciDocsRR, AskUbuntuDupQuestions, ...) were converted to.
- `DemoSTS`: 100 pairs graded 0-5: rewordings 4-5, same topic 2-3.5, different topics 0-1, each
  graded within its band by word overlap.

Why they are learnable: every sentence mixes a few words of its topic with filler shared by all
topics, so the topic (and how close two sentences are) lives in the bag of words, though no single
filler word gives it away. An encoder that weights words by how informative they are beats chance
clearly on all five (an IDF-weighted hashing bag of words: accuracy 0.59, v_measure 0.58, max_ap
1.00, MAP 0.73, Spearman 0.87), while random vectors score at chance (0.17, 0.13, 0.50, 0.49, -0.07).
Plain word counts are swamped by the filler ('the', 'about'): they do as well on the pair tasks
(1.00, 0.71, 0.81) but reach only 0.36 accuracy and 0.23 v_measure.

The data depend only on fixed seeds, so every machine builds identical tasks; `load_data()` builds
them in memory and never calls `datasets.load_dataset`. Each task records a fixed dataset revision
(`DEMO_DATA_REVISION`): bump it whenever the generated data change, so results say which data they
came from.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from layertime.demo.corpus import TOPICS, VERBS, labelled_sentences, paraphrase, sentence

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask

DEMO_DATA_REVISION = "demo-v2"  # v2: hard, topic-swapped negatives in DemoPairClassification
TOPIC_NAMES: list[str] = sorted(TOPICS)
SPLIT = "test"
SUBSET = "default"  # a monolingual mteb task has the single hf subset "default"

# Sizes: small enough that a full mteb.evaluate of all five tasks takes seconds on a CPU.
N_TRAIN, N_TEST = 240, 120
N_CLUSTER_SETS, CLUSTER_SET_SIZE, SENTENCES_PER_CLUSTER_ITEM = 2, 75, 3
N_PAIR_POSITIVE, N_PAIR_SAME_TOPIC, N_PAIR_OTHER_TOPIC, N_PAIR_SWAPPED = 100, 35, 35, 30
N_QUERIES, N_RELATED, N_UNRELATED = 30, 2, 7  # + 1 rewording of the query = 3 relevant of 10
N_STS_REWORDED, N_STS_SAME_TOPIC, N_STS_OTHER_TOPIC = 34, 33, 33

# (base, span) of the gold STS score per kind of pair: base + span * word overlap, bands never overlap.
STS_BANDS: dict[str, tuple[float, float]] = {"reworded": (4.0, 1.0), "same": (2.0, 1.5), "other": (0.0, 1.0)}

# One fixed seed per task, so changing one task's size never changes another task's data.
SEEDS: dict[str, int] = {
    "DemoClassification": 101,
    "DemoClustering": 202,
    "DemoPairClassification": 303,
    "DemoReranking": 404,
    "DemoSTS": 505,
}


# ---------------------------------------------------------------- text helpers


def fresh_sentence(rng: random.Random, topic: str, seen: set[str]) -> str:
    """A sentence on `topic` not in `seen` (then added): no text may appear twice within a task."""
    while True:
        text = sentence(rng, topic)
        if text not in seen:
            seen.add(text)
            return text


def reword(rng: random.Random, text: str) -> str:
    """A paraphrase of `text` that always differs from it: `corpus.paraphrase` plus a new verb.

    `corpus.paraphrase` only swaps adjectives, and leaves a sentence without one unchanged; a
    positive pair of two identical texts would be trivial, so the verb phrase is swapped too.
    """
    text = paraphrase(rng, text)
    verb = next((v for v in VERBS if f" {v} " in text), None)
    if verb is None:
        raise ValueError(f"no verb phrase from corpus.VERBS in {text!r}; reword() needs one")
    return text.replace(f" {verb} ", f" {rng.choice([v for v in VERBS if v != verb])} ", 1)


def fresh_rewording(rng: random.Random, text: str, seen: set[str]) -> str:
    """A rewording of `text` not in `seen` (then added)."""
    while True:
        out = reword(rng, text)
        if out not in seen:
            seen.add(out)
            return out


def swap_topic(rng: random.Random, text: str, topic: str) -> str:
    """`text` with its topic words replaced by another topic's: nearly the same words, another meaning."""
    new = other_topic(rng, topic)
    mapping = dict(zip(TOPICS[topic], rng.sample(TOPICS[new], len(TOPICS[new])), strict=True))
    return " ".join(
        mapping.get(w.strip(".,"), w.strip(".,")) + w[len(w.strip(".,")) :] for w in text.split(" ")
    )


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the lower-cased word sets of `a` and `b`."""
    wa, wb = (set(t.lower().replace(",", "").rstrip(".").split()) for t in (a, b))
    return len(wa & wb) / len(wa | wb)


def other_topic(rng: random.Random, topic: str) -> str:
    """A topic drawn uniformly from the five that are not `topic`."""
    return rng.choice([t for t in TOPIC_NAMES if t != topic])


# ---------------------------------------------------------------- data builders


def classification_data() -> DatasetDict:
    """train/test splits with columns text, label (int: index of the topic in TOPIC_NAMES)."""
    rows = labelled_sentences(N_TRAIN + N_TEST, SEEDS["DemoClassification"], TOPIC_NAMES)

    def to_split(part: list[tuple[str, str]]) -> Dataset:
        return Dataset.from_dict(
            {"text": [t for t, _ in part], "label": [TOPIC_NAMES.index(topic) for _, topic in part]}
        )

    # labelled_sentences cycles the topics, so both splits are balanced (40 and 20 per label).
    return DatasetDict({"train": to_split(rows[:N_TRAIN]), SPLIT: to_split(rows[N_TRAIN:])})


def topic_paragraphs(n: int, seed: int, sentences_per_item: int) -> list[tuple[str, str]]:
    """`n` (paragraph, topic) pairs, each paragraph joining distinct sentences on its topic; topics cycled."""
    rows = labelled_sentences(n * sentences_per_item, seed, TOPIC_NAMES)
    pools = {t: [text for text, topic in rows if topic == t] for t in TOPIC_NAMES}
    items: list[tuple[str, str]] = []
    for i in range(n):
        topic, j = TOPIC_NAMES[i % len(TOPIC_NAMES)], i // len(TOPIC_NAMES)
        items.append((" ".join(pools[topic][j * sentences_per_item : (j + 1) * sentences_per_item]), topic))
    return items


def clustering_data() -> DatasetDict:
    """Legacy clustering format: one row per cluster set, columns sentences (list), labels (list).

    Items are short paragraphs, not single sentences: k-means on one sentence's words groups it by
    template and filler more than by topic, so single sentences cluster barely above chance even for
    an IDF-weighted bag of words. A few sentences on one topic repeat topic words while their filler
    averages out (v_measure 0.58 against 0.13 for random vectors).
    """
    seed = SEEDS["DemoClustering"]
    items = topic_paragraphs(N_CLUSTER_SETS * CLUSTER_SET_SIZE, seed, SENTENCES_PER_CLUSTER_ITEM)
    # Shuffle so the sets are not in topic order and their class sizes vary, like real sets.
    random.Random(seed).shuffle(items)
    sets = [items[i * CLUSTER_SET_SIZE : (i + 1) * CLUSTER_SET_SIZE] for i in range(N_CLUSTER_SETS)]
    return DatasetDict(
        {
            SPLIT: Dataset.from_dict(
                {
                    "sentences": [[t for t, _ in s] for s in sets],
                    "labels": [[topic for _, topic in s] for s in sets],
                }
            )
        }
    )


def pair_classification_data() -> DatasetDict:
    """One row per pair: sentence1, sentence2, labels (1 = rewording, 0 = different sentence).

    Some negatives are hard: a positive's sentence again, with its topic words swapped for another
    topic's (high word overlap, another meaning), so the task does not saturate. Reusing those
    sentences also makes mteb ask for some texts twice, as real pair tasks do.
    """
    rng = random.Random(SEEDS["DemoPairClassification"])
    seen: set[str] = set()
    pairs: list[tuple[str, str, int]] = []
    for i in range(N_PAIR_POSITIVE):
        topic = TOPIC_NAMES[i % len(TOPIC_NAMES)]
        text = fresh_sentence(rng, topic, seen)
        pairs.append((text, fresh_rewording(rng, text, seen), 1))
        if i < N_PAIR_SWAPPED:
            pairs.append((text, swap_topic(rng, text, topic), 0))
    for i in range(N_PAIR_SAME_TOPIC):
        topic = TOPIC_NAMES[i % len(TOPIC_NAMES)]
        pairs.append((fresh_sentence(rng, topic, seen), fresh_sentence(rng, topic, seen), 0))
    for i in range(N_PAIR_OTHER_TOPIC):
        topic = TOPIC_NAMES[i % len(TOPIC_NAMES)]
        pairs.append(
            (fresh_sentence(rng, topic, seen), fresh_sentence(rng, other_topic(rng, topic), seen), 0)
        )
    rng.shuffle(pairs)  # positives first would be harmless for AP, but real data are mixed
    s1, s2, labels = (list(col) for col in zip(*pairs, strict=True))
    return DatasetDict({SPLIT: Dataset.from_dict({"sentence1": s1, "sentence2": s2, "labels": labels})})


def reranking_data() -> dict[str, dict[str, RetrievalSplitData]]:
    """{subset: {split: RetrievalSplitData}} with per-query candidate lists in `top_ranked`.

    The corpus is the union of all candidate lists, as in the converted v1 reranking tasks. It holds
    15 sentences per topic that are relevant to some query, so a full search over the corpus (which
    mteb falls back to when `top_ranked` is missing) ranks other queries' same-topic sentences high
    and scores lower than reranking each query's own 10 candidates.
    """
    rng = random.Random(SEEDS["DemoReranking"])
    seen: set[str] = set()
    queries: list[dict[str, str]] = []
    corpus: list[dict[str, str]] = []
    qrels: dict[str, dict[str, int]] = {}
    top_ranked: dict[str, list[str]] = {}
    for q in range(N_QUERIES):
        topic, query_id = TOPIC_NAMES[q % len(TOPIC_NAMES)], f"q{q}"
        query = fresh_sentence(rng, topic, seen)
        candidates = [(fresh_rewording(rng, query, seen), 1)]
        candidates += [(fresh_sentence(rng, topic, seen), 1) for _ in range(N_RELATED)]
        candidates += [(fresh_sentence(rng, other_topic(rng, topic), seen), 0) for _ in range(N_UNRELATED)]
        # Shuffle before numbering: pytrec_eval breaks score ties by doc id, which must not favour
        # the relevant documents.
        rng.shuffle(candidates)
        queries.append({"id": query_id, "text": query})
        qrels[query_id], top_ranked[query_id] = {}, []
        for text, relevance in candidates:
            doc_id = f"d{len(corpus)}"
            corpus.append({"id": doc_id, "text": text})
            qrels[query_id][doc_id] = relevance  # 0 marks a judged non-relevant candidate
            top_ranked[query_id].append(doc_id)
    split = RetrievalSplitData(
        corpus=Dataset.from_list(corpus),
        queries=Dataset.from_list(queries),
        relevant_docs=qrels,
        top_ranked=top_ranked,
    )
    return {SUBSET: {SPLIT: split}}


def sts_data() -> DatasetDict:
    """One row per pair: sentence1, sentence2, score (gold similarity in [0, 5])."""
    rng = random.Random(SEEDS["DemoSTS"])
    seen: set[str] = set()
    rows: list[tuple[str, str, float]] = []

    def add(kind: str, a: str, b: str) -> None:
        base, span = STS_BANDS[kind]
        rows.append((a, b, round(base + span * word_overlap(a, b), 2)))

    for i in range(N_STS_REWORDED):
        text = fresh_sentence(rng, TOPIC_NAMES[i % len(TOPIC_NAMES)], seen)
        add("reworded", text, fresh_rewording(rng, text, seen))
    for i in range(N_STS_SAME_TOPIC):
        topic = TOPIC_NAMES[i % len(TOPIC_NAMES)]
        add("same", fresh_sentence(rng, topic, seen), fresh_sentence(rng, topic, seen))
    for i in range(N_STS_OTHER_TOPIC):
        topic = TOPIC_NAMES[i % len(TOPIC_NAMES)]
        add("other", fresh_sentence(rng, topic, seen), fresh_sentence(rng, other_topic(rng, topic), seen))
    rng.shuffle(rows)
    s1, s2, scores = (list(col) for col in zip(*rows, strict=True))
    return DatasetDict({SPLIT: Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": scores})})


# ---------------------------------------------------------------- tasks


def _metadata(
    name: str, *, task_type: str, category: str, main_score: str, subtypes: list[str], description: str
) -> TaskMetadata:
    """TaskMetadata shared by the demo tasks; everything mteb validates or records is filled in."""
    slug = name.removeprefix("Demo").lower()
    return TaskMetadata(
        name=name,
        description=description,
        # No published source: the data are generated here and the path is never loaded; the
        # reference names the framework the tasks are shaped for (mteb's own mock tasks do the same).
        dataset={"path": f"layertime/demo-{slug}", "revision": DEMO_DATA_REVISION},
        reference="https://github.com/embeddings-benchmark/mteb",
        type=task_type,
        category=category,
        modalities=["text"],
        eval_splits=[SPLIT],
        eval_langs=["eng-Latn"],
        main_score=main_score,
        date=("2025-01-01", "2025-01-01"),
        domains=["Constructed", "Written"],
        task_subtypes=subtypes,
        license="not specified",
        annotations_creators="derived",
        dialect=[],
        sample_creation="created",
        bibtex_citation="",
    )


class _BuiltInMemory:
    """Mixin placed before the mteb abstract task: `load_data` builds the data instead of fetching it.

    mteb's own `load_data` calls `datasets.load_dataset(path, revision)` (or the retrieval loader) on
    the hub; overriding it keeps `self.dataset` in exactly the structure mteb's evaluators read, and
    `data_loaded` stops mteb from loading again. mteb unloads data it loaded itself after an
    evaluation, so the next `load_data` simply builds them again.
    """

    data_loaded: bool
    dataset: Any

    def _build(self) -> Any:  # each task type has its own dataset structure
        raise NotImplementedError

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = self._build()
        self.data_loaded = True


class DemoClassification(_BuiltInMemory, AbsTaskClassification):
    metadata = _metadata(
        "DemoClassification",
        task_type="Classification",
        category="t2c",
        main_score="accuracy",
        subtypes=["Topic classification"],
        description="Classify generated English sentences by their topic (6 topics).",
    )
    samples_per_label = 8  # mteb's default, stated: the train split has 40 per label to sample from

    def _build(self) -> DatasetDict:
        return classification_data()


class DemoClustering(_BuiltInMemory, AbsTaskClusteringLegacy):
    metadata = _metadata(
        "DemoClustering",
        task_type="Clustering",
        category="t2c",
        main_score="v_measure",
        subtypes=["Thematic clustering"],
        description="Cluster generated 3-sentence English paragraphs by topic, in 2 sets of 75 (6 topics).",
    )

    def _build(self) -> DatasetDict:
        return clustering_data()


class DemoPairClassification(_BuiltInMemory, AbsTaskPairClassification):
    metadata = _metadata(
        "DemoPairClassification",
        task_type="PairClassification",
        category="t2t",
        main_score="max_ap",
        subtypes=["Duplicate Detection"],
        description="Tell rewordings of a generated sentence from other sentences on the same or another topic.",
    )

    def _build(self) -> DatasetDict:
        return pair_classification_data()


class DemoReranking(_BuiltInMemory, AbsTaskRetrieval):
    metadata = _metadata(
        "DemoReranking",
        task_type="Reranking",
        category="t2t",
        main_score="map_at_1000",  # as SciDocsRR, AskUbuntuDupQuestions, StackOverflowDupQuestions
        subtypes=[],
        description="Rerank 10 candidates per generated query: its rewording and same-topic sentences first.",
    )

    def _build(self) -> dict[str, dict[str, RetrievalSplitData]]:
        return reranking_data()


class DemoSTS(_BuiltInMemory, AbsTaskSTS):
    metadata = _metadata(
        "DemoSTS",
        task_type="STS",
        category="t2t",
        main_score="cosine_spearman",
        subtypes=[],
        description="Score the similarity (0-5) of pairs of generated sentences: rewordings, same topic, other topic.",
    )
    min_score = 0
    max_score = 5

    def _build(self) -> DatasetDict:
        return sts_data()


_TASK_CLASSES: dict[str, type[AbsTask]] = {
    cls.metadata.name: cls
    for cls in (DemoClassification, DemoClustering, DemoPairClassification, DemoReranking, DemoSTS)
}
DEMO_TASK_NAMES: tuple[str, ...] = tuple(_TASK_CLASSES)


def demo_task(name: str) -> AbsTask:
    """A fresh instance of the demo task `name` (fresh: mteb tasks keep state between evaluations)."""
    try:
        cls = _TASK_CLASSES[name]
    except KeyError:
        raise KeyError(
            f"unknown demo task {name!r}; the demo tasks are {', '.join(DEMO_TASK_NAMES)}"
        ) from None
    return cls()
