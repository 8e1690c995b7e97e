"""Atomic file writes: a reader sees the old file or the new one, never half of one (docs/design.md §7).

A write goes to a temp file (or directory) beside its target, named `.<target>.<host>.<pid>.<rand>.tmp`,
then is renamed over the target (a temp directory's files are renamed into it). A writer that dies
(SIGKILL, a node lost) leaves its temp behind: the next write of the same target removes the temps
of writers that are gone (same host, pid no longer running) or that are older than a day (another
host's, which cannot be asked), so a crashed run never keeps eating disk. A failed write removes its own temp and says which path it was writing.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

STALE_AFTER_S = 24 * 3600  # a temp of another host older than this is a leftover: no write takes a day
_HOST = socket.gethostname().replace(".", "_")  # dots would split the name's fields
T = TypeVar("T")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it over `path`."""
    return _atomically(path, write, directory=False, place=_replace)


def atomic_add_files(path: str | Path, write: Callable[[Path], None]) -> dict[str, int]:
    """Call `write(tmp)` on an empty temp directory beside `path`, then rename each file it wrote
    into `path` (created when missing); returns {file name: size}.

    Files already in `path` that `write` does not produce are left alone, so another process reading
    them is never disturbed (the directory is never replaced or removed); a file of the same name is
    replaced by one rename (a reader that opened the old one reads it to its end). On failure (a full
    disk) the temp directory is removed, so it does not keep the space it took, and the error names
    `path`. Callers write a manifest last: a writer killed between two renames leaves files no
    manifest lists yet.
    """
    return _atomically(path, write, directory=True, place=_add_files)


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on an empty temp directory beside `path`, then put it in place of `path`.

    The directory appears whole or not at all (the report's folder; a unit's embeddings gain files
    through `atomic_add_files` instead, never replaced while another run reads them); on failure (a
    full disk) the temp directory is removed, so it does not keep the space it took, and the error
    names `path`.
    """
    return _atomically(path, write, directory=True, place=_replace_dir)


def _atomically(
    path: str | Path, write: Callable[[Path], None], directory: bool, place: Callable[[Path, Path], T]
) -> T:
    """The one frame of every atomic write: `write(tmp)` on a new temp file or directory beside
    `path`, then `place(tmp, path)` puts it there by renames. Temps of dead writers of `path` are
    removed first; on any failure this write's temp is removed, and an OSError names `path`."""
    path = Path(path)
    _mkdir(path.parent)
    remove_stale_temps(path)
    tmp = _new_temp(path, directory=directory)
    try:
        write(tmp)
        return place(tmp, path)
    except BaseException as e:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if (os_error := _as_os_error(e)) is not None:
            raise _naming(os_error, path) from e
        raise


def _replace(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def _replace_dir(tmp: Path, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)  # an older, damaged copy
    os.replace(tmp, path)
    return path


def _add_files(tmp: Path, path: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
    _mkdir(path)
    for name in sizes:
        os.replace(tmp / name, path / name)
    tmp.rmdir()
    return sizes


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_array(path: str | Path, array: np.ndarray) -> None:
    """`np.save`, but a full disk raises OSError(ENOSPC): numpy's own fast path reports a short
    write without an errno ("N requested and M written"), which would hide why it failed."""

    class _Stream:  # not a real file object, so numpy writes 16 MiB chunks through Python's write()
        def __init__(self, handle: BinaryIO) -> None:
            self.write = handle.write

    with open(path, "wb") as handle:
        np.lib.format.write_array(_Stream(handle), np.asanyarray(array), allow_pickle=False)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temps beside `path` left by writers that died; returns what was removed."""
    path = Path(path)
    now = time.time()
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(f'.{path.name}.')}*.tmp"):
        try:
            stale = _is_stale(tmp, path, now)
        except FileNotFoundError:  # its writer just renamed or removed it
            continue
        if stale and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif stale:
            tmp.unlink(missing_ok=True)
        if stale:
            removed.append(tmp)
    return removed


def unwritable(directory: str | Path) -> str | None:
    """Why `directory` (which may not exist yet) cannot be created and written, or None.

    Checks its nearest existing ancestor without creating anything, so a refused run leaves no trace.
    """
    p = _nearest_existing(Path(directory).absolute())
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    if os.statvfs(p).f_flag & os.ST_RDONLY:
        return f"{p} is on a read-only file system"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable by this user"
    return None


def _new_temp(path: Path, directory: bool) -> Path:
    """A new, empty temp file or directory beside `path`, with the umask's permissions (tempfile's
    are private to this user, which would lock the other users of a shared store out)."""
    while True:
        tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            if directory:
                tmp.mkdir()
            else:
                tmp.open("x").close()
        except FileExistsError:
            continue
        return tmp


def _is_stale(tmp: Path, path: Path, now: float) -> bool:
    fields = tmp.name[len(f".{path.name}.") :].split(".")  # host, pid, random, 'tmp'
    if len(fields) == 4 and fields[0] == _HOST and fields[1].isdigit():
        return not _running(int(fields[1]))
    return now - tmp.lstat().st_mtime > STALE_AFTER_S


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _naming(e, directory) from e


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _as_os_error(error: BaseException) -> OSError | None:
    """`error` as an OSError with its errno, or None when it is not one. polars reports a failed write
    as `ComputeError: parquet: ... No space left on device (os error 28)` (or an OSError without an
    errno, for CSV): the errno in its text is taken, so a full disk is ENOSPC whoever wrote."""
    if isinstance(error, OSError) and error.errno is not None:
        return error
    found = _RUST_OS_ERROR.search(str(error))
    if found is None:
        return error if isinstance(error, OSError) else None
    number = int(found[1])
    return OSError(number, os.strerror(number))


def _naming(error: OSError, path: Path) -> OSError:
    """The same error (errno kept, so ENOSPC stays ENOSPC) with the path being written, and on a
    full disk how much room is left there."""
    what = error.strerror or str(error)
    where = f"{what} while writing {path}"
    if error.filename and str(error.filename) != str(path):
        where += f" ({error.filename})"
    if error.errno == errno.ENOSPC:
        where += f"; {_free(path)} free on that file system"
    return OSError(error.errno, where)


def _free(path: Path) -> str:
    free = shutil.disk_usage(_nearest_existing(path)).free
    return f"{free / 1e6:.1f} MB" if free >= 1e5 else f"{free} bytes"


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
