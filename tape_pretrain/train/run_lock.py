"""One training run writes a run directory at a time (RELIABILITY.md: lock what two processes could both write).

Rank 0 holds an exclusive ``fcntl.flock`` on ``RUN_DIR/.tape_pretrain.lock`` (for a remote run directory, on its
local staging directory) for the life of the run. The kernel releases a flock when its process dies, kill -9
included, so a lock is never stale; the file's text names the holder (host, pid, start time) for the error a
second run gets, and a leftover text from a holder that died is reported as taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from tape_pretrain.distributed.env import DistEnv, all_agree_all
from tape_pretrain.errors import CheckpointError

LOCK_FILE = ".tape_pretrain.lock"


class RunDirectoryBusy(CheckpointError):
    """Another run holds the run directory."""


class RunLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunDirectoryBusy naming the holder. Returns the previous holder's description
        when it died without releasing (its text was left behind), else None."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirectoryBusy(f"{self.path.parent}: in use by another run ({holder}); wait for it or stop it, "
                                   "or use another run_dir") from None
        previous = os.pread(fd, 4096, 0)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return _describe(previous) if previous.strip() else None

    def release(self) -> None:
        """Clear the holder's text and unlock (the file stays: unlinking a locked file races with a new opener)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"


def lock_run_directory(directory: Path, env: DistEnv) -> RunLock | None:
    """Collective: rank 0 takes the lock; every rank raises the same refusal if it could not (no rank is left
    waiting in a collective for one that stopped)."""
    lock, refusal = None, None
    if env.is_main:
        lock = RunLock(directory)
        try:
            previous = lock.acquire()
            if previous:
                print(f"warning: taking over {lock.path} from a run that ended without releasing it ({previous})",
                      flush=True)
        except RunDirectoryBusy as exc:
            refusal = exc
    if not all_agree_all(refusal is None, env):
        raise refusal or RunDirectoryBusy(f"{directory}: in use by another run (see rank 0's error)")
    return lock
