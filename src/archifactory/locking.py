"""One writer per directory: a sweep directory or a run directory is written by one process at a time.

The lock is an operating-system file lock (``filelock``: ``fcntl.flock`` on Unix, ``msvcrt.locking`` on
Windows), which the kernel releases when the holding process dies, so a lock left by a killed process
never blocks the next one. Beside the lock file a small ``.owner`` file names the holder (pid, host,
start time) for the error message; it is informative only, never trusted for the lock itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from archifactory.errors import UserError


class DirectoryBusyError(UserError, RuntimeError):
    """Another live process holds the directory's lock."""


def _owner_text(owner_path: Path) -> str:
    try:
        owner = json.loads(owner_path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["started"])))
        return f"process {int(owner['pid'])} on {owner['host']}, since {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold_directory(directory: str | Path, lock_name: str, what: str, advice: str) -> Iterator[None]:
    """Hold ``directory/lock_name`` for the duration of the block, or raise :class:`DirectoryBusyError`
    at once (no waiting) naming the holder, ``what`` is being written and ``advice``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / lock_name
    owner_path = directory / f"{lock_name}.owner"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DirectoryBusyError(
            f"{what} {directory} is in use by {_owner_text(owner_path)} (lock {lock_path}); {advice}"
        ) from None
    try:
        tmp = owner_path.with_name(f"{owner_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": platform.node(), "started": time.time()}))
        tmp.replace(owner_path)
        yield
    finally:
        with contextlib.suppress(OSError):
            owner_path.unlink()
        lock.release()
