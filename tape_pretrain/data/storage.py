"""fsspec access to datasets and run directories: local paths, file://, s3://, gs://, memory://."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from tape_pretrain.errors import StorageError


def open_url(url: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, root path) for a URL; unknown schemes and unusable URLs give one clear error."""
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise StorageError(f"cannot open {url!r}: {exc}") from None
    return fs, root.rstrip("/") or root


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write so that readers see the whole object or nothing: a temp name then a rename on local
    disks; object stores publish an object only when its upload completes."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def exists(fs, path: str) -> bool:
    # Listing caches can hide an object another process just wrote: look it up fresh.
    fs.invalidate_cache(path)
    return fs.exists(path)


__all__ = ["open_url", "join", "is_local", "write_bytes_atomic", "read_bytes", "exists", "fsspec"]
