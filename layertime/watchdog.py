"""A watchdog per run: every process of the run dies with its main process, however it dies (issue 24).

SIGINT and SIGTERM are handled in the run's own process (layertime/stopping.py). SIGKILL cannot be:
the OOM killer's kill of the main pid used to leave Prefect's temporary server, the scoring processes
and multiprocessing's resource tracker running for good, and a temp directory and semaphores per kill.

`watched()` marks the run: `LAYERTIME_RUN=<mark>` in this process's environment, which every process
it starts inherits (the Prefect server, spawned scoring processes, the resource tracker, and theirs),
and starts a watchdog process in a session of its own (a kill of the run's process group spares it).
The watchdog holds the read end of a pipe whose write end only the main process has: end of file
means the main process is gone, however it went. Then it kills every process that carries the mark
(SIGKILL, swept until none is left), unlinks the semaphores they had open and removes the dead run's
temp directories (layertime/leftovers.py), and exits. When the run ends normally the main process
says so on the pipe and the watchdog exits at once.

Why not `PR_SET_PDEATHSIG` in each child: we start neither Prefect's server nor the resource tracker,
and the signal is sent when the *thread* that forked the child exits, not the process (a Dask or
Prefect worker thread that ends would kill a healthy scoring process). A mark in the environment
reaches every descendant, including those started by code that is not ours.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from layertime import leftovers

MARK = "LAYERTIME_RUN"
DONE = b"done"
POLL_S = 1.0  # how often the watchdog looks at the main process's semaphores (and that it lives)
KILL_WITHIN_S = 10.0


@contextlib.contextmanager
def watched() -> Iterator[Path]:
    """While the context lasts, the run's processes die with this one (module doc); yields the run's
    notes directory. First removes what dead runs left (temp directories, their semaphores)."""
    leftovers.remove_dead_temp_dirs()
    notes = leftovers.owned_temp_dir("run")
    mark = notes.name
    previous = os.environ.get(MARK)
    read, write = os.pipe()  # not inheritable: only this process holds the write end
    env = {k: v for k, v in os.environ.items() if k != MARK}
    try:
        dog = subprocess.Popen(
            [sys.executable, "-m", "layertime.watchdog", mark, str(notes), str(os.getpid())],
            stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    except OSError:
        os.close(write)
        dog = None  # no watchdog (no room for a process): the run goes on unwatched, as before
    finally:
        os.close(read)
    os.environ[MARK] = mark
    try:
        yield notes
    finally:
        if previous is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = previous
        if dog is not None:
            with contextlib.suppress(OSError):
                os.write(write, DONE)
            os.close(write)  # not waited for: it exits on its own, and subprocess reaps it later
        shutil.rmtree(notes, ignore_errors=True)  # its semaphores are this process's own to unlink


def marked(mark: str) -> list[int]:
    """Pids of the living processes that carry `mark` in their environment (ours to read)."""
    entry = f"{MARK}={mark}".encode()
    found = []
    for pid in leftovers.pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if entry in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def kill_marked(mark: str, within_s: float = KILL_WITHIN_S) -> set[int]:
    """SIGKILL every process carrying `mark` until three sweeps in a row find none (one may be starting
    another as it dies); returns the pids killed."""
    killed: set[int] = set()
    deadline, quiet = time.monotonic() + within_s, 0
    while time.monotonic() < deadline and quiet < 3:
        found = marked(mark)
        quiet = 0 if found else quiet + 1
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    return killed


def watch(mark: str, notes: Path, parent: int) -> bool:
    """Wait for the end of `parent`, noting the semaphores it has open; True when it died (the pipe
    closed without DONE, or it is gone though something kept the pipe open)."""
    born = leftovers.start_ticks(parent)
    seen: set[str] = set()
    while True:
        ready, _, _ = select.select([0], [], [], POLL_S)
        if ready:
            return os.read(0, len(DONE)) != DONE  # b"": end of file, the parent is gone
        if leftovers.start_ticks(parent) != born:
            return True
        new = leftovers.mapped_semaphores([parent]) - seen
        if new:
            leftovers.note_semaphores(notes, new)
            seen |= new


def clean_up(mark: str, notes: Path) -> None:
    """The main process died: note what its processes have open, kill them, remove what is left."""
    with contextlib.suppress(OSError):
        leftovers.note_semaphores(notes, leftovers.mapped_semaphores(marked(mark)))
    kill_marked(mark)
    leftovers.remove_dead_temp_dirs()  # the notes (their semaphores first) and Prefect's directory


def main(argv: list[str]) -> int:
    mark, notes, parent = argv[0], Path(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is the run's to handle
    if watch(mark, notes, parent):
        clean_up(mark, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
