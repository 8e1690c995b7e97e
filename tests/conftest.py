"""The offline test world (docs/design.md §9) and the fixtures every test shares (docs/development.md).

- `hub`, `demo_repo`: a fabricated HF hub cache with the tiny demo model and config-only Pythia-410m
  revisions, loaded by repo id and revision with HF_HUB_OFFLINE=1; built once per run (shared by the
  pytest-xdist workers).
- `prefect_server`: one real `prefect server start` for the session (tests/prefect_runs.py);
  `prefect_api`: this process's flows and Prefect client pointed at it for one test, scoring in the
  session's warm pool of scoring processes (`warm_scoring_pool`). A subprocess reaches it with
  `prefect_runs.client_env(server)`.
- `exclusive`: `with exclusive("slurm"):` one test at a time, across pytest-xdist workers, for what
  the machine has only one of (the single-node SLURM).
- `postgres_url`: the PostgreSQL server of .ci/postgres.sh.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Before anything imports huggingface_hub or mteb: no network, and no writes to ~/.cache.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="layertime-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["MTEB_CACHE"] = str(_SESSION_TMP / "mteb")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The tests' Prefect servers send no telemetry (offline; its write raced SQLite: a 40-line traceback).
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import pytest  # noqa: E402

PYTHIA = "EleutherAI/pythia-410m"


def _run_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of this pytest run that every pytest-xdist worker sees (each has a basetemp of
    its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, held across processes (flock) while the context lasts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache holding the demo model (step0..step3000, main) and Pythia-410m configs. Built once
    per run (training the demo model: ~12 CPU-s); the pytest-xdist workers share it."""
    from layertime.demo.model import ensure_demo_model
    from layertime.hub.fake import PYTHIA_410M_CONFIG, write_config_only_repo

    cache = _run_tmp(tmp_path_factory) / "hub"
    with _locked(cache.parent / "hub.lock"):  # the first worker builds it, the others wait and read it
        if not (cache.parent / "hub.ready").exists():
            ensure_demo_model(cache)
            steps = [f"step{s}" for s in range(94000, 143001, 1000)]
            write_config_only_repo(cache, PYTHIA, PYTHIA_410M_CONFIG, steps, {"main": "step143000"})
            (cache.parent / "hub.ready").touch()
    return cache


@pytest.fixture(scope="session")
def demo_repo(hub: Path) -> str:
    from layertime.demo.model import DEMO_REPO

    return DEMO_REPO


# --- the order of the test files -------------------------------------------------------------------
# pytest-xdist hands whole files to its workers in collection order (`make test`: --dist loadfile
# --no-loadscope-reorder): the longest files go first, so the run does not end waiting on one of them
# started last. Measured (docs/development.md); a file not listed keeps its place after these. Only
# the order changes; within a file, tests run as written.
LONGEST_FIRST = (
    "tests/test_scale_retry.py",
    "tests/test_slurm.py",
    "tests/test_scale.py",
    "tests/test_shared_store.py",
    "tests/test_signals.py",
    "tests/test_flow_promises.py",
    "tests/test_flow.py",
    "tests/test_score_batches.py",
    "tests/test_faults.py",
    "tests/test_worker_faults.py",  # SLURM, a server, a worker per test: apart from test_slurm.py (they take turns)
    "tests/test_embedded.py",
    "tests/test_reproducible.py",
    "tests/test_deployment.py",
    "tests/test_store_integrity.py",
    "tests/test_offline_deployment.py",
    "tests/test_errors.py",
    "tests/test_cleanup_in_flow.py",
    "tests/test_layer_search_flow.py",  # ~4 min alone: two searches, a grid run, a SIGKILL
    "tests/test_orchestration_slurm.py",  # SLURM, as test_slurm.py: far from it (they take turns)
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay whole


# --- a guarantee test that skips fails the run under CI=true ---------------------------------------
# The Guarantees table (docs/guarantees.md) names the test that proves each guarantee; some need a real
# SLURM, root or Chromium and skip without them. Locally a skip is fine; in CI (CI=true) it would be a
# guarantee silently unproved, so it is reported as a failure instead.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and _proves_a_guarantee(item):
        from guarantees import GUARANTEES  # tests/guarantees.py (on sys.path, like hubserver)

        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} proves a guarantee of {GUARANTEES} and must run in CI; it skipped: {reason}"
        )


def _proves_a_guarantee(item: pytest.Item) -> bool:
    from guarantees import GUARANTEES, guarantee_tests  # tests/guarantees.py (on sys.path, like hubserver)

    named = guarantee_tests(item.config.rootpath / GUARANTEES)
    where = item.path.relative_to(item.config.rootpath).as_posix()
    return (where, getattr(item, "originalname", item.name)) in named


@pytest.fixture(scope="module")
def postgres_url() -> str:
    """The PostgreSQL server .ci/run starts (.ci/postgres.sh); skipped locally without it, failed in CI."""
    url = os.environ.get("LAYERTIME_PG_URL")
    if not url:
        message = "LAYERTIME_PG_URL is unset: run `export LAYERTIME_PG_URL=$(bash .ci/postgres.sh start)`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message} (CI must run this test; .ci/run does that)")
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def exclusive(tmp_path_factory: pytest.TempPathFactory):
    """`with exclusive(name):` held by one test at a time across the pytest-xdist workers of this run,
    for what the machine has one of: "slurm" (the single node's 2 CPUs: two tests' jobs would queue
    behind each other and time out)."""
    locks = _run_tmp(tmp_path_factory) / "locks"
    return lambda name: _locked(locks / f"{name}.lock")


