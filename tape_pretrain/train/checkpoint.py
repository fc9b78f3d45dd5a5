"""Checkpoints: RUN_DIR/checkpoints/step_XXXXXXXX/ with the engine state, trainer_state.json, per-rank
RNG states, files.json (size and sha256 of every file) and a COMPLETE marker written last.

Loading verifies files.json before any engine file (which may unpickle) is opened, and falls back
to the previous complete checkpoint when the newest one is damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import torch

from tape_pretrain.distributed.env import DistEnv, all_agree_all, all_gather_objects, barrier
from tape_pretrain.errors import CheckpointError, StorageError
from tape_pretrain.train.run_dir import RunDirectory
from tape_pretrain.utils.logs import log
from tape_pretrain.utils.safe_load import weights_only_loading

STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
FILES = "files.json"
TRAINER_STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _file_table(directory: Path) -> dict[str, dict]:
    table = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in (COMPLETE, FILES):
            table[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return table


def verify_checkpoint(directory: Path, allow_group_writable: bool = False) -> dict:
    """Check COMPLETE, files.json, every size and checksum, and the directory's permissions.

    Returns the trainer state. Raises CheckpointError naming the file and the reason.
    """
    if not (directory / COMPLETE).is_file():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        if not (directory / FILES).exists() and not (directory / "engine").exists():
            raise CheckpointError(f"{directory}: not a checkpoint (give RUN_DIR or RUN_DIR/checkpoints/step_NNNNNNNN)")
        raise CheckpointError(f"{directory}: no {COMPLETE} marker (interrupted save)")
    _check_trusted(directory, allow_group_writable)
    table = _read_json(directory / FILES)
    if not isinstance(table, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in table.values()):
        raise CheckpointError(f"{directory / FILES}: not a table of files with sizes and checksums (tampered?)")
    if TRAINER_STATE not in table:
        raise CheckpointError(f"{directory}: {TRAINER_STATE} is not recorded in {FILES} (tampered?)")
    for rel, expected in table.items():
        path = directory / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{directory / FILES}: entry {rel!r} escapes the checkpoint directory")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != recorded {expected['size']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: sha256 mismatch (corrupted)")
    extra = set(_file_table_names(directory)) - set(table)
    if extra:
        raise CheckpointError(f"{directory}: unrecorded file {sorted(extra)[0]!r} (tampered?)")
    state = _read_json(directory / TRAINER_STATE)
    missing = [k for k in ("step", "engine", "world_size", "model", "loader") if not isinstance(state, dict) or
               k not in state]
    if missing:
        raise CheckpointError(f"{directory / TRAINER_STATE}: not a trainer state (no {missing[0]!r}; tampered?)")
    return state


def _read_json(path: Path):
    """A small JSON file of a checkpoint; one CheckpointError for anything unreadable, however hostile."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that another user could have written. Never skipped in favour of an older one: the run stops,
    so that a permissions mistake cannot silently restart training from step 0 (and let retention delete the rest)."""


def _check_trusted(directory: Path, allow_group_writable: bool) -> None:
    """Defence in depth (the guard is weights-only loading): refuse a checkpoint with any directory or file that is
    writable by other users, or owned by another user."""
    forbidden = stat.S_IWOTH if allow_group_writable else stat.S_IWGRP | stat.S_IWOTH
    for path in (directory, *sorted(directory.rglob("*"))):
        try:
            info = path.stat()  # a symlink is judged by what loading reads: its target
        except OSError as exc:
            raise UntrustedCheckpointError(f"{path}: cannot be checked ({exc.strerror})") from None
        if info.st_uid != os.getuid():
            raise UntrustedCheckpointError(f"{path}: owned by another user (uid {info.st_uid}); refusing to load it "
                                           "(copy the checkpoint, or chown it, if you trust it)")
        if info.st_mode & forbidden:
            raise UntrustedCheckpointError(
                f"{path}: writable by other users; refusing to load it (chmod -R go-w the checkpoint if you trust "
                "it, or set checkpoint.allow_group_writable=true for group-writable ones)")


def restrict_permissions(directory: Path, allow_group_writable: bool = False) -> None:
    """Remove group and other write bits from a checkpoint we wrote, whatever the umask was (under umask 002 it would
    be group-writable, and the next resume would refuse it)."""
    remove = stat.S_IWOTH if allow_group_writable else stat.S_IWGRP | stat.S_IWOTH
    for path in (directory, *directory.rglob("*")):
        info = path.lstat()
        if not stat.S_ISLNK(info.st_mode) and info.st_mode & remove and info.st_uid == os.getuid():
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~remove)


def _write_not_group_writable(path: Path, text: str) -> None:
    """Write a file whose mode is rw-r--r-- whatever the umask (the files.json and COMPLETE written after
    restrict_permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(text)


def _file_table_names(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in directory.rglob("*")
            if p.is_file() and p.name not in (COMPLETE, FILES)]


class CheckpointManager:
    """Writes, finds, verifies and prunes checkpoints under RUN_DIR/checkpoints (local or remote)."""

    def __init__(self, run_dir: RunDirectory, env: DistEnv, keep_last: int = 3, keep_every: int = 0,
                 allow_group_writable: bool = False):
        self.run_dir, self.env, self.keep_last, self.keep_every = run_dir, env, keep_last, keep_every
        self.allow_group_writable = allow_group_writable
        self._pending: tuple | None = None  # (step, engine, extra_uploads) of a save still being written

    @property
    def root(self) -> Path:
        return self.run_dir.local / "checkpoints"

    def steps(self) -> list[int]:
        """Steps with a checkpoint directory (complete or not), from the remote listing for remote runs."""
        if self.run_dir.is_remote:
            names = self.run_dir.list_remote("checkpoints")
        else:
            names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        return sorted(int(m.group(1)) for name in names if (m := STEP_DIR.match(name)))

    def save(self, step: int, engine, trainer_state: dict, extra_uploads: list[str] = (),
             blocking: bool = True) -> Path:
        """Collective: every rank calls it. COMPLETE appears only after every rank's files are written
        (and uploaded, for a remote run directory). With blocking=False and an engine that writes in the
        background, the commit happens later, in maybe_commit() or finish()."""
        self.finish()
        name = step_dir_name(step)
        directory = self.root / name
        if self.env.is_main:
            # A leftover of an interrupted save of the same step (here, or half-uploaded to a remote run
            # directory): its files must not mix with the new ones, or the checkpoint would fail verification.
            if directory.exists():
                shutil.rmtree(directory)
            self.run_dir.remove_remote(f"checkpoints/{name}")
            directory.mkdir(parents=True)
        barrier(self.env)
        # other nodes: the same directory on a shared filesystem, or their own staging copy
        with self._failed_save_is_one_error(directory):
            directory.mkdir(parents=True, exist_ok=True)
            engine.save(str(directory / "engine"))
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            (directory / "rng").mkdir(exist_ok=True)
            torch.save(rng, directory / "rng" / f"rank_{self.env.rank:05d}.pt")
            if self.env.is_main:
                (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
        self._pending = (step, engine, list(extra_uploads))
        if blocking:
            self.finish()
        return directory

    @contextlib.contextmanager
    def _failed_save_is_one_error(self, directory: Path):
        """A save that fails (disk full, quota, a vanished mount) stops the run with one error naming the checkpoint
        and the cause; the half-written directory (never COMPLETE) is removed and the older checkpoints stay."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            yield
        except (OSError, RuntimeError, CheckpointException) as exc:
            if isinstance(exc, CheckpointError):
                raise
            cause = exc
            if isinstance(exc, CheckpointException) and exc.failures:
                cause = next(iter(exc.failures.values()))[0]
            if self.env.local_rank == 0:
                shutil.rmtree(directory, ignore_errors=True)
            kept = [s for s in self.steps() if self._is_complete(s)]
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise CheckpointError(f"{directory}: saving the checkpoint failed ({type(cause).__name__}: "
                                  f"{detail[:300]}); removed the partial save; the complete checkpoints "
                                  f"{kept or 'none'} are intact") from None

    def maybe_commit(self) -> None:
        """Collective, once per step while a background save is pending: commit it when every rank's write is done."""
        if self._pending is not None and all_agree_all(self._pending[1].save_done(), self.env):
            self.finish()

    def finish(self) -> None:
        """Collective: wait for a pending save's files, then commit it (files.json, uploads, COMPLETE last)."""
        if self._pending is None:
            return
        step, engine, extra_uploads = self._pending
        self._pending = None
        name = step_dir_name(step)
        directory = self.root / name
        with self._failed_save_is_one_error(directory):
            engine.wait_for_save()
        barrier(self.env)
        # Each node hashes (and uploads) the files it holds; rank 0 merges the tables into files.json.
        if self.env.local_rank == 0:
            restrict_permissions(directory, self.allow_group_writable)
        table = _file_table(directory) if self.env.local_rank == 0 else {}
        if self.env.local_rank == 0:
            self.run_dir.upload([f"checkpoints/{name}/{rel}" for rel in table])
        tables = all_gather_objects(table, self.env)
        if self.env.is_main:
            merged = {k: v for t in tables for k, v in t.items()}
            _write_not_group_writable(directory / FILES, json.dumps(merged, indent=1, sort_keys=True))
            _fsync_dir(directory)
            self.run_dir.upload([f"checkpoints/{name}/{FILES}", *extra_uploads])
            _write_not_group_writable(directory / COMPLETE, f"{step}\n")
            _fsync_dir(directory)
            self.run_dir.upload([f"checkpoints/{name}/{COMPLETE}"])
            self.apply_retention(protect=step)
        barrier(self.env)

    def _localise(self, step: int) -> Path:
        """Make a remote checkpoint available in the staging directory (node leaders download)."""
        directory = self.root / step_dir_name(step)
        if self.run_dir.is_remote:
            if self.env.local_rank == 0:
                self.run_dir.download_tree(f"checkpoints/{step_dir_name(step)}")
                restrict_permissions(directory, self.allow_group_writable)  # our own download, whatever the umask
            barrier(self.env)
        return directory

    def latest_valid(self, explicit: str | None = None) -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies (or the explicit one), warning about each skipped one."""
        if explicit:
            directory = Path(explicit)
            return directory, verify_checkpoint(directory, self.allow_group_writable)
        for step in reversed(self.steps()):
            if self.run_dir.is_remote and not all_agree_all(self._is_complete(step), self.env):
                # never download an interrupted upload (it can be most of a large checkpoint) just to reject it;
                # every rank takes the same branch (the download below has a barrier)
                if self.env.is_main:
                    log.warning(f"skipping checkpoint {step_dir_name(step)}: no {COMPLETE} marker in the store "
                          "(interrupted save)")
                continue
            directory = self._localise(step)
            try:
                return directory, verify_checkpoint(directory, self.allow_group_writable)
            except UntrustedCheckpointError:
                raise
            except CheckpointError as exc:
                if self.env.is_main:
                    log.warning(f"skipping checkpoint {directory.name}: {exc}")
        return None

    def _is_complete(self, step: int) -> bool:
        """COMPLETE where the run lives: for a remote run, older checkpoints may exist only remotely (a resume
        on a fresh machine stages just the one it loads), and must still count towards keep_last."""
        rel = f"checkpoints/{step_dir_name(step)}/{COMPLETE}"
        return self.run_dir.exists_remote(rel) if self.run_dir.is_remote else (self.run_dir.local / rel).exists()

    def apply_retention(self, protect: int) -> None:
        """Keep the newest keep_last complete checkpoints (and every keep_every-th); never the one just written."""
        steps = self.steps()  # one listing (a remote one costs a round trip)
        complete = [s for s in steps if self._is_complete(s)]
        keep = set(complete[-self.keep_last:]) | {protect}
        if self.keep_every:
            keep |= {s for s in complete if s % self.keep_every == 0}
        for step in steps:
            if step in keep or step > protect:
                continue
            directory = self.root / step_dir_name(step)
            try:
                self.run_dir.remove_remote(f"checkpoints/{step_dir_name(step)}/{COMPLETE}")
                self.run_dir.remove_remote(f"checkpoints/{step_dir_name(step)}")
                (directory / COMPLETE).unlink(missing_ok=True)  # no longer a candidate, even if rmtree fails
                if directory.exists():
                    shutil.rmtree(directory)
            except (OSError, StorageError) as exc:  # retention must never stop training
                log.warning(f"could not delete old checkpoint {directory}: {exc}")

    def load_rng(self, directory: Path) -> None:
        path = directory / "rng" / f"rank_{self.env.rank:05d}.pt"
        if not path.exists():  # a different world size: keep the fresh per-rank seeds
            return
        with weights_only_loading():
            rng = torch.load(path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
