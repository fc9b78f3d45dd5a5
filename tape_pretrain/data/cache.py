"""Local, verified copies of a dataset's shards and their document offsets (data.access=copy).

Remote shards are downloaded once into ``cache_dir/<fingerprint>/``, checked (size, sha256, token ids
below the vocab size) and only then renamed into place. Local shards are read in place and checked
once; the result is remembered per (path, size, mtime). Either way a shard is hashed once, never per read.
A shard's document offsets file (where the manifest records one) gets the same treatment, plus a check that its
starts fit the shard and follow its EOS tokens; a bad offsets file makes its shard bad. Read the verified offsets
with ``tape_pretrain.data.manifest.read_document_starts(LocalShard.docs_path, LocalShard.num_tokens)``.

On a node, the first rank fetches and the others re-use its copies; a NodeHandshake (a marker file beside the
cache) tells them when it is done, or why it failed, without a collective (whose timeout, parallel.timeout_s, is
no deadline for a download). FetchProgress reports the fetch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tape_pretrain.data.manifest import (
    DOCS_DTYPE,
    Manifest,
    ShardInfo,
    document_end_positions,
    document_starts_problem,
    misaligned_starts,
)
from tape_pretrain.data.storage import TransferCorrupt, is_local, join, open_url, with_retries
from tape_pretrain.errors import USER_ERRORS, DataError
from tape_pretrain.utils.progress import format_duration, is_terminal
from tape_pretrain.utils.redact import redact_text

NODE_NAME = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
"""This machine's host name, safe in a file name."""


@dataclass
class LocalShard:
    path: str
    num_tokens: int
    docs_path: str | None = None
    """Local path of the shard's verified document offsets (``manifest.read_document_starts``); None when the dataset
    records no document boundaries (prepared before document offsets)."""


@dataclass
class CachedSplit:
    shards: list[LocalShard]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def open_shards(self, dtype: str) -> MemmapShards:
        """The shards' tokens (and document starts) for TokenWindows."""
        return MemmapShards(self, dtype)

    def to_json(self) -> dict:
        return {"shards": [asdict(s) for s in self.shards], "skipped": list(self.skipped)}

    @classmethod
    def from_json(cls, data: dict) -> CachedSplit:
        return cls([LocalShard(**s) for s in data["shards"]], list(data["skipped"]))


