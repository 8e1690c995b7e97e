"""The bridge scores stored embeddings exactly as mteb scores a model that computes them (docs/design.md §4)."""

import mteb
import numpy as np
import pytest

from layertime import suite
from layertime.bridge import (
    LookupEncoder,
    LookupMiss,
    RecordingEncoder,
    model_meta,
    recorded_texts,
    score_layers,
)
from layertime.encoder import MultiLayerEncoder


class PlainEncoder(RecordingEncoder):
    """An ordinary mteb model of one layer: embeds whatever mteb passes, batch by batch, on the fly."""

    def __init__(self, encoder: MultiLayerEncoder, layer: int) -> None:
        super().__init__()
        self.encoder, self.layer = encoder, layer
        self.mteb_model_meta = model_meta("plain/encoder", "x", encoder.dim, {"layer": layer})

    def vectors(self, texts):
        super().vectors(texts)
        return self.encoder.encode(texts)[self.layer]


@pytest.fixture(scope="module")
def encoder(hub, demo_repo) -> MultiLayerEncoder:
    return MultiLayerEncoder(
        demo_repo, revision="step3000", cache_dir=str(hub), device="cpu", dtype="float32"
    )


def _main_score(result) -> float:
    return float(np.mean([s["main_score"] for s in result.scores["test"]]))


@pytest.mark.parametrize("task_name", list(suite.DEMO_TASK_TYPES))
def test_bridge_scores_equal_mteb_run_directly(task_name, encoder, tmp_path):
    recorded = recorded_texts(task_name, tmp_path / "texts")
    assert recorded.requested >= len(recorded.texts) > 0
    vectors = encoder.encode(recorded.texts)
    assert encoder.last_stats.unique_texts == len(recorded.texts)  # forward texts = unique texts
    scored = score_layers(
        task_name,
        {b: (recorded.texts, vectors[b]) for b in (1, 3)},  # one task load, two layers
        lambda b: model_meta("layertime/tiny-neox", "c" * 40, encoder.dim, {"layer": b}),
        tmp_path / "mteb",
    )
    for layer in (1, 3):
        plain = PlainEncoder(encoder, layer)
        direct = mteb.evaluate(plain, suite.build_task(task_name), cache=None, show_progress_bar=False)
        assert set(plain.seen) <= set(recorded.texts)  # the recording pass saw every text asked for
        expected = _main_score(direct.task_results[0])
        assert len(scored[layer]) == 1
        assert scored[layer][0].main_score == pytest.approx(expected, abs=1e-6), (task_name, layer)
    assert not np.allclose(vectors[1], vectors[3])  # two different layers were scored
    # mteb's own result cache holds one experiment per layer
    stored = sorted(p.parent.name for p in (tmp_path / "mteb").rglob(f"{task_name}.json"))
    assert stored == ["layer_1", "layer_3"]


def test_recorded_texts_are_cached_per_task_revision_mteb_and_code_version(tmp_path):
    from layertime import CODE_VERSION

    first = recorded_texts("DemoSTS", tmp_path)
    files = list(tmp_path.glob("DemoSTS__*.json"))
    assert len(files) == 1 and mteb.__version__ in files[0].name and f"code-{CODE_VERSION}" in files[0].name
    written = files[0].stat().st_mtime_ns
    assert recorded_texts("DemoSTS", tmp_path) == first
    assert files[0].stat().st_mtime_ns == written  # read back, not recorded again
    files[0].write_text(files[0].read_text().replace(first.texts[0], "EDITED"))
    assert recorded_texts("DemoSTS", tmp_path) == first  # an edited copy fails its digest: recorded again


def test_a_text_that_was_not_embedded_is_an_error(tmp_path):
    texts = recorded_texts("DemoSTS", tmp_path).texts
    vectors = np.ones((len(texts) - 1, 4), dtype=np.float32)
    meta = model_meta("layertime/tiny-neox", "c" * 40, 4, {"layer": 0})
    with pytest.raises(LookupMiss, match="not embedded"):
        mteb.evaluate(LookupEncoder(texts[1:], vectors, meta), suite.build_task("DemoSTS"), cache=None,
                      show_progress_bar=False)  # fmt: skip


@pytest.mark.parametrize("task_name", list(suite.DEMO_TASK_TYPES))
def test_list_columns_leave_every_score_bit_identical(task_name, tmp_path):
    recorded = recorded_texts(task_name, tmp_path / "texts")
    vectors = np.random.default_rng(0).standard_normal((len(recorded.texts), 16)).astype(np.float32)
    meta = model_meta("layertime/tiny-neox", "c" * 40, 16, {"layer": 0})
    ours = score_layers(task_name, {0: (recorded.texts, vectors)}, lambda b: meta, tmp_path / "mteb")[0]
    plain_task = suite.build_task(task_name)  # datasets' own lazy columns, mteb as shipped
    plain = mteb.evaluate(LookupEncoder(recorded.texts, vectors, meta), plain_task, cache=None,
                          show_progress_bar=False).task_results[0]  # fmt: skip
    assert [s.main_score for s in ours] == [s["main_score"] for s in plain.scores["test"]]


def test_scoring_stays_on_the_cpu_with_one_blas_thread():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from mteb import similarity_functions as sf\n"
        "assert callable(sf._select_device) and callable(sf._use_torch_compile)  # the hooks we pin\n"
        "from layertime.bridge import prepare_scoring_process\n"
        "from threadpoolctl import threadpool_info\n"
        "prepare_scoring_process()\n"
        "a = torch.zeros(2, 3)\n"
        "assert sf._select_device(a, a) == a.device and not sf._use_torch_compile()\n"
        "assert all(p['num_threads'] == 1 for p in threadpool_info() if p['user_api'] == 'blas')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
