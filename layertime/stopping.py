"""Stopping a run on SIGINT or SIGTERM: within seconds, one line, nothing of ours left running.

Left to Python and Prefect, a Ctrl-C raised KeyboardInterrupt in the main thread only, while the same
signal to the process group had stopped Prefect's temporary server and made every scoring process
print its own traceback; the flow then spent minutes reporting its crash to the server it had lost
(~140 s, 13 tracebacks, ~450 lines of "connection refused"), holding the run-root lock meanwhile. A
run started with `&` from a script inherits SIGINT ignored and never stopped; a signal to the main
pid alone left the server, the scoring processes and multiprocessing's resource tracker running.

`run_stoppably(work, describe)` instead:
- runs `work` in a thread of its own and keeps the main thread free, so a signal is handled at once
  by our handler, whatever the work is doing (a forward pass, a wait on Dask). Prefect installs its
  own SIGTERM handler only when the flow runs in the main thread, so ours stays in place;
- installs handlers for SIGINT and SIGTERM whatever was inherited (a background job's SIG_IGN);
- leaves the children's signals alone: the scoring processes ignore SIGINT themselves (pool.py),
  Prefect's temporary server ends quietly on it, and SIGTERM is how Prefect stops its server and
  the pool a broken scoring process. (Blocking SIGINT in the parent would not reach them: Python
  clears the signal mask of every process it starts.)
- on a signal: output of this process goes to /dev/null (what other threads print now is only the
  fallout of the stop), every descendant process is killed (SIGKILL, repeated until none is left,
  so a process started meanwhile goes too) and reaped, multiprocessing's named semaphores are
  unlinked (the killed resource tracker would have), the run's temp directories are removed (their
  atexit removal would not run), `describe()`'s line is printed, and the
  process exits at once with 128 + the signal (130, 143): no finally block or Prefect state report
  runs. Nothing is lost by that: every finished unit has its completion record, a half-written
  temp is removed by the next write of its target (io.py), and the run-root lock is an flock that
  the kernel releases with the process.
- SIGKILL, which no handler sees, is the watchdog's (layertime/watchdog.py): the run is `watched()`.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from layertime import leftovers
from layertime.watchdog import watched

T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STOPPING = threading.Event()  # set once a stop begins: nothing starts a new process after it
KILL_WITHIN_S = 5.0  # descendants that keep appearing (a pool restarting its processes) are killed this long


def run_stoppably(work: Callable[[], T], describe: Callable[[], str]) -> T:
    """`work()` in a thread, this (main) thread waiting; SIGINT/SIGTERM stop the whole run as above.

    `describe()` gives the line printed on a stop (what is finished, how to resume); it runs after
    the descendants are killed. What `work` raises is raised here.
    """
    stopper = _Stopper(describe)
    previous = {s: signal.signal(s, stopper.handle) for s in SIGNALS}
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread below
            outcome["error"] = e

    try:
        with watched():  # a SIGKILL of this process kills the run's processes too (watchdog.py)
            thread = threading.Thread(target=target, name="layertime-run")
            thread.start()
            while thread.is_alive():
                thread.join(0.5)  # a timed wait: signal handlers run between waits
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(stopper.stderr)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


class _Stopper:
    def __init__(self, describe: Callable[[], str]) -> None:
        self.describe = describe
        self.stderr = os.dup(2)  # our line's way out once fds 1 and 2 point at /dev/null
        self.lock = threading.Lock()

    def handle(self, signum: int, frame: object) -> None:
        if not self.lock.acquire(blocking=False):
            return  # a second signal while stopping: the first stop exits in a moment
        _STOPPING.set()
        lead = "\n"
        try:
            _silence()
            kill_descendants()  # the watchdog among them: this handler does its work
            _unlink_semaphores()
            leftovers.remove_dead_temp_dirs(owner_pid=os.getpid())  # os._exit skips their atexit removal
            line = self.describe()
            lead = "" if _at_line_start(self.stderr) else "\n"  # below a progress bar, not on it
        except Exception as e:  # noqa: BLE001 -- the stop goes on: the line says what went wrong
            line = f"the stop went wrong ({type(e).__name__}: {e}); check for processes left running"
        name = signal.Signals(signum).name
        os.write(self.stderr, f"{lead}layertime: stopped by {name}; {line}\n".encode())
        os._exit(128 + signum)


def _at_line_start(fd: int) -> bool:
    """Whether what was written to `fd` ends with a newline: a terminal may hold a progress bar (say
    no); a file is read again (its fd may be write-only); a pipe cannot be asked (say yes)."""
    if os.isatty(fd):
        return False
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return True
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        end = f.seek(0, os.SEEK_END)
        return end == 0 or (f.seek(end - 1), f.read(1))[1] == b"\n"


def stopping() -> bool:
    """Whether this process is stopping on a signal: whoever starts processes (the scoring pool)
    starts none then, else one could appear after the last sweep and outlive the run."""
    return _STOPPING.is_set()


def _silence() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def kill_descendants(within_s: float = KILL_WITHIN_S) -> int:
    """SIGKILL every process below this one until none is left (or `within_s` passed); reap ours.
    Returns how many were killed."""
    killed: set[int] = set()
    deadline, quiet = time.monotonic() + within_s, 0
    while time.monotonic() < deadline and quiet < 3:  # three empty sweeps: none was being started
        found = descendants(os.getpid())
        quiet = 0 if found else quiet + 1
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended by itself in the meantime
            killed.add(pid)
        _reap()
        time.sleep(0.05)
    _reap()
    return len(killed)


def descendants(root: int) -> list[int]:
    """Pids of the living (not zombie) processes below `root`, from /proc, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None and info[0] != "Z":
            children.setdefault(info[1], []).append(int(entry))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of `pid`, None when it is gone. The command name may hold spaces and ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def _reap() -> None:
    """Collect the exit status of our dead children, so none stays a zombie after we exit."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _unlink_semaphores() -> None:
    """Unlink the named semaphores of this process's multiprocessing queues and locks.

    With the spawn start method they live in /dev/shm until their finalizers run at a normal exit,
    or the resource tracker unlinks them; os._exit skips the first and the tracker was just killed.
    """
    if "multiprocessing.synchronize" not in sys.modules:
        return
    import _multiprocessing
    from multiprocessing import synchronize, util

    for finalizer in list(util._finalizer_registry.values()):
        if getattr(finalizer, "_callback", None) is synchronize.SemLock._cleanup:
            try:
                _multiprocessing.sem_unlink(finalizer._args[0])
            except FileNotFoundError:
                pass  # unlinked already