class MemmapShards:
    """Shard storage of data.access=copy: every verified local shard and offsets file memory-mapped; nothing is
    pinned or evicted, so ``acquire`` hands out the same lists every time (the stream cache's counterpart is
    ``tape_pretrain.data.stream.StreamedShards``)."""

    def __init__(self, split: CachedSplit, dtype: str):
        self.arrays = [np.memmap(s.path, dtype=dtype, mode="r") for s in split.shards]
        self.lengths = [len(a) for a in self.arrays]
        docs = [getattr(s, "docs_path", None) for s in split.shards]
        # each shard's document starts (token offsets in the shard, the first 0), verified by cache_split
        self.document_starts = [np.memmap(p, dtype=DOCS_DTYPE, mode="r") for p in docs] if all(docs) else None

    @property
    def has_documents(self) -> bool:
        return self.document_starts is not None

    def acquire(self, first: int, last: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """(tokens, document starts) per shard; shards first..last stay readable until ``release``."""
        return self.arrays, self.document_starts

    def release(self, first: int, last: int) -> None:
        pass

    def all_document_starts(self) -> list[np.ndarray]:
        return self.document_starts


def check_shard(path: str, shard: ShardInfo, dtype: str, vocab_size: int, where: str) -> str | None:
    """None if the local file matches the manifest, else the reason it does not."""
    size = os.path.getsize(path)
    if size != shard.num_bytes:
        return f"size {size} bytes != manifest {shard.num_bytes} (truncated or extended)"
    if size == 0:
        return "empty shard"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    if digest.hexdigest() != shard.sha256:
        return "sha256 mismatch (content altered)"
    tokens = np.memmap(path, dtype=dtype, mode="r")
    top = int(tokens.max())
    if top >= vocab_size:
        return f"token id {top} >= vocab size {vocab_size}"
    return None


def check_docs(path: str, shard: ShardInfo, tokens_path: str, dtype: str, eos_id: int) -> str | None:
    """None if the local offsets file matches the manifest and fits the (verified) local shard, else the reason."""
    size = os.path.getsize(path)
    if size != shard.docs_num_bytes:
        return f"size {size} bytes != {shard.num_docs} documents x {DOCS_DTYPE.itemsize} (truncated or extended)"
    with open(path, "rb") as f:
        data = f.read()
    reason = document_starts_problem(data, shard)
    if reason is not None:
        return reason
    ends = document_end_positions(np.frombuffer(data, dtype=DOCS_DTYPE), shard.num_tokens)
    wrong = np.flatnonzero(np.memmap(tokens_path, dtype=dtype, mode="r")[ends] != eos_id)
    return misaligned_starts(int(ends[wrong[0]])) if len(wrong) else None


def _check_local(path: str, real_root: str, rel: str, where: str, sha256: str, verified: dict,
                 check) -> str | None:
    """A file of a local dataset, checked in place once per (path, size, mtime, sha256)."""
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise DataError(f"{where}: shard path {rel!r} resolves outside the dataset (symlink?)")
    if not os.path.exists(path):
        return "missing"
    stat = os.stat(path)
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{sha256}"
    reason = None if verified.get(key) else check(path)
    if reason is None:
        verified[key] = True
    return reason


def cache_split(url: str, manifest: Manifest, fingerprint: str, split: str, cache_dir: str,
                storage_options=None, on_corrupt: str = "error", progress: FetchProgress | None = None,
                timeout_s: float | None = None) -> CachedSplit:
    """Make every shard of ``split`` (and its document offsets, where recorded) available locally and verified;
    returns their local paths. A shard whose offsets file is bad counts as a bad shard. ``progress`` reports
    shard after shard; past ``timeout_s`` (data.fetch_timeout_s) the fetch stops with a DataError."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    fs, root = open_url(url, storage_options)
    local_root = Path(os.path.expanduser(cache_dir)) / fingerprint[:16]
    local_root.mkdir(parents=True, exist_ok=True)
    verified_file = local_root / "verified.json"
    verified = json.loads(verified_file.read_text()) if verified_file.exists() else {}
    vocab, eos = int(manifest.tokenizer["vocab_size"]), int(manifest.tokenizer.get("eos_id", -1))
    result = CachedSplit([])
    known = dict(verified)
    real_root = os.path.realpath(root) if is_local(fs) else ""

    moved = [False]  # whether the current shard was downloaded or hashed (not already cached): for the rate

    def local_copy(rel: str, where: str, sha256: str, check) -> tuple[str, str | None]:
        """(local path, None) of a verified file of the dataset, or (path, the reason it is bad)."""
        def counted(path: str) -> str | None:
            moved[0] = True
            return check(path)

        if is_local(fs):
            path = join(root, rel)
            return path, _check_local(path, real_root, rel, where, sha256, verified, counted)
        path = str(local_root / rel)
        return path, None if os.path.exists(path) else download_verified(fs, join(root, rel), path, counted, where)

    shards = manifest.splits.get(split, [])
    if progress is not None:
        progress.begin(len(shards), sum(s.num_bytes + s.docs_num_bytes for s in shards),
                       "verified" if is_local(fs) else "fetched")
    for done, shard in enumerate(shards):
        if deadline is not None and time.monotonic() > deadline:
            raise DataError(f"{redact_text(url)}: fetching and verifying the {split} split took longer than "
                            f"data.fetch_timeout_s={timeout_s:g} s ({done} of {len(shards)} shards done): raise "
                            "data.fetch_timeout_s, or set data.access=stream to read shards as training needs them")
        moved[0] = False
        where = bad = join(url, shard.path)
        # the checks run within local_copy, in this iteration: the lambdas see this shard
        path, reason = local_copy(shard.path, where, shard.sha256,
                                  lambda p: check_shard(p, shard, manifest.dtype, vocab, where))  # noqa: B023
        docs_path = None
        if reason is None and shard.docs_path:
            bad = join(url, shard.docs_path)
            docs_path, reason = local_copy(shard.docs_path, bad, shard.docs_sha256,
                                           lambda p: check_docs(p, shard, path, manifest.dtype, eos))  # noqa: B023
        if reason is not None:
            if on_corrupt == "skip":
                detail = reason if bad == where else f"its document offsets {bad}: {reason}"
                print(f"warning: skipping shard {where}: {detail}")
                result.skipped.append(shard.path)
                continue
            without = "it" if bad == where else f"shard {shard.path}"
            raise DataError(f"{bad}: {reason}; set data.on_corrupt_shard=skip to train without {without}")
        result.shards.append(LocalShard(path, shard.num_tokens, docs_path))
        if progress is not None:
            progress.advance(shard.num_bytes + shard.docs_num_bytes, moved=moved[0])
    if verified != known:  # ranks on one node may get here together: private temp name, atomic rename
        tmp = verified_file.with_name(f"verified.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verified))
        tmp.replace(verified_file)
    if progress is not None:
        progress.end()
    return result


def download_verified(fs, remote: str, path: str, check, where: str,
                      get: Callable[[str, str], None] | None = None) -> str | None:
    """Fetch a shard (or offsets file) into the cache (by ``get(remote, local)``, default ``fs.get_file``); a short
    or garbled transfer is retried, a file whose stored bytes are wrong (``check`` of the local copy says why) is
    reported, and nothing unverified is ever left under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part.{NODE_NAME}.{os.getpid()}"  # private to this process, even in a cache_dir that nodes share
    get = get or fs.get_file

    def fetch() -> str | None:
        get(remote, tmp)
        reason = check(tmp)
        stored = fs.info(remote)["size"]
        if reason is not None and os.path.getsize(tmp) != stored:
            raise TransferCorrupt(f"got {os.path.getsize(tmp)} of {stored} bytes")  # the transfer, not the shard
        return reason

    try:
        reason = with_retries(fetch, where)
    except FileNotFoundError:
        return "missing"
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if reason is None:
        os.replace(tmp, path)
    elif os.path.exists(tmp):
        os.unlink(tmp)
    return reason



class FetchProgress:
    """Progress of a node's fetch (or verification, for a dataset on a local or shared disk) of one split: a tqdm
    bar on stderr when stderr is a terminal, else a plain line on stderr every ``interval_s`` seconds and a last one
    when the fetch took that long. Rates and times count the bytes moved or hashed, not shards already cached."""

    def __init__(self, what: str, rank: int, interval_s: float = 10.0, stream=None):
        self.what, self.rank, self.interval_s = what, rank, interval_s
        self.stream = stream or sys.stderr
        self.num_shards = self.num_bytes = self.done_shards = self.done_bytes = self.moved_bytes = 0
        self.verb, self.bar, self.printed = "fetched", None, False
        self.started = self.last_line = time.monotonic()

    def begin(self, num_shards: int, num_bytes: int, verb: str) -> None:
        self.num_shards, self.num_bytes, self.verb = num_shards, num_bytes, verb
        self.started = self.last_line = time.monotonic()
        if is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=num_bytes, unit="B", unit_scale=True, file=self.stream, leave=False,
                            desc=f"data: node {NODE_NAME} rank {self.rank}: {verb} {self.what}")

    def advance(self, num_bytes: int, moved: bool) -> None:
        self.done_shards += 1
        self.done_bytes += num_bytes
        self.moved_bytes += num_bytes if moved else 0
        if self.bar is not None:
            self.bar.update(num_bytes)
            self.bar.set_postfix_str(f"{self.done_shards}/{self.num_shards} shards", refresh=False)
        elif time.monotonic() - self.last_line >= self.interval_s:
            self._print()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.printed or time.monotonic() - self.started >= self.interval_s:
            self._print()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.moved_bytes / elapsed
        left = self.num_bytes - self.done_bytes
        eta = "0s" if left <= 0 else format_duration(left / rate) if rate > 0 else "unknown"
        return (f"data: node {NODE_NAME} rank {self.rank}: {self.verb} {self.done_shards}/{self.num_shards} shards of "
                f"{self.what} ({self.done_bytes / 1e9:.2f}/{self.num_bytes / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, "
                f"eta {eta})")

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.printed, self.last_line = True, time.monotonic()


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"
    return redact_text(" ".join(text.split()) or type(exc).__name__)


