"""The five demo mteb tasks: deterministic data, offline evaluation, learnable labels, real reranking."""

from __future__ import annotations

import os
import tempfile

# Before mteb is imported: `import mteb` creates its default result cache under ~/.cache/mteb unless
# MTEB_CACHE points elsewhere, and huggingface_hub reads HF_HUB_OFFLINE once, at import.
os.environ.setdefault("MTEB_CACHE", tempfile.mkdtemp(prefix="mteb-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mteb  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402
from mteb.abstasks.abstask import AbsTask  # noqa: E402
from mteb.cache import ResultCache  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.results import TaskResult  # noqa: E402
from sklearn.metrics import v_measure_score  # noqa: E402

from layertime.demo.corpus import labelled_sentences  # noqa: E402
from layertime.demo.tasks import DEMO_DATA_REVISION, DEMO_TASK_NAMES, demo_task  # noqa: E402

# sha256 of each task's data as built by the current generator. A change here means the data changed:
# bump DEMO_DATA_REVISION in layertime/demo/tasks.py (results record it), then update these values.
DATA_FINGERPRINTS = {
    "DemoClassification": "99f582a8e1c1105e984a5a4f2b8c53f6df04c1f242611f64e340992b99c783c1",
    "DemoClustering": "075d0f18d912ccbb43f703b80664eef11b7346044a241593b8ecc2175233b33d",
    "DemoPairClassification": "e7088de1d00f8a28f9bfd91d54fda5e9872bf5e25120756446f16de85f7d82e9",
    "DemoReranking": "772302008112b4cc6209a9a4291ee3f8000c910989448b763db5337ae6bfd30e",
    "DemoSTS": "1dcdd39ac172a4de0fe3351ce0030ce4a3ba607364dd0ee6eb70819c9eda0633",
}
MAIN_SCORES = {
    "DemoClassification": "accuracy",
    "DemoClustering": "v_measure",
    "DemoPairClassification": "max_ap",
    "DemoReranking": "map_at_1000",
    "DemoSTS": "cosine_spearman",
}
# How far the bag of words must beat random vectors; measured lifts are about twice these.
MIN_LIFT = {
    "DemoClassification": 0.2,
    "DemoClustering": 0.2,
    "DemoPairClassification": 0.25,
    "DemoReranking": 0.12,
    "DemoSTS": 0.5,
}
# How close random vectors must come to the chance level of each task.
CHANCE_TOLERANCE = {
    "DemoClassification": 0.08,
    "DemoClustering": 0.08,
    "DemoPairClassification": 0.1,
    "DemoReranking": 0.08,
    "DemoSTS": 0.25,  # Spearman over 100 pairs: one standard error is 0.1
}


# ---------------------------------------------------------------- encoders


def _stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " ").replace(".", " ").split()


def _model_meta(name: str, dim: int) -> ModelMeta:
    """Minimal valid ModelMeta: mteb names the cache folder after `name`, which needs an org/ part."""
    return ModelMeta(
        loader=None,
        name=name,
        revision="0",
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["NumPy"],
        similarity_fn_name=ScoringFunction.COSINE,  # the enum: mteb compares it with `is`
        use_instructions=False,
        training_datasets=None,
    )


class _TextEncoder(AbsEncoder):
    """Encodes each text on its own; records every text mteb asks for."""

    dim: int

    def __init__(self, name: str) -> None:
        self.mteb_model_meta = _model_meta(name, self.dim)
        self.seen: list[str] = []

    def embed(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str, **kwargs: Any):
        texts = [text for batch in inputs for text in batch["text"]]
        self.seen.extend(texts)
        return np.stack([self.embed(text) for text in texts])


class HashingBagOfWords(_TextEncoder):
    """IDF-weighted word counts hashed into 512 dimensions, L2-normalised.

    The IDF comes from unlabelled sentences of the same generator drawn with another seed (a stand-in
    for pretraining): it uses no task labels, and it keeps 'the'/'about' from outweighing topic words.
    """

    dim = 512

    def __init__(self, name: str = "layertime-test/hashing-bow") -> None:
        super().__init__(name)
        reference = [text for text, _ in labelled_sentences(600, seed=999)]
        doc_freq = Counter(word for text in reference for word in set(_words(text)))
        self.idf = {w: math.log((1 + len(reference)) / (1 + n)) + 1 for w, n in doc_freq.items()}
        self.unseen_idf = math.log(1 + len(reference)) + 1

    def embed(self, text: str) -> np.ndarray:
        vec = np.zeros(self.dim)
        for word in _words(text):
            vec[_stable_hash(word) % self.dim] += self.idf.get(word, self.unseen_idf)
        return vec / np.linalg.norm(vec)


class RandomVectors(_TextEncoder):
    """A fixed random vector per text: the same text always gets the same vector, nothing else is shared."""

    dim = 64

    def __init__(self, name: str = "layertime-test/random-vectors") -> None:
        super().__init__(name)

    def embed(self, text: str) -> np.ndarray:
        return np.random.default_rng(_stable_hash(text)).standard_normal(self.dim)


# ---------------------------------------------------------------- helpers


def _plain(obj: Any) -> Any:
    """A task's loaded data as plain Python (Datasets become column dicts), for comparing and hashing."""
    if isinstance(obj, Dataset):
        return obj.to_dict()
    if isinstance(obj, dict):  # DatasetDict and RetrievalSplitData are dicts
        return {key: _plain(value) for key, value in obj.items()}
    return obj


def _loaded(name: str) -> AbsTask:
    task = demo_task(name)
    task.load_data()
    return task


def _fingerprint(task: AbsTask) -> str:
    return hashlib.sha256(json.dumps(_plain(task.dataset), sort_keys=True).encode()).hexdigest()


def _evaluate(model: _TextEncoder, task: AbsTask, cache_dir: Path, **kwargs: Any) -> TaskResult:
    result = mteb.evaluate(
        model,
        task,
        cache=ResultCache(cache_dir),
        overwrite_strategy="always",
        show_progress_bar=False,
        co2_tracker=False,
        **kwargs,
    )
    assert not result.exceptions
    (task_result,) = result.task_results
    return task_result


def _average_precision(ranked_relevance: list[int]) -> float:
    hits, total = 0, 0.0
    for rank, relevant in enumerate(ranked_relevance, start=1):
        if relevant:
            hits += 1
            total += hits / rank
    return total / sum(ranked_relevance)


def _chance_level(name: str) -> float:
    """The main score an encoder that knows nothing gets on average, computed from the task's data."""
    rng = random.Random(0)
    task = _loaded(name)
    if name == "DemoClassification":
        return 1 / len(set(task.dataset["test"]["label"]))
    if name == "DemoClustering":
        # v_measure of a clustering with the right cluster sizes but random membership.
        values = []
        for labels in task.dataset["test"]["labels"]:
            for _ in range(50):
                shuffled = rng.sample(labels, len(labels))
                values.append(v_measure_score(labels, shuffled))
        return float(np.mean(values))
    if name == "DemoPairClassification":
        return float(np.mean(task.dataset["test"]["labels"]))  # AP of a random order = positive rate
    if name == "DemoReranking":
        split = task.dataset["default"]["test"]
        aps = []
        for query_id, candidates in split["top_ranked"].items():
            relevance = [split["relevant_docs"][query_id][doc] for doc in candidates]
            aps += [_average_precision(rng.sample(relevance, len(relevance))) for _ in range(50)]
        return float(np.mean(aps))
    if name == "DemoSTS":
        return 0.0
    raise KeyError(name)


@pytest.fixture(scope="module")
def main_scores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], float]:
    """Main score of each encoder on each task, evaluated once, read back three ways that must agree."""
    cache_dir = tmp_path_factory.mktemp("mteb-results")
    out: dict[tuple[str, str], float] = {}
    for model in (HashingBagOfWords(), RandomVectors()):
        for name in DEMO_TASK_NAMES:
            task_result = _evaluate(model, demo_task(name), cache_dir)
            # One split, one subset: scores["test"] is a list with one dict per hf subset.
            (subset_scores,) = task_result.scores["test"]
            assert subset_scores["hf_subset"] == "default"
            assert subset_scores["languages"] == ["eng-Latn"]
            assert task_result.dataset_revision == DEMO_DATA_REVISION
            main = subset_scores["main_score"]
            assert main == subset_scores[MAIN_SCORES[name]]
            assert task_result.get_score() == pytest.approx(main)  # mean over splits and subsets
            # The cache file rounds scores (to 6 decimals), so compare loosely.
            cached = ResultCache(cache_dir).load_task_result(name, model.mteb_model_meta)
            assert cached is not None and cached.get_score() == pytest.approx(main, abs=1e-5)
            out[model.mteb_model_meta.name, name] = main
    return out


