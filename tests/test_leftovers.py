"""Nothing outlives a run, nothing listens beyond loopback (issue 24).

A run killed with SIGKILL of its main pid only (what the OOM killer does) used to leave the Prefect
server, the resource tracker and scoring processes running for good, plus a temp directory and
semaphores per kill and the embeddings of units it had finished; its Dask scheduler and worker served
HTTP on every interface. Here: a real `layertime run` (flow) is killed mid-work and its processes,
sockets, temp directories and semaphores are looked at from outside; then `--plain` runs are killed
too, and a clean run must leave the tables of an untouched run, value for value, and nothing else.
Each attack on the store starts from a copy of one finished run (`finished`)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import psutil
import pytest
import yaml
from specs import DEMO, ROOT  # tests/specs.py
from test_faults import _cli

from layertime import claims, leftovers

GRID = {"checkpoints": ["step0", "step1000"], "layers": [1, 3], "tasks": ["DemoSTS", "DemoClassification"],
        "metrics": None}  # fmt: skip
UNITS = 2 * 2 * 2
STARTED_WITHIN_S = 900  # a loaded 2-core machine starts Prefect slowly: generous
GONE_WITHIN_S = 5.0  # the promise


def _spec(root: Path, hub: Path, **fields) -> Path:
    data = {**DEMO, **GRID, "run_root": str(root / "run/demo"), "hf_cache": str(hub), **fields}
    path = root / "spec.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _table(root: Path, name: str) -> pl.DataFrame:
    """A table as the run wrote it, but its measured costs (another run takes other seconds)."""
    table = pl.read_parquet(root / "run/demo/tables" / f"{name}.parquet")
    table = table.drop([c for c in ("seconds", "peak_memory_gb") if c in table.columns])
    return table.sort([c for c in ("revision", "task", "layer", "subset") if c in table.columns])


def _same_tables(root: Path, reference: Path) -> None:
    for name in ("scores", "layers"):
        assert _table(root, name).equals(_table(reference, name)), name  # tolerance zero


def _embeddings(root: Path) -> list[Path]:
    return sorted(p for p in (root / "run/store/embeddings").glob("*/*/*/*") if p.is_dir())


def _records(root: Path) -> set[Path]:
    return set((root / "run/store/scores").rglob("layer_*.json"))


@pytest.fixture(scope="module")
def finished(hub, tmp_path_factory) -> Path:
    """One untouched run of GRID (`--plain`), its embeddings kept: what every attack is compared to."""
    root = tmp_path_factory.mktemp("finished")
    out = _cli("run", "--plain", str(_spec(root, hub, keep_embeddings=True)))
    assert out.exit_code == 0, out.output
    assert len(_records(root)) == UNITS and len(_embeddings(root)) == 4
    return root


# --- embeddings of scored units ---------------------------------------------------------------------


@pytest.mark.slow
def test_embeddings_of_scored_units_a_killed_run_left_are_deleted_by_the_next_run(finished, hub, tmp_path):
    """Every layer recorded, the embeddings still there: what a run killed between its last record
    and the delete leaves. The next run deletes them (but one another run claims), computing nothing."""
    shutil.copytree(finished / "run", tmp_path / "run")
    spec = _spec(tmp_path, hub)
    units = _embeddings(tmp_path)
    records = {p: p.stat().st_mtime_ns for p in _records(tmp_path)}

    with claims.claim(units[0]):  # another run still reads this one
        out = _cli("run", "--plain", str(spec))

    assert out.exit_code == 0, out.output
    assert "scored 0 (checkpoint, task, layer) units, 8 already done" in out.stdout
    assert _embeddings(tmp_path) == units[:1]
    assert {p: p.stat().st_mtime_ns for p in _records(tmp_path)} == records
    _same_tables(tmp_path, finished)
    assert _cli("run", "--plain", str(spec)).exit_code == 0 and _embeddings(tmp_path) == []


# --- a run killed with SIGKILL of its main pid --------------------------------------------------------


def _start(spec: Path, directory: Path, name: str, marker: str, *args: str) -> subprocess.Popen:
    """`layertime run SPEC ARGS` in a session of its own, with a fresh embedded Prefect; `marker` in the
    environment of every process it starts (tests/test_signals.py does the same)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=str(directory / "prefect"), LAYERTIME_TEST_RUN=marker,
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")  # fmt: skip
    out, err = (open(directory / f"{name}.{s}", "w") for s in ("out", "err"))
    with out, err:
        return subprocess.Popen([sys.executable, "-m", "flows.commands", "run", str(spec), *args], cwd=ROOT,
                                env=env, start_new_session=True, stdout=out, stderr=err)  # fmt: skip


def _of_run(marker: str) -> dict[int, str]:
    """Living processes that carry `marker` (zombies are dead: only their exit status is left)."""
    found = {}
    entry = f"LAYERTIME_TEST_RUN={marker}".encode()
    for p in psutil.process_iter(["status", "cmdline"]):
        try:
            if (
                p.info["status"] != psutil.STATUS_ZOMBIE
                and entry in Path(f"/proc/{p.pid}/environ").read_bytes()
            ):
                found[p.pid] = " ".join(p.info["cmdline"] or [])[:160]
        except (OSError, psutil.Error):
            continue
    return found