class NodeHandshake:
    """How a node's ranks share one fetch without a collective. The node's first rank (the leader) runs the fetch
    in ``lead`` and then writes a marker file beside the cache: ``done`` with the verified copies' paths, or
    ``failed`` with its error in one line. The other ranks ``wait``, polling for the marker until their deadline,
    and raise one DataError when the leader failed or the deadline passes. The marker's name hashes the dataset
    fingerprint, the split, the host and the launch (an id all ranks of this launch agreed on), so a marker left by
    an earlier run or restart can never be taken for this one's; the leader removes markers of this kind (and no
    other file) once they are an hour old."""

    PATTERN = re.compile(r"\.node-(train|val)-[0-9a-f]{16}\.json")
    STALE_S = 3600.0

    def __init__(self, cache_root: str | Path, url: str, fingerprint: str, split: str, launch_id: str):
        self.directory = Path(os.path.expanduser(cache_root))
        self.url, self.fingerprint, self.split = url, fingerprint, split
        key = hashlib.sha256(f"{fingerprint}:{split}:{NODE_NAME}:{launch_id}".encode()).hexdigest()[:16]
        self.path = self.directory / f".node-{split}-{key}.json"

    def lead(self, fetch: Callable[[], CachedSplit]) -> CachedSplit:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        try:
            result = fetch()
        except BaseException as exc:
            self._write({"status": "failed", "error": _one_line(exc)})
            raise
        self._write({"status": "done", "result": result.to_json()})
        return result

    def wait(self, timeout_s: float, poll_s: float = 0.2) -> CachedSplit:
        deadline = time.monotonic() + timeout_s
        what = f"{redact_text(self.url)} ({self.split} split)"
        while True:
            try:
                marker = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):  # not there yet (or, on an odd filesystem, half there)
                marker = None
            if marker is not None and marker.get("fingerprint") == self.fingerprint:
                if marker["status"] == "done":
                    return CachedSplit.from_json(marker["result"])
                raise DataError(f"data: the node's leader (local rank 0) failed to fetch {what}: {marker['error']}")
            if time.monotonic() >= deadline:
                raise DataError(f"data: the node's leader (local rank 0) did not finish fetching {what} within "
                                f"{timeout_s:g} s (data.fetch_timeout_s and a grace period): its own output shows "
                                "its progress or error; raise data.fetch_timeout_s for a slow store or a large split, "
                                "or set data.access=stream")
            time.sleep(poll_s)

    def _write(self, marker: dict) -> None:
        marker.update(fingerprint=self.fingerprint, split=self.split, host=NODE_NAME, pid=os.getpid())
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(marker))
        tmp.replace(self.path)  # waiters see the whole marker or none

    def _remove_stale(self) -> None:
        now = time.time()
        for entry in os.scandir(self.directory):
            if self.PATTERN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime > self.STALE_S:
                        os.unlink(entry.path)
                except FileNotFoundError:  # another node's leader got there first
                    pass
