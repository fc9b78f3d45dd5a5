"""One training run writes a run directory at a time (RELIABILITY.md R19: lock what two processes could both write).

Local run directory: rank 0 holds an exclusive ``fcntl.flock`` on ``RUN_DIR/.tape_pretrain.lock`` for the life of
the run. The kernel releases a flock when its process dies, kill -9 included, so a lock is never stale; the file's
text names the holder (host, pid, start time) for the error a second run gets, and a leftover text from a holder
that died is reported as taken over.

Remote run directory (s3://, gs://): a lease object ``RUN_DIR/.tape_pretrain.lease`` naming the holder, with an
expiry that a heartbeat thread pushes forward every ttl/4. A run finding an unexpired lease of another holder is
refused; an expired one (its holder died or lost the network) is taken over with a warning. Object stores offer no
lock, so acquisition writes, waits, and reads back: of two runs starting within the same second, the one whose
write landed last wins and the other is refused. Expiry compares wall clocks of different machines: keep the TTL
well above their skew.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import threading
import time
import uuid
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
        try:  # never through a symlink: truncating and writing it would destroy whatever it points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open the run lock ({exc.strerror}; a symlink there is "
                                  "refused)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirectoryBusy(f"{self.path.parent}: in use by another run ({holder}); wait for it or stop it, "
                                   "or use another run_dir") from None
        except OSError as exc:  # ENOLCK and friends: a filesystem without flock
            os.close(fd)
            raise CheckpointError(f"{self.path}: this filesystem cannot lock files ({exc.strerror}); use a run_dir "
                                  "on a local disk, or an s3:// or gs:// run_dir (lease)") from None
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


LEASE_OBJECT = ".tape_pretrain.lease"
MAX_LEASE_TTL_S = 86_400.0
"""A lease claiming to last longer than a day was not written by a run with a valid lease_ttl_s."""


class RunLease:
    """The remote counterpart of RunLock: a lease object with a heartbeat."""

    def __init__(self, run_directory, ttl_s: float, settle_s: float = 2.0):
        self.run_directory, self.ttl_s, self.settle_s = run_directory, ttl_s, settle_s
        self.token = uuid.uuid4().hex
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return f"{self.run_directory.url.rstrip('/')}/{LEASE_OBJECT}"

    def _read(self) -> dict | None:
        try:
            raw = self.run_directory.read_remote(LEASE_OBJECT)
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(raw)
        except ValueError:
            return {"token": None, "expires": 0.0}  # unreadable: treated as expired (taken over with a warning)
        if not isinstance(lease, dict) or not isinstance(lease.get("expires"), int | float) or \
                not math.isfinite(lease["expires"]) or lease["expires"] > time.time() + MAX_LEASE_TTL_S:
            return {"token": None, "expires": 0.0}
        return lease

    def _write(self) -> None:
        lease = {"token": self.token, "expires": time.time() + self.ttl_s, **self.holder}
        self.run_directory.write_remote(LEASE_OBJECT, json.dumps(lease).encode())

    def acquire(self) -> str | None:
        current = self._read()
        previous = None
        if current is not None and current["token"] != self.token:
            if current["expires"] > time.time():
                raise RunDirectoryBusy(f"{self.run_directory.url}: in use by another run ({_describe_lease(current)}; "
                                       f"its lease expires in {current['expires'] - time.time():.0f} s unless "
                                       "renewed); wait for it or stop it, or use another run_dir")
            previous = _describe_lease(current)
        self._write()
        time.sleep(self.settle_s)  # a concurrent writer's object lands in this window; read back who won
        winner = self._read()
        if winner is None or winner["token"] != self.token:
            raise RunDirectoryBusy(f"{self.run_directory.url}: another run took the lease at the same moment "
                                   f"({_describe_lease(winner) if winner else 'holder unknown'})")
        self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._thread.start()
        return previous

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current is not None and current["token"] != self.token:
                    # Another run took the lease (this one stalled past the TTL). Writing on would mix the two runs'
                    # checkpoints and metrics: stop now, without a save; the other ranks follow on their timeout.
                    print(f"error: {self.path}: another run took over this run directory's lease "
                          f"({_describe_lease(current)}); stopping at once without writing more", flush=True)
                    os._exit(3)
                self._write()
            except Exception as exc:  # noqa: BLE001  (a heartbeat must never kill training; the next one retries)
                print(f"warning: {self.path}: lease heartbeat failed ({exc})", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current["token"] == self.token:
            self.run_directory.remove_remote(LEASE_OBJECT)


def _describe_lease(lease: dict) -> str:
    return _describe(json.dumps(lease).encode())


def lock_run_directory(run_directory, env: DistEnv, lease_ttl_s: float = 120.0) -> RunLock | RunLease | None:
    """Collective: rank 0 takes the lock (a local run directory) or the lease (a remote one); every rank raises the
    same refusal if it could not (no rank is left waiting in a collective for one that stopped)."""
    directory = run_directory.local
    lock, refusal = None, None
    if env.is_main:
        lock = RunLease(run_directory, lease_ttl_s) if run_directory.is_remote else RunLock(directory)
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