# ---------------------------------------------------------------- tests


def test_demo_task_names_and_fresh_instances() -> None:
    assert DEMO_TASK_NAMES == (
        "DemoClassification",
        "DemoClustering",
        "DemoPairClassification",
        "DemoReranking",
        "DemoSTS",
    )
    for name in DEMO_TASK_NAMES:
        first, second = demo_task(name), demo_task(name)
        assert first is not second and not first.data_loaded
        assert first.metadata.name == name
        assert first.metadata.main_score == MAIN_SCORES[name]
        assert first.metadata.eval_splits == ["test"] and first.hf_subsets == ["default"]
        assert first.metadata.is_filled()


def test_unknown_task_name_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match="DemoClassification"):
        demo_task("Banking77Classification")


@pytest.mark.parametrize("name", DEMO_TASK_NAMES)
def test_data_are_deterministic(name: str) -> None:
    first, second = _loaded(name), _loaded(name)
    assert first.dataset is not second.dataset
    assert _plain(first.dataset) == _plain(second.dataset)
    # The same bytes in every process and on every machine, or the revision string would lie.
    assert _fingerprint(first) == DATA_FINGERPRINTS[name], (
        f"{name}'s data changed: bump DEMO_DATA_REVISION and update DATA_FINGERPRINTS"
    )


