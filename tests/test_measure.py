"""Streaming `measure` against a direct computation on full hidden states; corpora; augmentations."""

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from layertime import augment, metrics, metrics_corpus
from layertime.encoder import MultiLayerEncoder
from layertime.measure import measure, metric_names

CORPUS_FILE = Path(__file__).parent / "data" / "metrics_corpus.txt"
REVISION = "step3000"
SHORT = ["rain", "Hi"]  # 1 and 2 demo tokens: skipped by both metrics, and by curvature only


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny model's and the metrics' small matrices run 10× slower when two
    threads contend on a busy 2-core machine, and this module must stay well under its time budget."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ corpus


def test_filter_drops_headings_and_short_lines_and_keeps_the_rest_verbatim():
    lines = CORPUS_FILE.read_text(encoding="utf-8").splitlines()
    prompts = metrics_corpus.file_prompts(CORPUS_FILE)
    headings = [line for line in lines if line.strip().startswith("=") and line.strip().endswith("=")]
    short = [line for line in lines if len(line) < 10]
    assert len(lines) == 62 and len(headings) == 12 and len(short) == 19
    assert len(prompts) == len(lines) - len(headings) - len(short) == 31
    assert prompts == [line for line in lines if line not in headings and line not in short]  # order kept
    assert " Ten chars" in prompts and " Nine ch." not in prompts  # 10 characters is enough, 9 is not
    assert prompts[0].startswith(" Harrow Point Lighthouse is")  # verbatim: the leading space stays
    assert metrics_corpus.filter_lines([" = = History = = ", " = Title = \n", "", " \n"]) == []


def test_wikitext_offline_without_the_dataset_names_it_and_the_fetch_command(tmp_path):
    with pytest.raises(
        metrics_corpus.CorpusError, match=r"Salesforce/wikitext.*wikitext-103-v1.*load_dataset"
    ):
        metrics_corpus.wikitext_prompts(cache_dir=str(tmp_path))


