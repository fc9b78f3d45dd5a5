"""Where a run lives: a local path, or an fsspec URL (s3://, gs://) mirrored by a local staging directory.

Engines write their checkpoint files locally (DeepSpeed cannot write to object storage, and DCP through
fsspec would lose the local verification); the files are then uploaded, COMPLETE last, so an object
store never shows a checkpoint as complete before all of its bytes are there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tape_pretrain.data.storage import TransferCorrupt, display_url, exists, join, open_url, with_retries
from tape_pretrain.utils.redact import redact_text


class RunDirectory:
    def __init__(self, url: str, storage_options: dict | None = None,
                 staging_root: str = "~/.cache/tape_pretrain/runs"):
        self.url = url
        self.is_remote = "://" in url and not url.startswith("file://")
        if self.is_remote:
            self.fs, self.root = open_url(url, storage_options)
            digest = hashlib.sha256(url.encode()).hexdigest()[:16]
            self.local = Path(os.path.expanduser(staging_root)) / digest
        else:
            self.fs, self.root = None, None
            self.local = Path(url.removeprefix("file://"))
        self.local.mkdir(parents=True, exist_ok=True)

    def remote_path(self, rel: str) -> str:
        return join(self.root, rel)

    def upload(self, rel_paths: list[str]) -> None:
        """Copy local files (relative to the run directory) to the remote run directory, in order."""
        if not self.is_remote:
            return
        for rel in rel_paths:
            local, remote = self.local / rel, self.remote_path(rel)

            def put(local=local, remote=remote):
                self.fs.put_file(str(local), remote)
                self.fs.invalidate_cache(remote)
                stored = self.fs.info(remote)["size"]
                if stored != local.stat().st_size:
                    raise TransferCorrupt(f"uploaded {local.stat().st_size} bytes, the store holds {stored}")
            with_retries(put, f"{redact_text(self.url)}/{rel}")

    def exists_remote(self, rel: str) -> bool:
        return exists(self.fs, self.remote_path(rel))

    def list_remote(self, rel: str) -> list[str]:
        """Names directly under a remote folder (fresh listing: caches can hide a just-written checkpoint)."""
        path = self.remote_path(rel)
        self.fs.invalidate_cache(path)
        if not exists(self.fs, path):
            return []
        names = with_retries(lambda: self.fs.ls(path, detail=False), display_url(self.fs, path))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in names)

    def download_tree(self, rel: str) -> None:
        """Mirror a remote folder into the staging directory (files already present with the same size are kept)."""
        base = self.remote_path(rel).rstrip("/")
        self.fs.invalidate_cache(base)
        listing = with_retries(lambda: self.fs.find(base, detail=True), f"{redact_text(self.url)}/{rel}")
        for path, info in listing.items():
            sub = path[len(base) + 1:] if path.startswith(base + "/") else path.rsplit("/", 1)[-1]
            target = self.local / rel / sub
            if not (target.exists() and target.stat().st_size == info.get("size")):
                self._get(path, target, info.get("size"))

    def download(self, rel: str) -> None:
        """Copy one remote file over its staging copy."""
        path = self.remote_path(rel)
        info = with_retries(lambda: self.fs.info(path), display_url(self.fs, path))
        self._get(path, self.local / rel, info.get("size"))

    def _get(self, path: str, target: Path, size: int | None) -> None:
        """Download with retries into a private temp name, checked against the stored size, then renamed."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".part{os.getpid()}")

        def get():
            self.fs.get_file(path, str(tmp))
            if size is not None and tmp.stat().st_size != size:
                raise TransferCorrupt(f"downloaded {tmp.stat().st_size} of {size} bytes")
        with_retries(get, display_url(self.fs, path))
        tmp.replace(target)

    def read_remote(self, rel: str) -> bytes:
        """One small remote object (FileNotFoundError if absent), bypassing listing caches."""
        path = self.remote_path(rel)
        self.fs.invalidate_cache(path)
        return with_retries(lambda: self.fs.cat_file(path), display_url(self.fs, path))

    def write_remote(self, rel: str, data: bytes) -> None:
        """One small remote object, written whole (object stores publish it only when complete)."""
        path = self.remote_path(rel)
        with_retries(lambda: self.fs.pipe_file(path, data), display_url(self.fs, path))

    def move_aside(self, names: tuple[str, ...], aside: str) -> list[str]:
        """Move top-level entries of the run directory into the folder ``aside`` (in the store too, for a remote
        run: a copy then a delete per object). Returns the names that existed."""
        moved = []
        for name in names:
            found = False
            if (self.local / name).exists():
                (self.local / aside).mkdir(exist_ok=True)
                os.replace(self.local / name, self.local / aside / name)
                found = True
            if self.is_remote and self.exists_remote(name):
                source, target = self.remote_path(name), self.remote_path(f"{aside}/{name}")
                with_retries(lambda s=source, t=target: self.fs.mv(s, t, recursive=True), display_url(self.fs, source))
                found = True
            if found:
                moved.append(name)
        return moved

    def remove_remote(self, rel: str) -> None:
        if self.is_remote:
            path = self.remote_path(rel)
            if exists(self.fs, path):
                with_retries(lambda: self.fs.rm(path, recursive=True), display_url(self.fs, path))