# --- Prefect: one server per session, a warm scoring pool -----------------------------------------


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One real `prefect server start` on loopback for the session (each pytest-xdist worker has its
    own), SQLite in its own home. Flow runs of many tests share it; read back your own by id."""
    import prefect_runs  # tests/prefect_runs.py (tests/ is on sys.path)

    server = prefect_runs.start(tmp_path_factory.mktemp("prefect-server"))
    yield server
    prefect_runs.orch.stop(server.proc)


@pytest.fixture(scope="session")
def warm_scoring_pool():
    """The session's scoring processes (`tasks.units.keep_scoring_processes`): every in-process flow
    run of the local profile's default size (one per core) scores in them, instead of spawning two
    that import mteb (~8 CPU-s a flow run). A flow run of another size, the CLI's subprocesses and
    tests of the pool itself (tests/test_pool.py) start their own."""
    from tasks import units

    with units.keep_scoring_processes(os.cpu_count() or 1) as pool:
        yield pool


@pytest.fixture
def prefect_api(prefect_server, warm_scoring_pool):
    """This process's flows and Prefect client on the session's server for one test; yields the server.
    A setting of the test's context: a thread the test starts itself sees it when it runs in a copy
    of that context (`contextvars.copy_context().run`); Prefect's own task threads do."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api}):
        yield prefect_server
        _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send the logs and events this process still holds, while the server is known: a worker left
    holding them tries again later, at a server that is gone (as prefect_test_harness drains)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.utilities.asyncutils import run_coro_as_sync

    run_coro_as_sync(APILogHandler.aflush())
    EventsWorker.drain_all()


# --- where the suite's time goes (docs/development.md) ---------------------------------------------
# With LAYERTIME_TEST_CPU=<file>, each test's CPU seconds (setup, call, teardown) are appended to
# <file>: this process's, its reaped children's and its live descendants' (the session's server and
# scoring processes, a `layertime run` subprocess), read from /proc; SLURM jobs are slurmd's, not ours.
# The summary lists the files by CPU seconds. Under pytest-xdist each worker appends its own lines.


def _tree_cpu_s() -> float:
    import resource

    used = sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    parents, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            parents[int(entry)] = int(fields[1])
            ticks[int(entry)] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    below = {os.getpid()}
    for _ in range(16):  # descendants, level by level
        below |= {pid for pid, parent in parents.items() if parent in below}
    return used + sum(ticks[pid] for pid in below - {os.getpid()}) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    report = os.environ.get("LAYERTIME_TEST_CPU")
    if not report:
        yield
        return
    import time

    cpu, wall = _tree_cpu_s(), time.monotonic()
    yield
    cpu, wall = _tree_cpu_s() - cpu, time.monotonic() - wall
    with open(report, "a") as out:
        out.write(f"{item.nodeid}\t{cpu:.2f}\t{wall:.2f}\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    report = os.environ.get("LAYERTIME_TEST_CPU")
    if not report or os.environ.get("PYTEST_XDIST_WORKER") or not Path(report).exists():
        return
    by_file: dict[str, list[float]] = {}
    for line in Path(report).read_text().splitlines():
        nodeid, cpu, wall = line.split("\t")
        totals = by_file.setdefault(nodeid.split("::")[0], [0.0, 0.0])
        totals[0] += float(cpu)
        totals[1] += float(wall)
    terminalreporter.section("CPU seconds by test file (LAYERTIME_TEST_CPU)")
    for name, (cpu, wall) in sorted(by_file.items(), key=lambda kv: -kv[1][0]):
        terminalreporter.write_line(f"{cpu:8.1f} CPU-s {wall:8.1f} s  {name}")
    total = sum(cpu for cpu, _ in by_file.values())
    terminalreporter.write_line(f"{total:8.1f} CPU-s in all")


# --- Prefect's console handlers after an in-process CLI run -----------------------------------------


@pytest.fixture(autouse=True)
def _prefect_console_on_a_live_stream():
    """Prefect's logging set-up gives its console handlers the stderr of the moment: inside a CliRunner
    invocation that is the runner's stream, closed when the invocation ends. A warning a later test
    logs (a rejected store file, say) would then print a "--- Logging error ---" traceback into that
    test's output. Not a problem of a real process, whose stderr stays open: put them back on it. The
    same holds for distributed's own stderr handler when the first `import distributed` of the session
    happens inside an invocation (the SLURM commands import it lazily)."""
    yield
    import logging
    import sys

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if not isinstance(handler, logging.StreamHandler):
                continue
            if getattr(handler.stream, "closed", False):
                handler.stream = sys.__stderr__  # not setStream: it flushes the closed stream first
            console = getattr(handler, "console", None)  # PrefectConsoleHandler prints through a rich Console
            if console is not None and getattr(console.file, "closed", False):
                console.file = sys.__stderr__
