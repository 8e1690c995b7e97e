"""The report (issue 7): known-answer computations on hand-made tables, then a real demo run's report —
valid PNGs, an HTML page whose every reference exists and that headless Chromium renders — and a
partial run whose gaps are reported."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from scipy import stats

from layertime import report, tables
from layertime.report import layer_choice, write_report

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ pure computations


def _arms(rows: list[tuple[str, int, float | None, float | None]]) -> pl.DataFrame:
    """An arm table from (checkpoint, layer, average, metric m) tuples."""
    return pl.DataFrame(
        [{"checkpoint": c, "label": c, "step": int(c[4:]), "layer": b, "hidden_state": b + 1,
          "depth": (b + 1) / 3, "n_tasks": 1, "average": avg, "m": m} for c, b, avg, m in rows],
        schema_overrides={"average": pl.Float64, "m": pl.Float64},
    )  # fmt: skip


def test_correlations_equal_scipys_on_the_same_pairs():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=40), rng.normal(size=40)
    y[:20] += x[:20]
    x[5], y[9] = np.nan, np.nan  # incomplete pairs are dropped
    x[10] = x[11]  # a tie: Kendall's tau-b
    got = report.correlations(x, y)
    keep = np.isfinite(x) & np.isfinite(y)
    rho, rho_p = stats.spearmanr(x[keep], y[keep])
    tau, tau_p = stats.kendalltau(x[keep], y[keep])
    assert got["n"] == 38
    assert got["spearman"] == pytest.approx(rho) and got["spearman_p"] == pytest.approx(rho_p)
    assert got["kendall"] == pytest.approx(tau) and got["kendall_p"] == pytest.approx(tau_p)
    frame = pl.DataFrame({"m": x, "average": y}).with_columns(pl.col("m").fill_nan(None))
    row = report.correlation_table(frame, ["m"], ["average"]).row(0, named=True)
    assert row["spearman"] == pytest.approx(rho) and row["kendall_p"] == pytest.approx(tau_p)


def test_correlations_of_too_few_or_constant_values_are_empty():
    assert report.correlations([1, 2], [3, 4])["spearman"] is None
    assert report.correlations([1, 1, 1, 1], [1, 2, 3, 4])["kendall"] is None


def test_layer_choice_has_no_regret_when_the_metric_is_the_score():
    rng = np.random.default_rng(0)
    arms = _arms([(f"step{s}", b, float(v), float(v)) for s in range(5) for b, v in enumerate(rng.random(4))])
    _, summary = layer_choice(arms, ["m"])
    best = summary.filter(pl.col("strategy") == "m (highest)").row(0, named=True)
    assert best["n"] == 5 and best["mean_regret"] == 0 and best["hit_rate"] == 1
    assert summary["strategy"][0] == "m (highest)"  # sorted best first
    worst = summary.filter(pl.col("strategy") == "m (lowest)").row(0, named=True)
    assert worst["hit_rate"] == 0 and worst["mean_regret"] > 0


def test_layer_choice_matches_a_hand_computation():
    arms = _arms([
        ("step1", 0, 0.50, 3.0), ("step1", 1, 0.60, 1.0), ("step1", 2, 0.55, 2.0),
        ("step2", 0, 0.40, 1.0), ("step2", 1, 0.45, 2.0), ("step2", 2, 0.70, 3.0),
        ("step3", 0, 0.90, 1.0), ("step3", 1, 0.10, 2.0), ("step3", 2, None, 3.0),  # incomplete: not counted
    ])  # fmt: skip
    choices, summary = layer_choice(arms, ["m"], layers=[0, 1, 2])
    by = {r["strategy"]: r for r in summary.iter_rows(named=True)}
    assert {r["n"] for r in by.values()} == {2}
    # highest m: step1 -> layer 0 (0.50 vs best 0.60), step2 -> layer 2 (0.70, the best)
    assert by["m (highest)"]["mean_regret"] == pytest.approx((0.10 + 0.0) / 2)
    assert by["m (highest)"]["mean_score"] == pytest.approx((0.50 + 0.70) / 2)
    assert by["m (highest)"]["hit_rate"] == pytest.approx(0.5)
    # lowest m: step1 -> layer 1 (the best), step2 -> layer 0 (0.40 vs 0.70)
    assert by["m (lowest)"]["mean_regret"] == pytest.approx(0.15)
    assert by["m (lowest)"]["max_regret"] == pytest.approx(0.30)
    # last layer (2): 0.55 and 0.70
    assert by["last layer"]["mean_regret"] == pytest.approx(0.025)
    assert by["last layer"]["hit_rate"] == pytest.approx(0.5)
    # random: expected score (0.55, 0.5166..); each checkpoint has one best layer of three
    assert by["random layer (expected)"]["mean_score"] == pytest.approx((0.55 + 1.55 / 3) / 2)
    assert by["random layer (expected)"]["mean_regret"] == pytest.approx((0.05 + 0.70 - 1.55 / 3) / 2)
    assert by["random layer (expected)"]["hit_rate"] == pytest.approx(1 / 3)
    picks = choices.filter(pl.col("strategy") == "m (highest)").sort("step")
    assert picks["chosen_layer"].to_list() == [0, 2] and picks["best_layer"].to_list() == [1, 2]


def _score_row(revision, commit, step, layer, task, task_type, score, model="layertime/tiny-neox", L=4):
    return {
        "model": model, "revision": revision, "commit": commit, "step": step, "layer": layer,
        "hidden_state": layer + 1, "depth": (layer + 1) / L, "task": task, "task_type": task_type,
        "subset": "default", "split": "test", "main_score": score, "mteb_version": "2.26.24",
        "dataset_revision": "r", "seconds": 1.0,
    }  # fmt: skip


def test_arms_count_a_shared_commit_once_and_average_only_complete_layers():
    tasks = ["DemoSTS", "DemoReranking"]
    rows = [
        _score_row(rev, "c3", step, b, t, kind, 0.1 * (b + 1))
        for rev, step in (("step3000", 3000), ("main", None))
        for b in (0, 1)
        for t, kind in zip(tasks, ["STS", "Reranking"], strict=True)
        if not (b == 1 and t == "DemoReranking")
    ]
    scores = tables.scores_frame(rows)
    index = report.checkpoint_index(scores.select("revision", "commit", "step"))
    arms = report.arm_table(report.task_table(scores), tables.metrics_frame([]), tasks, index)
    assert arms.height == 2 and arms["label"].unique().to_list() == ["step3000 = main"]
    assert arms["step"].to_list() == [3000, 3000]
    layer0, layer1 = arms.sort("layer").iter_rows(named=True)
    assert layer0["average"] == pytest.approx(0.1) and layer0["n_tasks"] == 2
    assert (
        layer1["average"] is None
        and layer1["avg_STS"] == pytest.approx(0.2)
        and layer1["avg_Reranking"] is None
    )
    assert report.scoring_seconds(scores)["seconds"].sum() == pytest.approx(3.0)  # scored once, named twice


def _pythia_main_run(root: Path) -> Path:
    """Hand-made tables of an exp1-shaped run (Pythia-410m main, blocks 15..23, two tasks)."""
    tasks = [("STS12", "STS"), ("SciDocsRR", "Reranking")]
    rows = [
        _score_row("main", "m" * 40, None, b, t, kind, 0.5 - 0.01 * abs(b - 16), "EleutherAI/pythia-410m", 24)
        for b in range(15, 24)
        for t, kind in tasks
    ]
    tables.write_table(tables.scores_frame(rows), root / "tables", "scores")
    tables.write_table(tables.metrics_frame([]), root / "tables", "metrics")
    spec = {
        "name": "exp1-mini", "model": "EleutherAI/pythia-410m", "checkpoints": ["main"], "layers": "15..23",
        "tasks": [t for t, _ in tasks], "run_root": str(root), "metrics": None,
    }  # fmt: skip
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root


def test_pythia_main_is_compared_with_the_paper_by_hidden_state_index(tmp_path):
    run = report.analyze(report.load_run(_pythia_main_run(tmp_path / "exp1-mini")))
    ref = report.reference_comparison(run)
    # paper L17 = hidden_states[17] = block 16; the paper's L15 (block 14) is outside blocks 15..23
    assert ref["paper_layer"].to_list() == [17, 20, 23, 24]
    l17 = ref.row(0, named=True)
    assert l17["block"] == 16 and l17["paper"] == pytest.approx(51.92) and l17["ours"] == pytest.approx(50.0)
    paths = write_report(tmp_path / "exp1-mini")
    assert set(paths.figures) == {
        "profile",
        "profile_types",
        "layer_choice",
        "cost",
    }  # no metrics, one checkpoint
    assert "L17: ours 50.00 vs paper 51.92" in paths.markdown


# --------------------------------------------------------------------------------- a real demo run


@pytest.fixture(scope="module")
def demo_run(hub: Path, tmp_path_factory) -> Path:
    """A small real run: 3 distinct checkpoints (main = step3000), blocks 1..3, three tasks, metrics."""
    from layertime.phases.plain import run_spec
    from layertime.spec import load_spec

    root = tmp_path_factory.mktemp("report") / "runs" / "demo"
    spec = load_spec(
        REPO / "deployments" / "demo.yaml", run_root=root, hf_cache=str(hub),
        checkpoints=["step0", "step1000", "step3000", "main"], layers=[1, 2, 3],
        tasks=["DemoSTS", "DemoPairClassification", "DemoReranking"],
        metrics={"corpus": "tasks", "sample": 20, "views": 2, "lidar_views": 4},
    )  # fmt: skip
    run_spec(spec)
    return root


@pytest.fixture(scope="module")
def demo_report(demo_run: Path) -> report.ReportPaths:
    return write_report(demo_run)


def _assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        low, high = image.convert("L").getextrema()
        assert high - low > 50, f"{path.name} is blank"


@pytest.mark.slow
def test_every_figure_is_a_valid_png(demo_report):
    import matplotlib.image

    expected = {"profile", "profile_types", "heatmap", "steps", "layer_choice", "cost"}
    assert expected <= set(demo_report.figures)
    assert sum(name.startswith("metric_") for name in demo_report.figures) == 7  # one per metric
    for path in demo_report.figures.values():
        assert path.parent == demo_report.directory
        _assert_png(path)
        assert matplotlib.image.imread(path).size > 0


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.ids |= {attrs["id"]} if "id" in attrs else set()
        self.refs += [(tag, attrs[a]) for a in ("src", "href") if a in attrs]


@pytest.mark.slow
def test_the_page_references_only_files_that_exist(demo_report):
    parser = _Refs()
    parser.feed(demo_report.html.read_text())
    files = [ref for _, ref in parser.refs if not ref.startswith("#")]
    assert not [ref for ref in files if "://" in ref or ref.startswith("//")], (
        "the page must be self-contained"
    )
    for ref in files:
        assert (demo_report.html.parent / ref).is_file(), ref
    anchors = [ref[1:] for _, ref in parser.refs if ref.startswith("#")]
    assert anchors and set(anchors) <= parser.ids
    images = {ref for tag, ref in parser.refs if tag == "img"}
    assert images == {p.name for p in demo_report.figures.values()}
    assert any(ref.endswith("tables/scores.csv") for ref in files)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is needed (Debian: apt-get install -y chromium)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="out">pending</pre>
<iframe id="f" src="{url}" style="width:1280px;height:900px"></iframe><script>
document.getElementById("f").addEventListener("load", function () {{
  var d = this.contentDocument, imgs = Array.from(d.images);
  var broken = imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }})
                   .map(function (i) {{ return i.getAttribute("src"); }});
  document.getElementById("out").textContent = "RESULT" + JSON.stringify({{title: d.title,
    images: imgs.length, broken: broken, height: d.documentElement.scrollHeight}}) + "END";
}});
</script></body></html>"""


