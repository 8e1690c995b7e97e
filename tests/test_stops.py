"""The parts of a stop and of a small cluster that need no server (issue 23): the run root's lock names a
live holder with the command that ends it and takes over from a dead one; a stop runs the
orchestration's hooks; the flow's module loads where Prefect's worker loads it (a thread) without
dask_jobqueue; the profile check names the field to change; the progress fits its card; the device
hint fits the way the run was started; the embedded server sends no telemetry. The end-to-end stops
(cancel, server restart, a killed worker) are tests/test_worker_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from layertime.rundir import RunDir, RunInUse

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # fmt: skip


_HOLD = """
import os, sys, time
sys.path.insert(0, os.getcwd())
from pathlib import Path
from layertime.rundir import RunDir
lock = RunDir.of(Path(sys.argv[1])).lock("flow run probe")
lock.__enter__()
if sys.argv[2] == "fork" and os.fork() == 0:  # a child that keeps the lock's file open, as a fork does
    time.sleep(60)
    os._exit(0)
print("held", flush=True)
if sys.argv[2] == "fork":
    os._exit(0)  # the holder dies; its forked child lives on
time.sleep(60)
"""


def test_a_live_holder_of_the_run_root_is_named_with_the_command_that_ends_it(tmp_path):
    holder = _python(_HOLD, str(tmp_path / "run"), "hold")
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunInUse) as refused, RunDir.of(tmp_path / "run").lock():
            pass
        message = str(refused.value)
        assert (
            f"in use by pid {holder.pid} on {os.uname().nodename}" in message and "flow run probe" in message
        )
        assert f"`kill {holder.pid}`" in message and "orphaned" not in message
    finally:
        holder.kill()
        holder.wait()
    with RunDir.of(tmp_path / "run").lock():  # the kernel released it with the process
        pass


def test_an_orphaned_holder_is_named_as_such_with_the_command_that_ends_it(tmp_path):
    # A parent (a worker) starts the holder and dies: the holder lives on, re-parented.
    code = f'{sys.executable} -c "$0" "$1" hold & echo $!; sleep 2; kill -9 $$'
    parent = subprocess.Popen(["sh", "-c", code, textwrap.dedent(_HOLD), str(tmp_path / "run")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline() == "held\n"
        parent.wait(timeout=30)
        with pytest.raises(RunInUse) as refused, RunDir.of(tmp_path / "run").lock():
            pass
        assert f"an orphaned run (pid {parent.pid}, which started it, is gone); `kill {pid}` ends it" in str(
            refused.value
        )
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_run_root_whose_holder_died_is_taken_over_at_once_though_a_child_keeps_its_file(tmp_path):
    dead = _python(_HOLD, str(tmp_path / "run"), "fork")
    assert dead.stdout.readline() == "held\n"
    dead.wait(timeout=30)
    lock = tmp_path / "run/.lock"
    assert lock.read_text().startswith(f"pid {dead.pid} ")
    child = [p for p in os.listdir("/proc") if p.isdigit() and _holds(int(p), lock)]
    assert child, "the forked child should keep the old lock file open"
    try:
        started = time.monotonic()
        with RunDir.of(tmp_path / "run").lock("the next run"):
            assert time.monotonic() - started < 1
            assert lock.read_text().startswith(f"pid {os.getpid()} ") and "the next run" in lock.read_text()
    finally:
        for pid in child:
            os.kill(int(pid), signal.SIGKILL)


def _holds(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_a_stop_runs_the_orchestrations_hooks_before_the_line_and_the_exit(tmp_path):
    """layertime/stopping.py: what the flow registers (`on_stop`: scancel, the flow run's state) runs on
    a signal, with the state and the reason, before the process exits 143."""
    code = """
    import os, sys, time
    sys.path.insert(0, os.getcwd())
    from pathlib import Path
    from layertime import stopping
    said = Path(sys.argv[1])
    def hook(state, reason):
        said.write_text(f"{state}|{reason}")
    def work():
        print("working", flush=True)
        time.sleep(60)
    with stopping.on_stop(hook):
        stopping.run_stoppably(work, lambda: "3 of 8 units are kept")
    """
    run = _python(code, str(tmp_path / "said"))
    assert run.stdout.readline() == "working\n"
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 143
    assert (tmp_path / "said").read_text() == "Cancelled|stopped by SIGTERM"
    assert run.stderr.read().strip() == "layertime: stopped by SIGTERM; 3 of 8 units are kept"


def test_the_flows_module_loads_in_a_thread_as_the_worker_loads_it_for_cancellation_hooks():
    """Prefect's worker loads the flow in a thread to run on_cancellation hooks; importing
    dask_jobqueue there raised `ValueError: signal only works in main thread` on every cancel."""
    code = """
    import sys, threading
    from prefect.flows import load_flow_from_entrypoint
    found = {}
    def load():
        try:
            found["flow"] = load_flow_from_entrypoint("flows/layer_by_layer.py:layer_by_layer")
        except BaseException as e:
            found["error"] = repr(e)
    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
    print(found.get("error") or found["flow"].name, "dask_jobqueue" in sys.modules)
    """
    out = _python(code).communicate(timeout=300)
    assert out[0].strip() == "layer-by-layer False", out


def test_the_progress_description_fits_the_uis_card_at_exp2s_size():
    from flows.layer_by_layer import progress_text

    assert progress_text(31, 80, 12, 20, 0) == "scored 31/80 · embedded 12/20"
    assert progress_text(3, 80, 0, 0, 2) == "scored 3/80 · 2 failed"
    widest = progress_text(6400, 6400, 1600, 1600, 0)
    assert len(widest) <= 40, widest  # the card cut "0/80 units scored, 0 failed; 10/20 (check…" at 41


def test_the_device_hint_names_the_fix_of_each_way_of_running(monkeypatch):
    import torch
    from typer.testing import CliRunner

    from flows.commands import app
    from layertime.encoder import DeviceUnavailable, check_device
    from tasks import units

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable) as library:
        check_device("cuda")
    assert str(library.value).endswith("; run on a GPU node, or pass device='cpu' (float32, slow)")
    flow = library.value.with_fix(units.PROFILE_DEVICE_FIX)
    assert "--device" not in str(flow) and "`device: cpu` and `gpus: 0`" in str(flow)
    assert str(flow).startswith(library.value.what) and isinstance(flow, DeviceUnavailable)
    out = CliRunner().invoke(app, ["run", "--plain", str(ROOT / "deployments/demo.yaml"), "--device", "cuda"])
    assert out.exit_code == 2 and "--device: device 'cuda': no GPU is visible" in out.stderr
    assert out.stderr.rstrip().endswith("; run on a GPU node, or pass --device cpu (float32, slow)")


def test_the_embedded_server_sends_no_telemetry(monkeypatch):
    from prefect.settings import get_current_settings

    from flows.commands import _embedded_prefect

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with _embedded_prefect():
        assert get_current_settings().server.analytics_enabled is False


# --- a SLURM profile against what the cluster offers ---------------------------------------------


def test_the_profile_check_names_each_field_that_asks_for_more_than_any_node_has():
    from flows.clusters import SlurmSettings
    from flows.slurm_check import Partition, asked, problems

    small = [
        Partition("cpu", cpus=2, memory_mb=16000, gres="(null)", time_limit_s=3600, available=True, nodes=4)
    ]
    settings = SlurmSettings(partition="cpu", cpus=8, memory="64G", walltime="24:00:00", score_jobs=1,
                             score_cpus=4, score_memory="8G", bigmem_jobs=1, bigmem_memory="64G")  # fmt: skip
    gpu, score, bigmem = asked(settings)
    said = problems(gpu, small, "cpu")
    assert [line.split(":")[0] for line in said] == ["cpus", "memory", "gpus", "walltime"], said
    assert "set cpus: 2 or less" in said[0] and "set memory: 15G or less" in said[1]
    assert "set gpus: 0 and device: cpu" in said[2] and "set walltime: 01:00:00 or less" in said[3]
    assert [line.split(":")[0] for line in problems(score, small, "cpu")] == ["score_cpus", "walltime"]
    assert [line.split(":")[0] for line in problems(bigmem, small, "cpu")] == ["bigmem_memory", "walltime"]
    fits = SlurmSettings(partition=None, cpus=2, memory="4G", walltime="00:30:00", gpus=0, device="cpu")
    assert problems(asked(fits)[0], small, "cpu") == []  # the default partition
    assert problems(asked(SlurmSettings(partition="gpu"))[0], small, "cpu") == [
        "partition: no partition 'gpu'; the cluster has: cpu (default cpu)"
    ]
