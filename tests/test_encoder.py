"""The multi-layer encoder against the paper's way of computing each layer (docs/design.md §3)."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from layertime.encoder import EncoderOutOfMemory, MultiLayerEncoder, NonFiniteEmbedding, token_budget_batches

TEXTS = [
    "The team won the match last week.",
    "A short one.",
    "My sister talked about the old recipe and the garlic sauce before the holiday, then laughed.",
    "The team won the match last week.",  # a duplicate: forwarded once
    "Rain.",
    "",  # mteb datasets contain empty strings
]


def _encoder(hub, repo, **kw) -> MultiLayerEncoder:
    return MultiLayerEncoder(
        repo, revision="step2000", cache_dir=str(hub), device="cpu", dtype="float32", **kw
    )


def _paper_way(hub, repo, text: str, blocks: int) -> np.ndarray:
    """The model truncated to `blocks` blocks; its last_hidden_state (final norm applied), mean pooled."""
    model = AutoModel.from_pretrained(
        repo, revision="step2000", cache_dir=str(hub), dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo, revision="step2000", cache_dir=str(hub))
    truncated = copy.deepcopy(model)
    truncated.layers = truncated.layers[:blocks]
    truncated.config.num_hidden_layers = blocks
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states = truncated(input_ids=ids).last_hidden_state  # (1, T, D), final_layer_norm applied
    return states[0].double().mean(0).numpy()


def test_the_demo_model_is_tiny(hub, demo_repo):
    enc = _encoder(hub, demo_repo)
    assert enc.model.num_parameters() < 1e6 and enc.anatomy.num_blocks == 4


def test_one_pass_equals_truncated_models_for_every_layer(hub, demo_repo):
    enc = _encoder(hub, demo_repo)
    out = enc.encode(TEXTS[:3])
    assert sorted(out) == [0, 1, 2, 3]
    for b in range(4):
        assert out[b].dtype == np.float32 and out[b].shape == (3, 32)
        for i, text in enumerate(TEXTS[:3]):
            np.testing.assert_allclose(out[b][i], _paper_way(hub, demo_repo, text, b + 1), atol=1e-5, rtol=0)


def test_final_norm_last_is_the_raw_residual_stream_except_the_last_layer(hub, demo_repo):
    raw = _encoder(hub, demo_repo, final_norm="last").encode(TEXTS[:2])
    normed = _encoder(hub, demo_repo).encode(TEXTS[:2])
    model = AutoModel.from_pretrained(demo_repo, revision="step2000", cache_dir=str(hub)).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_repo, revision="step2000", cache_dir=str(hub))
    ids = tokenizer(TEXTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for b in range(3):
        np.testing.assert_allclose(raw[b][0], hidden[b + 1][0].mean(0).numpy(), atol=1e-5)
        assert not np.allclose(raw[b], normed[b], atol=1e-3)
    np.testing.assert_allclose(raw[3], normed[3], atol=1e-6)  # hidden_states[L] is normed once, not twice


def test_padding_does_not_leak(hub, demo_repo):
    enc = _encoder(hub, demo_repo)
    alone = enc.encode(["Rain."])
    # Force one batch holding the short text beside much longer ones (the planner would split them).
    ids = enc.tokenize([TEXTS[2], TEXTS[0], "Rain."])
    assert len(ids[0]) > 4 * len(ids[2])
    batched = enc._forward(ids)
    for b in alone:
        np.testing.assert_allclose(batched[b][2], alone[b][0], atol=1e-5, rtol=0)


def test_unique_texts_are_forwarded_once_and_order_is_restored(hub, demo_repo):
    enc = _encoder(hub, demo_repo, tokens_per_batch=64)
    out = enc.encode(TEXTS)
    stats = enc.last_stats
    assert (stats.texts, stats.unique_texts) == (6, 5)
    assert stats.padded_tokens >= stats.real_tokens and stats.batches > 1
    np.testing.assert_array_equal(out[2][0], out[2][3])
    single = {t: enc.encode([t])[2][0] for t in TEXTS}
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(out[2][i], single[text], atol=1e-5)
    assert np.isfinite(out[0][5]).all()  # the empty text is embedded as EOS, not NaN


def test_l2_normalisation_and_last_token_pooling(hub, demo_repo):
    unit = _encoder(hub, demo_repo, normalize=True).encode(TEXTS[:3])
    np.testing.assert_allclose(np.linalg.norm(unit[1], axis=1), 1.0, atol=1e-5)
    last = _encoder(hub, demo_repo, pooling="last").encode(TEXTS[:2])
    mean = _encoder(hub, demo_repo).encode(TEXTS[:2])
    assert not np.allclose(last[1], mean[1])
    assert np.allclose(
        last[1][1], _encoder(hub, demo_repo, pooling="last").encode([TEXTS[1]])[1][0], atol=1e-5
    )


def test_nan_is_caught_with_checkpoint_and_layer_named(hub, demo_repo):
    enc = _encoder(hub, demo_repo, layers=[1, 2])
    with torch.no_grad():
        enc.model.layers[2].mlp.dense_4h_to_h.bias.fill_(float("nan"))
    with pytest.raises(
        NonFiniteEmbedding, match=r"layertime/tiny-neox@step2000: layer 2 \(hidden_states\[3\]\)"
    ):
        enc.encode(TEXTS[:2])


def test_layers_outside_the_model_are_rejected(hub, demo_repo):
    with pytest.raises(ValueError, match="block 4 is outside"):
        _encoder(hub, demo_repo, layers=[3, 4])


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_batches_keep_padding_small(seed):
    rng = np.random.default_rng(seed)
    lengths = [
        int(x) for x in rng.lognormal(3.7, 0.8, size=800).clip(1, 2048)
    ]  # a long tail, like real tasks
    for budget in (2048, 16384):
        batches = token_budget_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(800))
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert padded <= 1.10 * sum(lengths)
        assert all(len(b) * lengths[b[0]] <= budget for b in batches if len(b) > 1)
        assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in batches)
    assert token_budget_batches([5000, 10], 100) == [[0], [1]]  # an over-long text gets its own batch


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny random BERT with a word-level vocabulary, saved as a local directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from layertime.demo.corpus import labelled_sentences

    words = sorted({w.strip(".,").lower() for t, _ in labelled_sentences(300, 0) for w in t.split()})
    path = tmp_path_factory.mktemp("tiny-bert")
    (path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words])
    )
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 7, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    model = BertModel(config)
    assert model.num_parameters() < 1e6
    model.save_pretrained(path)
    return str(path)


def test_a_bert_style_encoder_has_no_final_norm_and_keeps_its_special_tokens(tiny_bert):
    enc = MultiLayerEncoder(tiny_bert, device="cpu", dtype="float32")
    assert enc.anatomy.final_norm_attr is None and enc.anatomy.num_blocks == 3
    out = enc.encode(TEXTS[:3])
    model = AutoModel.from_pretrained(tiny_bert).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    for i, text in enumerate(TEXTS[:3]):
        batch = tokenizer(text, return_tensors="pt")  # [CLS] ... [SEP], as BERT expects
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        for b in range(3):
            np.testing.assert_allclose(out[b][i], hidden[b + 1][0].mean(0).numpy(), atol=1e-5)
    assert enc.tokenize(["the team"])[0][0] == tokenizer.cls_token_id


def test_out_of_memory_splits_the_batch_then_names_what_to_change(hub, demo_repo, monkeypatch):
    enc = _encoder(hub, demo_repo, tokens_per_batch=100_000)
    texts = [
        f"The team won the {w} match last week." for w in ("first", "second", "third", "last", "big", "home")
    ]
    expected = enc.encode(texts)
    forward = enc.model.forward

    def small_batches_only(*args, input_ids, **kwargs):  # a GPU that holds 1 text at a time
        if input_ids.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(enc.model, "forward", small_batches_only)
    assert max(map(len, token_budget_batches([len(r) for r in enc.tokenize(texts)], 100_000))) > 1
    got = enc.encode(texts)
    assert enc.oom_splits > 0 and enc.last_stats.oom_splits > 0 and enc.tokens_per_batch == 100_000
    for b in expected:
        np.testing.assert_allclose(got[b], expected[b], atol=1e-5)

    def nothing_fits(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(enc.model, "forward", nothing_fits)
    with pytest.raises(EncoderOutOfMemory, match=r"does not fit in GPU memory even alone; lower max_length"):
        enc.encode(TEXTS)


def test_texts_longer_than_max_length_are_truncated_and_counted(hub, demo_repo):
    enc = _encoder(hub, demo_repo, max_length=8)
    long, short = TEXTS[2], "Rain."
    out = enc.encode([long, short, long])
    assert enc.last_stats.truncated == 1  # unique texts
    assert max(map(len, enc.tokenize([long]))) == 8
    cut = enc.tokenizer.decode(enc.tokenize([long])[0])
    np.testing.assert_allclose(
        out[3][0], _encoder(hub, demo_repo, max_length=8).encode([cut])[3][0], atol=1e-5
    )