def _rendered(page: Path, tmp: Path) -> dict:
    """Load `page` in headless Chromium inside a checking frame: title, images, those that failed."""
    check = tmp / f"check-{page.parent.name}.html"
    check.write_text(CHECK_PAGE.format(url=page.resolve().as_uri()))
    out = _chromium("--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
                    check.as_uri(), profile=tmp / "profile")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RESULT" in out.stdout, f"the page did not load: {out.stdout[-500:]}"
    return json.loads(out.stdout.split("RESULT", 1)[1].split("END", 1)[0])


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(demo_report, tmp_path):
    seen = _rendered(demo_report.html, tmp_path)
    assert seen["title"].startswith("demo: layertime/tiny-neox")
    assert seen["images"] == len(demo_report.figures) and seen["broken"] == []
    assert seen["height"] > 3000  # sections and figures laid out, not an empty page
    shot = tmp_path / "report.png"
    out = _chromium(f"--screenshot={shot}", "--window-size=1280,4000", demo_report.html.resolve().as_uri(),
                    profile=tmp_path / "profile")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_png(shot)
    # the check sees a broken page: a copy missing one figure
    broken = tmp_path / "broken"
    shutil.copytree(demo_report.directory, broken)
    (broken / "heatmap.png").unlink()
    assert _rendered(broken / "report.html", tmp_path)["broken"] == ["heatmap.png"]