def _listening(pids) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every socket the processes listen on."""
    found = set()
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((c.laddr.ip, c.laddr.port, pid))
        except psutil.Error:
            continue
    return found


def _owned_temp_dirs(pids: set[int]) -> list[Path]:
    """Our temp directories (layertime/leftovers.py) whose owner is one of `pids`."""
    found = []
    for directory in leftovers.temp_root().glob(f"{leftovers.PREFIX}*"):
        try:
            owner = json.loads((directory / leftovers.OWNER).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == socket.gethostname() and owner.get("pid") in pids:
            found.append(directory)
    return found


@dataclass
class Killed:
    """What was seen of runs killed mid-work with SIGKILL of their main pid."""

    root: Path
    spec: Path
    mains: set[int] = field(default_factory=set)
    listening: set[tuple[str, int, int]] = field(default_factory=set)  # while the flow ran
    before: dict[int, str] = field(default_factory=dict)  # the flow's processes at the kill
    left: dict[int, str] = field(default_factory=dict)  # ... GONE_WITHIN_S later
    gone_after_s: float | None = None
    semaphores: set[str] = field(default_factory=set)  # what the killed runs' processes had open


def _kill_mid_work(killed: Killed, name: str, *args: str, watch_sockets: bool = False) -> bool:
    """Start a run, SIGKILL its main pid once it records a unit more, and watch it go; False when it
    finished first (nothing left to kill it in)."""
    marker = uuid.uuid4().hex
    recorded = _records(killed.root)
    run = _start(killed.spec, killed.root, name, marker, *args)
    deadline = time.monotonic() + STARTED_WITHIN_S
    try:
        while _records(killed.root) <= recorded:
            if watch_sockets:
                killed.listening |= _listening(_of_run(marker))
            if run.poll() is not None:
                assert run.returncode == 0, (killed.root / f"{name}.err").read_text()[-3000:]
                return False
            assert time.monotonic() < deadline, "no unit was recorded in time"
            time.sleep(0.2)
        processes = _of_run(marker)
        if watch_sockets:
            killed.listening |= _listening(processes)
        killed.semaphores |= leftovers.mapped_semaphores(processes)
        os.kill(run.pid, signal.SIGKILL)  # the main pid only, as the OOM killer does
        start = time.monotonic()
        run.wait()
        while (left := _of_run(marker)) and time.monotonic() - start < GONE_WITHIN_S:
            time.sleep(0.05)
        if watch_sockets:  # the flow: what the promise is measured on
            killed.before, killed.left = processes, left
            killed.gone_after_s = time.monotonic() - start
        killed.mains.add(run.pid)
        return True
    finally:
        for pid in _of_run(marker):  # never leave a process behind, whatever the test found
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def killed(hub, tmp_path_factory) -> Killed:
    """A `layertime run` (the flow) of GRID killed with SIGKILL of its main pid once a unit is recorded."""
    root = tmp_path_factory.mktemp("killed")
    found = Killed(root, _spec(root, hub))
    assert _kill_mid_work(found, "flow", watch_sockets=True), "the flow finished before it could be killed"
    return found


@pytest.mark.slow
def test_nothing_a_run_starts_listens_beyond_loopback(killed):
    commands = " | ".join(killed.before.values())
    assert "uvicorn" in commands and "spawn_main" in commands  # the server and the scoring processes ran
    assert killed.listening, "no listening socket seen: the flow's servers were not looked at"
    exposed = {s for s in killed.listening if not ipaddress.ip_address(s[0]).is_loopback}
    assert exposed == set(), exposed  # no Dask dashboard on 0.0.0.0:8787, no worker HTTP on 0.0.0.0


@pytest.mark.slow
def test_a_sigkill_of_the_main_pid_leaves_no_process_of_the_run_within_5_s(killed):
    commands = " | ".join(killed.before.values())
    assert "uvicorn" in commands and "resource_tracker" in commands and "spawn_main" in commands
    print(f"{len(killed.before)} processes of the run gone {killed.gone_after_s:.2f} s after the SIGKILL")
    assert killed.left == {}, killed.left
    assert _owned_temp_dirs(killed.mains) == []  # its Prefect directory and the watchdog's notes
    assert killed.semaphores  # the scoring pool's queues had some open...
    assert not [s for s in killed.semaphores if (leftovers.SHM / s).exists()]  # ...none is left


@pytest.mark.slow
def test_sigkills_mid_work_then_a_clean_run_leave_the_tables_of_an_untouched_run_and_nothing_else(
    killed, finished
):
    """Two `--plain` runs killed after the flow, each once it records a unit more; then a clean run."""
    kills = 1 + sum(_kill_mid_work(killed, f"plain{i}", "--plain") for i in range(2))
    assert kills >= 2, "the grid was done before a second kill"
    done = _start(killed.spec, killed.root, "clean", uuid.uuid4().hex)  # the flow again, to the end
    assert done.wait(timeout=STARTED_WITHIN_S) == 0, (killed.root / "clean.err").read_text()[-3000:]

    _same_tables(killed.root, finished)
    assert len(_records(killed.root)) == UNITS
    assert _embeddings(killed.root) == []  # every unit is scored: none of its embeddings is kept
    assert _owned_temp_dirs(killed.mains | {done.pid}) == []
    assert not [s for s in killed.semaphores if (leftovers.SHM / s).exists()]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_process_of_a_watched_run_dies_with_its_sigkilled_main_process_even_out_of_its_session():
    """The watchdog alone, without a flow: a child that left the run's session (no group kill reaches
    it) dies within seconds of a SIGKILL of the main process, and the run's notes are removed."""
    code = (
        "import subprocess, sys, time\n"
        "from layertime.watchdog import watched\n"
        "with watched() as notes:\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "    print(child.pid, notes, flush=True)\n"
        "    time.sleep(600)\n"
    )
    main = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child, notes = main.stdout.readline().split()
    child, notes = int(child), Path(notes)
    try:
        assert _alive(child) and notes.is_dir()
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while (_alive(child) or notes.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the run's child outlived its main process"
        assert not notes.exists()
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


# --- the slurm profile ----------------------------------------------------------------------------


def test_under_the_slurm_profile_only_the_schedulers_port_listens_beyond_loopback(tmp_path, monkeypatch):
    """The scheduler lives in the flow's process and the workers on other nodes must reach its port;
    nothing else of it (no dashboard, no HTTP server on 0.0.0.0:8787) may be reachable from them."""
    from flows.clusters import LayertimeSLURMCluster, cluster_kwargs, load_slurm_settings

    for name in [k for k in os.environ if k.startswith("LAYERTIME_SLURM_")]:
        monkeypatch.delenv(name)
    settings = load_slurm_settings({"preflight": False, "score_jobs": 0, "bigmem_jobs": 0,
                                    "log_directory": str(tmp_path / "logs")})  # fmt: skip
    kwargs = cluster_kwargs(settings, "http://127.0.0.1:4200/api")
    here = psutil.Process()
    before = _listening([here.pid])
    with LayertimeSLURMCluster(**kwargs) as cluster:  # no job is submitted: min_jobs applies to adapt
        opened = _listening([here.pid]) - before
        port = int(cluster.scheduler_address.rsplit(":", 1)[1])
    exposed = {(ip, p) for ip, p, _ in opened if not ipaddress.ip_address(ip).is_loopback}
    assert exposed and {p for _, p in exposed} == {port}, opened  # its own port, on every interface
    assert [p for _, p, _ in opened if p == 8787] == []
    worker = " ".join(kwargs["worker_extra_args"])  # and the workers' HTTP servers on their loopback
    assert "--no-dashboard --dashboard-address 127.0.0.1:0" in worker


# --- what dead runs left: only ours, only when their owner is gone ---------------------------------


def test_temp_dirs_are_removed_once_their_owner_is_gone_and_only_ours():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    made = {
        "dead": leftovers.owned_temp_dir("test", leftovers.owner_of(dead.pid) | {"start": 1}),
        "alive": leftovers.owned_temp_dir("test"),  # this process
        "reused pid": leftovers.owned_temp_dir("test", leftovers.owner_of() | {"start": 1}),
        "elsewhere": leftovers.owned_temp_dir("test", {"host": "another-node", "pid": 1, "start": 1}),
    }
    unowned = Path(tempfile.mkdtemp(prefix=f"{leftovers.PREFIX}unowned-"))  # no owner.json: not ours
    try:
        removed = leftovers.remove_dead_temp_dirs()
        assert {made["dead"], made["reused pid"]} <= set(removed)
        assert made["alive"].is_dir() and made["elsewhere"].is_dir() and unowned.is_dir()
        assert not made["dead"].exists() and not made["reused pid"].exists()
    finally:
        for path in [*made.values(), unowned]:
            shutil.rmtree(path, ignore_errors=True)


def test_a_dead_runs_semaphores_are_unlinked_unless_a_living_process_has_them_open():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    held = ctx.Lock()  # open in this (living) process
    name = _semaphore_of(held)
    gone = subprocess.run(  # a process that makes a semaphore and dies without unlinking it
        [sys.executable, "-c", "import _multiprocessing, os; "
         "s = _multiprocessing.SemLock(1, 1, 1, '/mp-layertime-test-' + str(os.getpid()), False); "
         "print('sem.mp-layertime-test-' + str(os.getpid())); os._exit(0)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert (leftovers.SHM / gone).exists() and name in leftovers.mapped_semaphores([os.getpid()])
    notes = leftovers.owned_temp_dir("test", {"host": socket.gethostname(), "pid": 1, "start": -1})
    leftovers.note_semaphores(notes, [gone, name, "sem.not-there", "../etc"])

    assert leftovers.remove_dead_temp_dirs() and not notes.exists()
    assert not (leftovers.SHM / gone).exists()
    assert (leftovers.SHM / name).exists()  # still open here: kept
    del held


def _semaphore_of(lock) -> str:
    return "sem." + lock._semlock.name.lstrip("/")
