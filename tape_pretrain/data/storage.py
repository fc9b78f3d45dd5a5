"""fsspec access to datasets and run directories: local paths, file://, s3://, gs://, memory://."""

from __future__ import annotations

import os
import posixpath
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from tape_pretrain.errors import StorageError

T = TypeVar("T")

# Retry budget for remote storage; env overrides let tests and impatient users shorten it.
RETRY_ATTEMPTS = int(os.environ.get("TAPE_PRETRAIN_STORAGE_RETRIES", "6"))
RETRY_BASE_DELAY_S = float(os.environ.get("TAPE_PRETRAIN_STORAGE_BACKOFF_S", "0.5"))
RETRY_MAX_DELAY_S = 20.0


class TransferCorrupt(OSError):
    """A transfer finished but its bytes do not match the expected size or checksum."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:
        import botocore.exceptions as b

        errors += [b.BotoCoreError, b.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def with_retries(operation: Callable[[], T], what: str, attempts: int | None = None) -> T:
    """Run ``operation``, retrying transient failures (5xx, throttling, resets, truncated or corrupt transfers)
    with bounded exponential backoff and jitter; after the budget, one StorageError naming ``what``."""
    attempts = attempts or RETRY_ATTEMPTS
    transient = _transient_errors()
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except FileNotFoundError:
            raise
        except PermissionError as exc:  # permanent (credentials, bucket policy): retrying only delays the error
            raise StorageError(f"{redact_url(what)}: permission denied: {exc}") from None
        except transient as exc:
            if attempt == attempts:
                raise StorageError(f"{redact_url(what)}: failed after {attempts} attempts: "
                                   f"{type(exc).__name__}: {exc}") from None
            delay = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random()))
    raise AssertionError("unreachable")


def redact_url(text: str) -> str:
    from tape_pretrain.utils.redact import redact_text

    return redact_text(text)


def open_url(url: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, root path) for a URL; unknown schemes and unusable URLs give one clear error."""
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        hint = " (pip install 'tape-pretrain[gcs]', or EXTRAS=test,gcs bash launch/setup_env.sh)" \
            if url.startswith(("gs://", "gcs://")) else ""
        raise StorageError(f"cannot open {url!r}: {exc}{hint}") from None
    except ValueError as exc:
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
        def put():
            fs.pipe_file(path, data)
            size = fs.info(path)["size"]
            if size != len(data):
                raise TransferCorrupt(f"wrote {len(data)} bytes but the store holds {size}")
        with_retries(put, path)


def read_bytes(fs, path: str) -> bytes:
    if is_local(fs):
        with fs.open(path, "rb") as f:
            return f.read()

    def get() -> bytes:
        data = fs.cat_file(path)
        expected = fs.info(path)["size"]
        if len(data) != expected:
            raise TransferCorrupt(f"read {len(data)} of {expected} bytes")
        return data
    return with_retries(get, path)


def exists(fs, path: str) -> bool:
    # Listing caches can hide an object another process just wrote: look it up fresh.
    fs.invalidate_cache(path)
    if is_local(fs):
        return fs.exists(path)
    return with_retries(lambda: fs.exists(path), path)


__all__ = ["open_url", "join", "is_local", "write_bytes_atomic", "read_bytes", "exists", "with_retries", "fsspec"]
