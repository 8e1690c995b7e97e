"""A login node without root (issue 23): `deployments/login-node.sh` runs PostgreSQL for the Prefect server
in a user's home, as that user, and writes the systemd user units of the server and the worker.

CI runs as root: the test creates a user (`useradd`) and runs the script with `runuser`, as docs/clusters.md
tells a lab to run it. Prefect then builds its schema in that database (`prefect server database upgrade`,
what `prefect server start` does first), so the URL the script prints is one Prefect's server can use.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_SCRIPT = ROOT / "deployments/login-node.sh"


def _readable_copy() -> Path:
    """The script where another user can read it: a lab user runs it from their own checkout, but this
    checkout may sit in a directory only root enters (a clean clone in `mktemp -d`)."""
    home = Path(tempfile.mkdtemp(prefix="layertime-login-node-"))
    atexit.register(shutil.rmtree, home, True)
    (home / "deployments").mkdir()
    shutil.copy(CHECKOUT_SCRIPT, home / "deployments/login-node.sh")
    for path in (home, home / "deployments"):
        path.chmod(0o755)
    (home / "deployments/login-node.sh").chmod(0o644)
    return home / "deployments/login-node.sh"


SCRIPT = _readable_copy()
PREFECT = str(Path(sys.executable).parent / "prefect")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates a user: root only (CI runs as root)"),
    pytest.mark.skipif(
        shutil.which("pg_ctl") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
        reason="no PostgreSQL server programs: `bash .ci/postgres.sh start` installs them",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def user():
    name = f"ltci{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, timeout=60)
    try:
        yield pwd.getpwnam(name)
    finally:
        uid = pwd.getpwnam(name).pw_uid
        for pid in filter(str.isdigit, os.listdir("/proc")):  # its PostgreSQL, if a check failed
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    os.kill(int(pid), 9)
            except OSError:
                continue
        subprocess.run(["userdel", "-r", name], capture_output=True, timeout=60)


def _as(user, port: int, *args: str) -> subprocess.CompletedProcess:
    env = ["env", f"LAYERTIME_PG_PORT={port}", f"HOME={user.pw_dir}"]
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *env, "bash", str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=300, cwd="/")  # fmt: skip


def _owners(port: int) -> set[int]:
    """Uids of the processes of the PostgreSQL listening on `port` (its postmaster and children)."""
    uids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmd[0].endswith(b"postgres") and f"{port}".encode() in b" ".join(cmd):
                uids.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            continue
    return uids


def test_a_user_without_root_runs_the_prefect_servers_postgresql_in_their_home(user):
    port = _free_port()
    started = _as(user, port, "postgres", "start")
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url.startswith("postgresql+asyncpg://prefect:") and url.endswith(f"@127.0.0.1:{port}/prefect"), url
    home = Path(user.pw_dir) / ".local/share/layertime/postgres"
    assert os.stat(home / "data").st_uid == user.pw_uid and (os.stat(home / "data").st_mode & 0o077) == 0
    assert (os.stat(home / "password").st_mode & 0o077) == 0  # the password is the user's alone
    assert _owners(port) == {user.pw_uid}  # the server runs as the user, not root

    again = _as(user, port, "postgres", "start")  # idempotent: the same server, the same URL
    assert again.returncode == 0 and again.stdout.strip() == url and "already running" in again.stderr

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(Path(user.pw_dir) / "prefect-home-of-root"),
           "PREFECT_API_DATABASE_CONNECTION_URL": url}  # fmt: skip
    schema = subprocess.run([PREFECT, "server", "database", "upgrade", "-y"], env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert schema.returncode == 0, schema.stdout[-2000:] + schema.stderr[-2000:]
    tables = subprocess.run(["runuser", "-u", user.pw_name, "--", "psql", "-X", "-At", "-h", str(home), "-p", str(port),
                             "-d", "prefect", "-c", "SELECT count(*) FROM flow_run"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert tables.returncode == 0 and tables.stdout.strip() == "0", tables.stderr

    units = _as(user, port, "units")
    assert units.returncode == 0, units.stderr
    written = {p.name: p.read_text() for p in Path(units.stdout.strip()).glob("layertime-*.service")}
    assert set(written) == {
        "layertime-postgres.service",
        "layertime-prefect-server.service",
        "layertime-worker.service",
    }
    assert f"ExecStart=/usr/bin/env bash {SCRIPT} server" in written["layertime-prefect-server.service"]
    assert f"ExecStart=/usr/bin/env bash {SCRIPT} worker" in written["layertime-worker.service"]

    assert _as(user, port, "postgres", "stop").returncode == 0
    assert _as(user, port, "postgres", "status").returncode == 3 and _owners(port) == set()
