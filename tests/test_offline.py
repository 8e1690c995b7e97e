"""Offline clusters (docs/design.md §8, issue 6): prefetch against a stand-in hub, then verify offline.

The real download code runs (`snapshot_download`, `hf download`) against `tests/hubserver.py` on
loopback, in subprocesses whose environment points ``HF_ENDPOINT`` at it (huggingface_hub reads its
endpoint and offline flag at import; this process is offline, see conftest). `verify` runs here, offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hubserver import FakeHub  # tests/ is on sys.path (rootdir conftest, prepend import mode)

from layertime.hub import prefetch, verify
from layertime.hub.cache import repo_dir, task_dataset
from layertime.hub.prefetch import RemoteFile, select_model_files
from layertime.spec import parse_spec

REPO = "fakeorg/tiny-neox"
REVISIONS = ["step0", "step1000", "step2000", "step3000", "main"]  # main = step3000's commit
ROOT = Path(__file__).resolve().parents[1]
SCIDOCS_REVISION = "39b8377811871075eed9de3b8a7e21aaa6acb3d8"  # what mteb 2.26 pins for SciDocsRR


# ----------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def served(hub: Path, demo_repo: str):
    """The demo model's revisions, published as REPO by a hub on loopback."""
    fake = FakeHub()
    fake.add_from_cache(hub, demo_repo, REPO)
    with fake:
        yield fake


def _spec_file(directory: Path, cache: Path, **fields) -> Path:
    data = {
        "name": "offline",
        "model": REPO,
        "checkpoints": REVISIONS,
        "layers": "all",
        "tasks": ["DemoSTS"],
        "run_root": str(directory / "run"),
        "hf_cache": str(cache),
        "metrics": None,
        **fields,
    }
    path = directory / f"spec-{cache.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _spec(path: Path):
    return parse_spec(yaml.safe_load(path.read_text()))