def test_wikitext_prompts_reads_the_first_lines_of_train_and_filters_them(monkeypatch):
    import datasets

    lines = [line + "\n" for line in CORPUS_FILE.read_text(encoding="utf-8").splitlines()]
    calls = []

    def fake_load(repo, config, split, cache_dir=None):
        calls.append((repo, config, split, cache_dir))
        return datasets.Dataset.from_dict({"text": lines[: int(split.removeprefix("train[:").rstrip("]"))]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    prompts = metrics_corpus.wikitext_prompts(n_lines=20, cache_dir="/x")
    assert calls == [("Salesforce/wikitext", "wikitext-103-v1", "train[:20]", "/x")]
    assert prompts == metrics_corpus.filter_lines(lines[:20]) and all(p.endswith("\n") for p in prompts)


def test_task_sample_is_seeded_distinct_and_in_corpus_order():
    texts = [f"text {i}" for i in range(50)] + ["text 3", "", "  "]
    sample = metrics_corpus.task_sample(texts, n=10, seed=1)
    assert (
        sample
        == metrics_corpus.task_sample(texts, n=10, seed=1)
        != metrics_corpus.task_sample(texts, n=10, seed=2)
    )
    assert len(set(sample)) == 10 and sample == sorted(sample, key=texts.index)
    assert metrics_corpus.task_sample(texts, n=1000) == [f"text {i}" for i in range(50)]


# ------------------------------------------------------------------------------------ augmentations


def test_views_are_deterministic_per_seed_and_nested():
    texts = metrics_corpus.file_prompts(CORPUS_FILE)[:6]
    v16 = augment.views(texts, 16, seed=0)
    assert v16 == augment.views(texts, 16, seed=0)
    assert augment.views(texts, 2, seed=0) == v16[:2]  # the 2-view set is the start of the 16-view set
    assert augment.views(texts, 2, seed=1) != v16[:2]
    assert augment.views(texts[3:4], 2, seed=0) == [[v16[0][3]], [v16[1][3]]]  # independent of other texts
    assert len(v16) == 16 and all(len(v) == 6 for v in v16)
    assert all(view[i] != texts[i] for view in v16 for i in range(6))  # long texts always get some noise
    assert v16[0][0] != v16[1][0]


def test_augment_noise_kinds_and_rates():
    text = "the quick brown fox jumps over the lazy dog " * 20
    assert augment.augment(text, random.Random(0), char_rate=0, split_rate=0) == " ".join(text.split())
    split_only = augment.augment(text, random.Random(0), char_rate=0, split_rate=0.5)
    assert split_only.replace(" ", "") == text.replace(" ", "") and len(split_only.split()) > len(
        text.split()
    )
    noisy = augment.augment(text, random.Random(0), char_rate=0.2, split_rate=0)
    assert noisy != " ".join(text.split()) and len(noisy.split()) == len(text.split())
    assert augment.augment("a", random.Random(0), char_rate=1.0, split_rate=1.0)  # never emptied


# ------------------------------------------------------------------------------------ measure


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return metrics_corpus.file_prompts(CORPUS_FILE)[:12] + SHORT


def _encoder(hub: Path, repo: str, **kw) -> MultiLayerEncoder:
    return MultiLayerEncoder(
        repo, revision=REVISION, cache_dir=str(hub), device="cpu", dtype="float32", max_length=512, **kw
    )


def _direct_states(hub: Path, repo: str, texts: list[str]) -> list[list[torch.Tensor]]:
    """Per text, per block b: the full (T, D) states, one text at a time (no padding), final norm per docs/design.md §3."""
    model = AutoModel.from_pretrained(repo, revision=REVISION, cache_dir=str(hub), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(repo, revision=REVISION, cache_dir=str(hub))
    L = model.config.num_hidden_layers
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            # hidden_states[L] is already normed; every other layer gets the final norm (final_norm: all).
            out.append(
                [hs[b + 1][0] if b == L - 1 else model.final_layer_norm(hs[b + 1][0]) for b in range(L)]
            )
    return out


def _expected(hub, repo, prompts, lidar_views) -> dict[tuple[int, str, str], tuple[float, int]]:
    states = _direct_states(hub, repo, prompts)
    flat_views = [t for view in augment.views(prompts, lidar_views, seed=0) for t in view]
    view_states = _direct_states(hub, repo, flat_views)
    N, L = len(prompts), len(states[0])
    expected = {}
    for b in range(L):
        toks = [s[b] for s in states]
        ents = [metrics.matrix_entropy(h) for h in toks if len(h) >= 2]
        curvs = [metrics.curvature(h[None], torch.ones(1, len(h))).item() for h in toks if len(h) >= 3]
        X = torch.stack([h.mean(0) for h in toks])
        V = torch.stack([s[b].mean(0) for s in view_states]).reshape(lidar_views, N, -1).transpose(0, 1)
        loss, bound = metrics.infonce(V[:, 0], V[:, 1])
        dime, lidar = metrics.dime(V[:, 0], V[:, 1], seed=0), metrics.lidar(V)
        norm = min(math.log(N), math.log(X.shape[1]))
        expected |= {
            (b, "prompt_entropy", "max_entropy"): (sum(ents) / len(ents), N - len(ents)),
            (b, "curvature", "raw"): (sum(curvs) / len(curvs), N - len(curvs)),
            (b, "dataset_entropy", "max_entropy"): (metrics.dataset_entropy(X), 0),
            (b, "effective_rank", "raw"): (metrics.effective_rank(X), 0),
            (b, "infonce", "raw"): (loss, 0),
            (b, "infonce", "mi_lower_bound"): (bound, 0),
            (b, "dime", "raw"): (dime, 0),
            (b, "dime", "max_entropy"): (dime / norm, 0),
            (b, "lidar", "raw"): (lidar, 0),
            (b, "lidar", "max_entropy"): (lidar / norm, 0),
        }
    return expected


def test_streaming_measure_equals_a_direct_computation_on_full_hidden_states(hub, demo_repo, prompts):
    enc = _encoder(hub, demo_repo, tokens_per_batch=1024)  # several padded batches per pass
    batches = []
    iter_batches = enc.iter_batches

    def counting(texts):
        for indices, mask, states in iter_batches(texts):
            batches.append(bool((mask == 0).any()))
            yield indices, mask, states

    enc.iter_batches = counting
    rows = measure(enc, prompts, n_views=2, lidar_views=4, seed=0, corpus="test-corpus")
    assert len(batches) > 4 and any(batches)  # several batches, some padded
    expected = _expected(hub, demo_repo, prompts, lidar_views=4)
    assert {(r["layer"], r["metric"], r["normalization"]) for r in rows} == set(expected)
    # What a metrics record must hold (records.MetricsAsk): the rows of each layer, no more, no fewer.
    assert sorted((r["metric"], r["normalization"]) for r in rows if r["layer"] == 0) == sorted(
        metric_names(2, 4)
    )
    for r in rows:
        value, skipped = expected[(r["layer"], r["metric"], r["normalization"])]
        # float32 forward, padded batches vs one text at a time: agreement is ~3e-7 relative.
        assert r["value"] == pytest.approx(value, rel=1e-5, abs=1e-7), r
        assert (r["n_skipped"], r["n_prompts"], r["corpus"], r["hidden_state"]) == (
            skipped,
            14,
            "test-corpus",
            r["layer"] + 1,
        )
    skipped = {(r["metric"], r["n_skipped"]) for r in rows if r["layer"] == 0}
    assert ("prompt_entropy", 1) in skipped and ("curvature", 2) in skipped  # "rain" (1 token), "Hi" (2)
    assert len({r["value"] for r in rows if r["metric"] == "lidar" and r["normalization"] == "raw"}) == 4


def test_measure_only_the_requested_layers_and_metrics(hub, demo_repo, prompts):
    rows = measure(_encoder(hub, demo_repo, layers=[1, 3]), prompts[:5], n_views=0, lidar_views=0)
    assert {r["layer"] for r in rows} == {1, 3}
    assert {r["metric"] for r in rows} == {"prompt_entropy", "curvature", "dataset_entropy", "effective_rank"}
    assert sorted((r["metric"], r["normalization"]) for r in rows if r["layer"] == 1) == sorted(
        metric_names(0, 0)
    )
    assert all(math.isfinite(r["value"]) for r in rows)
    with pytest.raises(ValueError, match="n_views"):
        measure(_encoder(hub, demo_repo), prompts, n_views=3)
    with pytest.raises(ValueError, match="lidar_views"):
        measure(_encoder(hub, demo_repo), prompts, lidar_views=1)