@pytest.mark.parametrize("name", DEMO_TASK_NAMES)
def test_labels_are_learnable(name: str, main_scores: dict[tuple[str, str], float]) -> None:
    bow = main_scores["layertime-test/hashing-bow", name]
    rand = main_scores["layertime-test/random-vectors", name]
    chance = _chance_level(name)
    assert rand == pytest.approx(chance, abs=CHANCE_TOLERANCE[name])
    assert bow >= rand + MIN_LIFT[name], f"{name}: bag of words {bow:.3f}, random {rand:.3f}"


def test_reranking_scores_only_each_querys_candidates(tmp_path: Path) -> None:
    model = HashingBagOfWords()
    reranked = _evaluate(model, demo_task("DemoReranking"), tmp_path / "a", prediction_folder=tmp_path / "a")
    predictions = json.loads((tmp_path / "a" / "DemoReranking_predictions.json").read_text())
    scored = predictions["default"]["test"]  # {query id: {doc id: score}}

    candidates = _loaded("DemoReranking").dataset["default"]["test"]["top_ranked"]
    assert len(candidates) == 30 and all(len(docs) == 10 for docs in candidates.values())
    assert {query: set(docs) for query, docs in scored.items()} == {
        query: set(docs) for query, docs in candidates.items()
    }

    # The same data without the candidate lists: mteb silently falls back to a full search over the
    # 300-document corpus, which ranks other queries' same-topic documents high and scores lower.
    task = _loaded("DemoReranking")
    task.dataset["default"]["test"]["top_ranked"] = None
    full = _evaluate(model, task, tmp_path / "b", prediction_folder=tmp_path / "b")
    full_scored = json.loads((tmp_path / "b" / "DemoReranking_predictions.json").read_text())
    assert all(len(docs) == 300 for docs in full_scored["default"]["test"].values())
    assert full.get_score() < reranked.get_score() - 0.1