@pytest.mark.slow
def test_summary_and_key_numbers(demo_report, demo_run):
    assert demo_report.summary_md.read_text() == demo_report.markdown
    assert demo_report.gaps == 0 and "**Progress**: 36/36 evaluations scored." in demo_report.markdown
    assert [r["checkpoint"] for r in demo_report.table] == ["step0", "step1000", "step3000 = main"]
    layers = pl.read_parquet(demo_run / "tables" / "layers.parquet").filter(pl.col("revision") == "main")
    best = layers.sort("average", descending=True).row(0, named=True)
    last = demo_report.table[-1]
    assert last["best_layer"] == best["layer"] and last["best_average"] == pytest.approx(
        100 * best["average"], abs=0.01
    )
    assert f"best layer **{best['layer']}**" in demo_report.markdown
    assert "## Label-free layer choice" in demo_report.markdown
    html = demo_report.html.read_text()
    assert "hidden_states[b + 1]" in html and "Correlations per task type" in html


@pytest.mark.slow
def test_rewriting_replaces_the_report_whole(demo_run, demo_report):
    (demo_report.directory / "stale.png").write_bytes(b"old")
    again = write_report(demo_run)
    assert not (again.directory / "stale.png").exists()
    assert not [p for p in demo_run.iterdir() if p.name.startswith(".report")], "temporary directories left"