def _online_env(fake: FakeHub, home: Path) -> dict[str, str]:
    """A clean environment for a subprocess that talks to the stand-in hub (and nothing else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=fake.endpoint,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `hf`, from this venv
    )
    return env


def _online(fake: FakeHub, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, env=_online_env(fake, home), capture_output=True, text=True, timeout=300
    )


def _prefetch(fake: FakeHub, spec_path: Path) -> subprocess.CompletedProcess:
    """`layertime prefetch SPEC` without its verification step (the tests verify here, offline)."""
    return _online(fake, spec_path.parent / "hf-home", sys.executable, "-m", "flows.commands", "prefetch",
                   str(spec_path), "--no-verify")  # fmt: skip


@pytest.fixture(scope="module")
def fetched(served: FakeHub, tmp_path_factory: pytest.TempPathFactory):
    """A cache filled by one prefetch; (spec file, the counters of that prefetch)."""
    directory = tmp_path_factory.mktemp("fetched")
    spec_path = _spec_file(directory, directory / "hub")
    served.reset_counters()
    done = _prefetch(served, spec_path)
    assert done.returncode == 0, done.stderr
    first = (dict(served.requests), served.bytes_sent, list(served.files_sent))
    return spec_path, first


@pytest.fixture
def copy(fetched, tmp_path: Path) -> Path:
    """A private copy of the prefetched cache (links kept), and a spec reading it."""
    spec_path, _ = fetched
    cache = tmp_path / "hub"
    shutil.copytree(_spec(spec_path).hf_cache, cache, symlinks=True)
    return _spec_file(tmp_path, cache)


def _snapshot(cache: Path, revision: str) -> Path:
    folder = repo_dir(REPO, cache)
    return folder / "snapshots" / (folder / "refs" / revision).read_text()


def _problems(spec_path: Path) -> list[verify.Item]:
    return verify.failed(verify.verify(_spec(spec_path), spec_path=spec_path))


def _unique_bytes(fake: FakeHub) -> int:
    blobs = {}
    for files in fake.repos[("model", REPO)].files.values():
        for name in select_model_files(files):
            blobs[hashlib.sha256(files[name]).hexdigest()] = len(files[name])
    return sum(blobs.values())


# ----------------------------------------------------------------------------- prefetch


@pytest.mark.slow
def test_prefetch_fills_the_cache_and_a_second_prefetch_transfers_nothing(served, fetched) -> None:
    spec_path, (requests, sent, files) = fetched
    cache = _spec(spec_path).hf_cache
    repo = served.repos[("model", REPO)]
    for revision in REVISIONS:  # every revision's ref, pointing at the served commit, with its files
        snapshot = _snapshot(cache, revision)
        assert snapshot.name == repo.refs[revision]
        for name, content in repo.files[snapshot.name].items():
            assert (snapshot / name).read_bytes() == content
    # Each distinct blob crossed the wire once (main and step3000 share one commit, the tokenizer is shared).
    assert sent == _unique_bytes(served) and len(files) == len(set(files))
    assert requests["GET cdn"] == 4  # one model.safetensors per distinct commit, through the "CDN" redirect

    served.reset_counters()
    again = _prefetch(served, spec_path)
    assert again.returncode == 0, again.stderr
    assert served.bytes_sent == 0 and served.files_sent == []
    assert set(served.requests) == {"GET api:revision"}  # only "which commit is this revision?"
    assert "fetched 0 B (0 of 5 repo revisions)" in again.stdout


@pytest.mark.slow
def test_the_prefetch_command_verifies_what_it_fetched(served, copy: Path) -> None:
    """`layertime prefetch SPEC` (the one CLI; verifying is its default) ends with `layertime verify`'s table."""
    done = _online(
        served, copy.parent / "hf-home", sys.executable, "-m", "flows.commands", "prefetch", str(copy)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fetched 0 B (0 of 5 repo revisions)" in done.stdout
    assert f"{REPO}@step1000 model.safetensors" in done.stdout and "ready for an offline run" in done.stdout


@pytest.mark.slow
def test_prefetch_refuses_before_downloading_when_the_disk_is_full(served, tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path, tmp_path / "hub")
    code = (
        "import sys\n"
        "from layertime.hub.prefetch import InsufficientSpaceError, estimate, prefetch\n"
        "from layertime.spec import load_spec\n"
        "spec = load_spec(sys.argv[1])\n"
        "print('estimate', estimate(spec))\n"
        "try:\n"
        "    prefetch(spec, free_space=lambda path: 100_000, progress=False)\n"
        "except InsufficientSpaceError as e:\n"
        "    print('refused:', e)\n"
        "    sys.exit(3)\n"
    )
    served.reset_counters()
    done = _online(served, tmp_path / "hf-home", sys.executable, "-c", code, str(spec_path))
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"estimate {_unique_bytes(served)}\n" in done.stdout
    assert "not enough disk space" in done.stdout and "100.0 KB free" in done.stdout
    assert served.bytes_sent == 0 and not served.requests["HEAD resolve"]  # only sizes were asked for
    assert not list((tmp_path / "hub").rglob("blobs/*"))


def test_check_space_and_estimate_count_each_blob_once(tmp_path: Path) -> None:
    weights = RemoteFile("model.safetensors", 900, "a" * 40, "b" * 64)
    tokenizer = RemoteFile("tokenizer.json", 100, "c" * 40)
    spec = _spec(_spec_file(tmp_path, tmp_path / "hub"))
    plan = prefetch.FetchPlan(spec, tmp_path / "hub")
    plan.fetches = [
        prefetch.Fetch("checkpoint step0", REPO, "model", "step0", "1" * 40, (weights, tokenizer)),
        prefetch.Fetch("checkpoint main", REPO, "model", "main", "2" * 40, (weights, tokenizer)),
    ]
    assert plan.total_bytes == plan.missing_bytes == 1000
    prefetch.check_space(1000, tmp_path, free_space=lambda p: 2000)
    with pytest.raises(prefetch.InsufficientSpaceError, match=r"needs 1.0 KB .* has 1.0 KB free"):
        prefetch.check_space(1000, tmp_path, free_space=lambda p: 1000)


def test_the_demo_model_is_built_locally_not_downloaded() -> None:
    from layertime.demo.model import DEMO_REPO

    assert prefetch.DEMO_REPO == DEMO_REPO


def test_select_model_files_prefers_safetensors_and_takes_the_tokenizer() -> None:
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md", "x/y.bin"]
    assert select_model_files(both) == ["config.json", "model.safetensors", "tokenizer.json"]
    only_bin = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                "pytorch_model.bin.index.json", "special_tokens_map.json", ".gitattributes"]  # fmt: skip
    assert select_model_files(only_bin) == sorted(set(only_bin) - {".gitattributes"})


