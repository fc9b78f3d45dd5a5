"""fsspec access to datasets and run directories: local paths, file://, s3://, gs://, memory://."""

from __future__ import annotations

import errno
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from tape_pretrain.errors import StorageError

T = TypeVar("T")

# Remote storage has one retry layer, this one: s3fs's and botocore's own retries are switched off in open_url, so
# that attempts do not multiply (6 x 5 x 5 before). Env overrides let tests and impatient users shorten the budget.
RETRY_ATTEMPTS = int(os.environ.get("TAPE_PRETRAIN_STORAGE_RETRIES", "6"))
RETRY_BASE_DELAY_S = float(os.environ.get("TAPE_PRETRAIN_STORAGE_BACKOFF_S", "0.5"))
RETRY_MAX_DELAY_S = 20.0
DEADLINE_S = float(os.environ.get("TAPE_PRETRAIN_STORAGE_DEADLINE_S", "180"))
"""How long one operation keeps retrying after its first failure (each attempt is bounded by the timeouts below)."""
CONNECT_TIMEOUT_S = float(os.environ.get("TAPE_PRETRAIN_STORAGE_CONNECT_TIMEOUT_S", "10"))
READ_TIMEOUT_S = float(os.environ.get("TAPE_PRETRAIN_STORAGE_READ_TIMEOUT_S", "60"))
"""An endpoint that accepts connections and never answers costs at most this per attempt."""

# Errors that no retry can fix: bad names and arguments, missing buckets, access, full or read-only disks.
_PERMANENT_ERRNOS = {errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EDQUOT,
                     errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EMSGSIZE, errno.ENAMETOOLONG}


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


def _permanent_reason(exc: BaseException) -> str | None:
    """Why ``exc`` cannot be fixed by retrying, or None if it may be transient (5xx, throttling, resets, timeouts,
    corrupt transfers)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, TransferCorrupt | TimeoutError | ConnectionError):
        return None
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return os.strerror(exc.errno).lower()
    try:
        import botocore.exceptions as b
    except ImportError:
        return None
    if isinstance(exc, b.ParamValidationError | b.NoCredentialsError | b.PartialCredentialsError):
        return "invalid request"
    if isinstance(exc, b.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        if 400 <= status < 500 and status not in (408, 429) and code not in ("SlowDown", "RequestTimeout",
                                                                             "Throttling", "ThrottlingException"):
            return f"{code or status}"
    return None


def with_retries(operation: Callable[[], T], what: str, attempts: int | None = None,
                 deadline_s: float | None = None) -> T:
    """Run ``operation``, retrying transient failures (5xx, throttling, resets, timeouts, truncated or corrupt
    transfers) with bounded exponential backoff and jitter, within ``attempts`` and a total deadline; a permanent
    failure (4xx, missing bucket, access denied, invalid name, disk full, read-only) fails at once. Either way,
    one StorageError naming ``what`` (secrets removed) and the attempts made. FileNotFoundError passes through."""
    attempts = attempts or RETRY_ATTEMPTS
    budget = deadline_s or DEADLINE_S
    deadline = None  # counted from the first failure: a long transfer that fails late still gets its retries
    transient = _transient_errors()
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except FileNotFoundError:
            raise
        except transient as exc:
            detail = f"{type(exc).__name__}: {exc}"
            reason = _permanent_reason(exc)
            if reason is not None:
                raise StorageError(f"{redact_url(what)}: {reason} (not retried): {detail}") from None
            delay = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1)) * (0.5 + random.random())
            deadline = deadline or time.monotonic() + budget
            if attempt == attempts or time.monotonic() + delay >= deadline:
                spent = budget - (deadline - time.monotonic())
                tries = f"{attempt} attempt" + ("s" if attempt > 1 else "")
                raise StorageError(f"{redact_url(what)}: failed after {tries} in {spent:.0f} s: {detail}") from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def redact_url(text: str) -> str:
    from tape_pretrain.utils.redact import redact_text

    return redact_text(text)


def open_url(url: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, root path) for a URL; unknown schemes and unusable URLs give one clear error."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        # Deadlines on every call, and no retries below ours (botocore's standard mode would retry 3x, s3fs 5x).
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        config.setdefault("read_timeout", READ_TIMEOUT_S)
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config
    try:
        fs, root = url_to_fs(url, **options)
    except ImportError as exc:
        hint = " (pip install 'tape-pretrain[gcs]', or EXTRAS=test,gcs bash launch/setup_env.sh)" \
            if url.startswith(("gs://", "gcs://")) else ""
        raise StorageError(f"cannot open {url!r}: {exc}{hint}") from None
    except ValueError as exc:
        raise StorageError(f"cannot open {url!r}: {exc}") from None
    if hasattr(fs, "retries") and url.startswith(("s3://", "s3a://")):
        fs.retries = 1  # s3fs's own retry loop (an instance attribute: the class default is 5)
    return fs, root.rstrip("/") or root


def display_url(fs, path: str) -> str:
    """The URL a user would recognise for an fsspec path (s3://bucket/key rather than bucket/key)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write so that readers see the whole object or nothing: a temp name then a rename on local
    disks; object stores publish an object only when its upload completes. The temp name is private to this
    writer (``PATH.<12 hex>.tmp``), so that writers of the same file (parts of one prep on a shared disk) never
    clobber each other's half-written bytes."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        def put():
            fs.pipe_file(path, data)
            size = fs.info(path)["size"]
            if size != len(data):
                raise TransferCorrupt(f"wrote {len(data)} bytes but the store holds {size}")
        with_retries(put, display_url(fs, path))


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
    return with_retries(get, display_url(fs, path))


def exists(fs, path: str) -> bool:
    # Listing caches can hide an object another process just wrote: look it up fresh.
    fs.invalidate_cache(path)
    if is_local(fs):
        return fs.exists(path)
    return with_retries(lambda: fs.exists(path), display_url(fs, path))


__all__ = ["open_url", "join", "is_local", "write_bytes_atomic", "read_bytes", "exists", "with_retries", "fsspec"]