@pytest.mark.slow
def test_a_partial_run_reports_its_gaps(demo_run, hub, tmp_path):
    from layertime.phases import merge
    from layertime.phases.context import Context
    from layertime.plan import make_plan
    from layertime.rundir import RunDir
    from layertime.settings import Settings
    from layertime.spec import load_spec

    root = tmp_path / "partial"
    root.mkdir()
    for name in ("spec.yaml", "environment.json"):
        shutil.copy(demo_run / name, root / name)
    spec = load_spec(root / "spec.yaml", run_root=root, hf_cache=str(hub), store=demo_run.parent / "store")
    plan, run = make_plan(spec), RunDir.of(root, spec.store)
    ctx = Context(plan, run, Settings.of(spec, "cpu"))
    rows = merge.recorded_rows(ctx)
    by_rev = {c.revision: c for c in plan.checkpoints}
    del rows[(by_rev["step3000"].key, "DemoSTS", 2)]  # one unit of step3000 = main not scored yet
    measured = merge.recorded_metrics(ctx)
    del measured[by_rev["step0"].key]  # step0 not measured yet
    merge.merge(ctx, rows=rows, metric_rows=measured)

    paths = write_report(root, failures=["score[step3000 · DemoSTS · L2]: ValueError: boom"])
    assert paths.gaps == 2  # the unit is missing under both names of its commit
    assert "2 of 36 evaluations" in paths.markdown
    assert "3 of 12 (revision × layer) metric arms" in paths.markdown
    html = paths.html.read_text()
    assert "2 evaluations without a score" in html and "step3000 · DemoSTS · block 2" in html
    assert "Failed units (1)" in html
    assert "`score[step3000 · DemoSTS · L2]: ValueError: boom`" in paths.markdown
    a = report.analyze(report.load_run(root))
    gap = a.arms.filter((pl.col("label") == "step3000 = main") & (pl.col("layer") == 2))
    assert gap["average"][0] is None and gap["n_tasks"][0] == 2
    # only step1000 has every layer scored and measured: the strategies are judged on it alone
    assert set(a.choice_summary["n"]) == {1} and a.choices["label"].unique().to_list() == ["step1000"]
    for path in paths.figures.values():
        _assert_png(path)