# ----------------------------------------------------------------------------- verify


@pytest.mark.slow
def test_verify_passes_offline_and_never_calls_the_hub(served, fetched, monkeypatch) -> None:
    import huggingface_hub.constants

    spec_path, _ = fetched
    # The hub is reachable here (huggingface_hub's endpoint is the stand-in's): offline, a request any
    # code path still sent would reach it and be counted.
    monkeypatch.setenv("HF_ENDPOINT", served.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", served.endpoint)
    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        served.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    served.reset_counters()
    items = verify.verify(_spec(spec_path), spec_path=spec_path)
    assert sum(served.requests.values()) == 0
    assert all(i.ok and i.fix is None for i in items), verify.format_table(items)
    kinds = {(i.item.split(" ")[0], i.kind) for i in items}
    for revision in REVISIONS:
        for kind in ("weights", "config", "tokenizer"):
            assert (f"{REPO}@{revision}", kind) in kinds
    assert ("task", "task") in kinds
    table = verify.format_table(items, spec_path)
    assert "ready for an offline run" in table and "fix:" not in table


@pytest.mark.slow
def test_a_deleted_weight_blob_fails_verify_and_its_fix_command_repairs_it(served, copy: Path) -> None:
    cache = _spec(copy).hf_cache
    (_snapshot(cache, "step1000") / "model.safetensors").resolve().unlink()
    [problem] = _problems(copy)
    assert problem.item == f"{REPO}@step1000 model.safetensors"
    assert (problem.kind, problem.status) == ("weights", "missing")
    assert problem.fix == f"hf download {REPO} model.safetensors --revision step1000 --cache-dir {cache}"
    assert problem.fix in verify.format_table(verify.verify(_spec(copy)), copy)

    done = _online(served, copy.parent / "hf-home", "bash", "-c", problem.fix)
    assert done.returncode == 0, done.stderr
    assert _problems(copy) == []


@pytest.mark.slow
def test_a_deleted_snapshot_link_or_revision_ref_fails_verify_and_prefetch_restores_it(
    served, copy: Path
) -> None:
    cache = _spec(copy).hf_cache
    (_snapshot(cache, "step0") / "tokenizer.json").unlink()
    (repo_dir(REPO, cache) / "refs" / "step2000").unlink()
    problems = {p.item: p for p in _problems(copy)}
    assert set(problems) == {f"{REPO}@step0 tokenizer", f"{REPO}@step2000"}
    assert problems[f"{REPO}@step0 tokenizer"].status == "missing"
    assert problems[f"{REPO}@step0 tokenizer"].fix == (
        f"hf download {REPO} tokenizer.json --revision step0 --cache-dir {cache}"
    )
    ref = problems[f"{REPO}@step2000"]
    assert (ref.kind, ref.status, ref.detail) == ("revision", "missing", "no ref in the cache")
    assert ref.fix == (
        f"hf download {REPO} --revision step2000 --include '*.json' --include '*.txt' --include '*.model' "
        f"--include 'model*.safetensors' --cache-dir {cache}"  # the format the other revisions have
    )

    done = _online(served, copy.parent / "hf-home", "bash", "-c", ref.fix)
    assert done.returncode == 0, done.stderr
    assert [p.item for p in _problems(copy)] == [f"{REPO}@step0 tokenizer"]
    served.reset_counters()
    done = _prefetch(served, copy)
    assert done.returncode == 0, done.stderr
    assert served.bytes_sent == 0  # the blob was there: only the link came back
    assert _problems(copy) == []


def test_a_ref_that_is_not_a_commit_is_refused_by_plan_and_run_and_verify_names_its_fix(
    served, copy: Path
) -> None:
    from typer.testing import CliRunner

    from flows.commands import app

    cache = _spec(copy).hf_cache
    ref = repo_dir(REPO, cache) / "refs" / "step2000"
    ref.write_text("../../../../elsewhere")  # followed, it would name a folder outside the repo
    for command in (["plan"], ["run", "--plain"]):
        out = CliRunner().invoke(app, [*command, str(copy)])
        assert out.exit_code == 2 and "Traceback" not in out.output, out.output
        assert out.stderr.count("error:") == 1 and f"{ref}: the ref of {REPO}@step2000 holds " in out.stderr
        assert "not a 40-hex commit" in out.stderr, out.stderr
    assert not (copy.parent / "run").exists()

    (problem,) = _problems(copy)
    assert (problem.item, problem.kind, problem.status) == (f"{REPO}@step2000", "revision", "corrupt")
    assert "not a 40-hex commit" in problem.detail
    assert problem.fix == f"hf download {REPO} --revision step2000 --cache-dir {cache}"
    done = _online(served, copy.parent / "hf-home", "bash", "-c", problem.fix)
    assert done.returncode == 0, done.stderr
    assert _problems(copy) == []  # the fix wrote the ref again


@pytest.mark.slow
def test_a_truncated_weight_file_is_caught_and_prefetch_fetches_it_again(served, copy: Path) -> None:
    cache = _spec(copy).hf_cache
    blob = (_snapshot(cache, "step2000") / "model.safetensors").resolve()
    size = blob.stat().st_size
    os.truncate(blob, size - 1000)
    [problem] = _problems(copy)
    assert (problem.item, problem.status) == (f"{REPO}@step2000 model.safetensors", "corrupt")
    assert problem.detail == f"{size - 1000} bytes, expected {size}"
    assert problem.fix.endswith("--force-download")

    served.reset_counters()
    done = _prefetch(served, copy)
    assert done.returncode == 0, done.stderr
    assert served.bytes_sent == size  # that file, and only it
    assert f"re-fetched {REPO}@step2000/model.safetensors" in done.stdout
    assert _problems(copy) == []


def test_verify_catches_corruption_without_a_tree_listing(hub: Path, demo_repo: str, tmp_path: Path) -> None:
    """A cache not written by snapshot_download (the fabricated demo cache) has no sizes to compare
    with: an LFS blob's name is its sha256, and the safetensors header gives the length."""
    cache = tmp_path / "hub"
    shutil.copytree(repo_dir(demo_repo, hub), repo_dir(demo_repo, cache), symlinks=True)
    spec_path = _spec_file(tmp_path, cache, model=demo_repo, checkpoints=["step0", "step1000"])
    assert _problems(spec_path) == []
    blob = (repo_dir(demo_repo, cache) / "snapshots").glob("*/model.safetensors")
    target = next(
        p for p in blob if p.parent.name == (repo_dir(demo_repo, cache) / "refs" / "step1000").read_text()
    ).resolve()  # noqa: E501
    data = target.read_bytes()
    target.write_bytes(data[:-64])
    [problem] = _problems(spec_path)
    assert (problem.item, problem.status) == (f"{demo_repo}@step1000 model.safetensors", "corrupt")
    assert problem.detail.startswith("sha256 ")
    assert verify._safetensors_problem(target, len(data) - 64).endswith("(truncated)")


@pytest.mark.slow
def test_real_task_datasets_are_fetched_as_snapshots_and_loaded_from_them(served, tmp_path: Path) -> None:
    """A real MTEB reranking task (SciDocsRR): its dataset at mteb's pinned revision, served by the stand-in
    hub, is missing before the prefetch (with its fix), then loads offline with its candidate lists."""
    assert task_dataset("SciDocsRR") == ("mteb/SciDocsRR", SCIDOCS_REVISION)
    if ("dataset", "mteb/SciDocsRR") not in served.repos:
        served.add("mteb/SciDocsRR", _reranking_files(), [], repo_type="dataset", commit=SCIDOCS_REVISION)
    cache = tmp_path / "hub"
    spec_path = _spec_file(tmp_path, cache, tasks=["SciDocsRR"], checkpoints=["step0"])
    [problem] = [p for p in _problems(spec_path) if p.kind == "dataset"]
    assert problem.status == "missing"
    assert problem.fix == (
        f"hf download mteb/SciDocsRR --repo-type dataset --revision {SCIDOCS_REVISION} --cache-dir {cache}"
    )
    done = _prefetch(served, spec_path)
    assert done.returncode == 0, done.stderr
    items = verify.verify(_spec(spec_path))
    assert all(i.ok for i in items), verify.format_table(items)
    [task] = [i for i in items if i.item == "task SciDocsRR"]
    assert task.detail == "loads, candidate lists present"


def test_reranking_without_candidate_lists_is_reported() -> None:
    class Task:
        dataset = {"default": {"test": {"queries": ["q1", "q2"], "top_ranked": None}}}

    assert "no per-query candidate lists" in verify._candidates_problem(Task())
    Task.dataset["default"]["test"]["top_ranked"] = {"q1": ["d1"]}
    assert verify._candidates_problem(Task()) == "default/test: candidate lists for 1 of 2 queries"


@pytest.mark.slow
def test_the_wikitext_corpus_is_prefetched_into_the_datasets_cache_and_verifies_offline(
    served, tmp_path
) -> None:
    from layertime import metrics_corpus as mc

    lines = [
        "",
        " = Valkyria Chronicles = \n",
        *(f" line {i} of the article , long enough .\n" for i in range(40)),
    ]
    if ("dataset", mc.WIKITEXT_REPO) not in served.repos:
        served.add(mc.WIKITEXT_REPO, _wikitext_files(lines), ["main"], repo_type="dataset")
    spec_path = _spec_file(tmp_path, tmp_path / "hub", checkpoints=["main"],
                           metrics={"corpus": "wikitext-103", "lines": 30})  # fmt: skip
    for attempt in range(2):
        served.reset_counters()
        done = _prefetch(served, spec_path)
        assert done.returncode == 0, done.stderr
        assert (served.bytes_sent > 0) == (attempt == 0)  # the second prefetch transfers nothing
    # verify, offline, in a process that shares the prefetch's datasets cache (HF_HOME)
    env = {**_online_env(served, spec_path.parent / "hf-home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.commands", "verify", str(spec_path), "--no-load-tasks"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "metrics corpus wikitext-103" in done.stdout and "28 prompts" in done.stdout
    )  # 30 - blank - heading


def _wikitext_files(lines: list[str]) -> dict[str, bytes]:
    """Salesforce/wikitext's layout: a card naming the configs, parquet files per config and split."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(rows: list[str]) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": rows}), buffer)
        return buffer.getvalue()

    card = "---\n" + yaml.safe_dump({"configs": [{"config_name": "wikitext-103-v1", "data_files": [
        {"split": "train", "path": "wikitext-103-v1/train-*"}, {"split": "test", "path": "wikitext-103-v1/test-*"}
    ]}]}) + "---\n"  # fmt: skip
    return {
        "README.md": card.encode(),
        "wikitext-103-v1/train-00000-of-00001.parquet": parquet(lines),
        "wikitext-103-v1/test-00000-of-00001.parquet": parquet(lines[:5]),
    }


def test_a_missing_wikitext_corpus_names_the_command_that_fetches_it(
    hub: Path, demo_repo: str, tmp_path
) -> None:
    from layertime import metrics_corpus

    spec_path = _spec_file(
        tmp_path, hub, model=demo_repo, checkpoints=["main"], metrics={"corpus": "wikitext-103"}
    )
    [problem] = _problems(spec_path)
    assert (problem.item, problem.status) == ("metrics corpus wikitext-103", "missing")
    assert problem.fix == metrics_corpus.prefetch_command()


def _reranking_files() -> dict[str, bytes]:
    """A tiny dataset repo in the retrieval format mteb 2.x reads reranking tasks from."""
    rows = {
        "corpus/test.jsonl": [
            {"id": f"d{i}", "title": "", "text": f"document {i} on topic {i % 3}"} for i in range(9)
        ],
        "queries/test.jsonl": [{"id": f"q{i}", "text": f"query about topic {i}"} for i in range(3)],
        "qrels/test.jsonl": [{"query-id": f"q{i}", "corpus-id": f"d{i}", "score": 1} for i in range(3)],
        "top_ranked/test.jsonl": [
            {"query-id": f"q{i}", "corpus-ids": [f"d{j}" for j in range(i, i + 5)]} for i in range(3)
        ],  # fmt: skip
    }
    configs = {"corpus": "corpus", "queries": "queries", "default": "qrels", "top_ranked": "top_ranked"}
    card = "---\n" + yaml.safe_dump({
        "configs": [{"config_name": c, "data_files": [{"split": "test", "path": f"{d}/test.jsonl"}]}
                    for c, d in configs.items()]
    }) + "---\n# a fake mteb/SciDocsRR\n"  # fmt: skip
    files = {name: "".join(json.dumps(r) + "\n" for r in data).encode() for name, data in rows.items()}
    return {"README.md": card.encode(), **files}
