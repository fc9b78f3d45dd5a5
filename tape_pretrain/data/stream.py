"""data.access=stream: a split's shards fetched when the loader first needs them, through a bounded local cache.

Each process keeps its own cache directory, ``cache_dir/stream/<host>-<pid>-<id>/``, of whole shards and their
document offsets. A shard is fetched by parallel ranged reads, checked as copy mode checks it (size, sha256, token
ids below the vocabulary size, offsets that fit the shard and follow its EOS tokens) before any of its bytes is
used, memory-mapped, and evicted least recently used once the cache would exceed its limit. The shards of a window
are pinned while the window is copied out, so a shard is never evicted under a reader; a shard (or the shards one
window spans) larger than the limit is an error naming both sizes.

A StreamPrefetcher follows the loader: the global window order is a pure function of the position
(``GlobalBatchLoader.global_windows_at``), so it computes this rank's windows of the next batches and fetches their
shards in the background, in the order they will be read, without evicting a shard needed sooner.

The window space is the whole split, as in copy mode: the same batches, the same loader state. Only the bytes
differ in where they wait. A bad shard cannot be skipped here (the order already counts its windows): it stops the
run when first read, naming the shard.

Whole shards are the unit because a shard's sha256 is the only checksum the manifest records: a window read by
itself could not be verified. Windows are drawn from the whole split in a random order, so a cache smaller than
the split re-fetches shards; it bounds the disk, not the traffic.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import re
import shutil
import threading
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tape_pretrain.data.cache import NODE_NAME, check_docs, check_shard, download_verified
from tape_pretrain.data.manifest import DOCS_DTYPE, Manifest, ShardInfo
from tape_pretrain.data.storage import is_local, join, open_url
from tape_pretrain.errors import DataError
from tape_pretrain.utils.redact import redact_text

if TYPE_CHECKING:
    from tape_pretrain.data.loader import GlobalBatchLoader

PART_BYTES = 8 << 20
"""Size of one ranged read; a shard is fetched as several of them at once."""
PARTS_AT_ONCE = 8
"""Ranged reads in flight per shard (and the most bytes of a shard held in memory: PART_BYTES times this)."""
OWNER_FILE = ".tape_pretrain_stream_cache"
"""Marks a directory as a stream cache this project created: only such directories are ever removed."""
_DIR_NAME = re.compile(r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"


@dataclass
class _Split:
    """One split read through the cache: where its shards live and, per shard, what is cached."""

    url: str
    fs: object
    root: str
    directory: Path
    shards: list[ShardInfo]
    dtype: str
    vocab_size: int
    eos_id: int
    sizes: list[int]
    tokens: list[np.ndarray | None] = field(default_factory=list)
    document_starts: list[np.ndarray | None] = field(default_factory=list)
    pins: list[int] = field(default_factory=list)


class StreamCache:
    """Verified shards on local disk, at most ``limit_bytes`` of them (downloads in progress included), least
    recently used evicted first, shared by the splits added to it. Thread-safe: the loader's thread reads while a
    StreamPrefetcher fetches."""

    def __init__(self, directory: str | Path, limit_bytes: int):
        self.directory, self.limit_bytes = Path(directory), int(limit_bytes)
        self._splits: list[_Split] = []
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0  # readers waiting for a shard or for room: only then does a release notify
        self._lru: OrderedDict[tuple[int, int], None] = OrderedDict()  # cached (split, shard), oldest first
        self._inflight: set[tuple[int, int]] = set()
        self._used = 0
        """Bytes of cached shards and of downloads in progress."""
        self.fetched_bytes = 0
        """Bytes fetched so far (shards and offsets): the traffic, for reports and tests."""
        self.fetches = 0
        self.peak_bytes = 0
        """The most bytes the cache held at once (downloads in progress included)."""
        self._closed = False

    # -- splits ---------------------------------------------------------------------------------

    def add_split(self, url: str, manifest: Manifest, fingerprint: str, split: str,
                  storage_options=None) -> StreamedSplit:
        """The ``split`` of the dataset at ``url``, to read through this cache (nothing is fetched yet)."""
        fs, root = open_url(url, storage_options)
        shards = list(manifest.splits.get(split, []))
        sizes = [s.num_bytes + s.docs_num_bytes for s in shards]
        largest = max(sizes, default=0)
        if largest > self.limit_bytes:
            name = join(redact_text(url), shards[sizes.index(largest)].path)
            raise DataError(f"{name} with its document offsets is {largest:,} bytes ({_gib(largest)}), more than this "
                            f"rank's stream cache of {self.limit_bytes:,} bytes ({_gib(self.limit_bytes)}): raise "
                            "data.stream_cache_gib (each node's ranks share it evenly), or use data.access=copy")
        # one directory per split read (not per fingerprint): a dataset listed twice, or one dataset at two URLs,
        # must not share files that either may evict or be renaming into place
        with self._cond:
            slot = len(self._splits)
        entry = _Split(url, fs, root, self.directory / f"{slot:03d}-{fingerprint[:16]}", shards, manifest.dtype,
                       int(manifest.tokenizer["vocab_size"]), int(manifest.tokenizer.get("eos_id", -1)), sizes,
                       [None] * len(shards), [None] * len(shards), [0] * len(shards))
        with self._cond:
            self._splits.append(entry)
            index = len(self._splits) - 1
        return StreamedSplit(self, index, shards)

    # -- reading --------------------------------------------------------------------------------

    def acquire(self, split: int, first: int, last: int) -> tuple[list, list]:
        """Pin shards first..last of ``split``, fetching those not cached; returns the split's per-shard token and
        document-start arrays (the pinned entries stay valid until ``release``)."""
        entry = self._splits[split]
        if first == last:  # the common case, a window inside one cached shard: one lock, no lists
            with self._cond:
                if entry.tokens[first] is not None:
                    entry.pins[first] += 1
                    self._lru.move_to_end((split, first))
                    return entry.tokens, entry.document_starts
        keys = [(split, i) for i in range(first, last + 1)]
        need = sum(entry.sizes[first:last + 1])
        if need > self.limit_bytes:
            names = ", ".join(entry.shards[i].path for i in range(first, last + 1))
            raise DataError(f"{redact_text(entry.url)}: one window spans shards {names}, {need:,} bytes together, "
                            f"more than this rank's stream cache of {self.limit_bytes:,} bytes: raise "
                            "data.stream_cache_gib, or use data.access=copy")
        protect = set(keys)
        while True:
            with self._cond:
                missing = [k for k in keys if entry.tokens[k[1]] is None]
                if not missing:
                    for k in keys:
                        entry.pins[k[1]] += 1
                        self._lru.move_to_end(k)
                    return entry.tokens, entry.document_starts
                key = missing[0]
                if key in self._inflight or not self._reserve(entry.sizes[key[1]], protect):
                    self._waiting += 1  # the prefetcher is fetching it, or room is pinned or still downloading
                    self._cond.wait(0.5)
                    self._waiting -= 1
                    continue
                self._inflight.add(key)
            self._load(key)

    def release(self, split: int, first: int, last: int) -> None:
        entry = self._splits[split]
        with self._cond:
            for i in range(first, last + 1):
                entry.pins[i] -= 1
            if self._waiting:
                self._cond.notify_all()

    def prefetch(self, plan: list[tuple[int, int]], stop: threading.Event | None = None) -> int:
        """Fetch the (split, shard)s of ``plan``, listed in the order they will be read, as far as the cache holds
        them: evicting only shards that are neither pinned nor in the plan (so it never takes a shard from the reader
        it runs ahead of). Returns how many were fetched. A failure is left for the reader, who fetches the shard
        again and reports it."""
        protect = dict.fromkeys(plan)
        planned, total = [], 0
        for split, i in protect:
            size = self._splits[split].sizes[i]
            if total + size > self.limit_bytes:
                break
            planned.append((split, i))
            total += size
        with self._cond:
            for key in reversed(planned):  # the shard read first ends up most recently used
                if key in self._lru:
                    self._lru.move_to_end(key)
        fetched = 0
        for key in planned:
            if (stop is not None and stop.is_set()) or self._closed:
                break
            with self._cond:
                if self._splits[key[0]].tokens[key[1]] is not None or key in self._inflight:
                    continue
                if not self._reserve(self._splits[key[0]].sizes[key[1]], protect):
                    break
                self._inflight.add(key)
            with contextlib.suppress(Exception):
                self._load(key)
                fetched += 1
        return fetched

    # -- internals (the lock is held where noted) ------------------------------------------------

    def _reserve(self, size: int, protect: set | dict) -> bool:
        """With the lock held: make room for ``size`` more bytes by evicting unpinned, unprotected shards, least
        recently used first, and count them as used; False (nothing reserved) if that cannot make enough room."""
        if self._used + size > self.limit_bytes:
            free = self.limit_bytes - self._used
            victims = []
            for key in self._lru:
                if free >= size:
                    break
                if self._splits[key[0]].pins[key[1]] == 0 and key not in protect:
                    victims.append(key)
                    free += self._splits[key[0]].sizes[key[1]]
            if free < size:
                return False
            for key in victims:
                self._evict(key)
        self._used += size
        self.peak_bytes = max(self.peak_bytes, self._used)
        return True

    def _evict(self, key: tuple[int, int]) -> None:
        """With the lock held: drop a cached, unpinned shard and delete its files."""
        entry = self._splits[key[0]]
        del self._lru[key]
        entry.tokens[key[1]] = entry.document_starts[key[1]] = None
        self._used -= entry.sizes[key[1]]
        for rel in (entry.shards[key[1]].path, entry.shards[key[1]].docs_path):
            if rel:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.directory / rel)

    def _load(self, key: tuple[int, int]) -> None:
        """Fetch and verify a shard whose room is reserved and which is marked in flight, then publish it."""
        entry = self._splits[key[0]]
        try:
            tokens, starts = self._fetch(entry, key[1])
        except BaseException:
            with self._cond:
                self._inflight.discard(key)
                self._used -= entry.sizes[key[1]]
                self._cond.notify_all()
            raise
        with self._cond:
            self._inflight.discard(key)
            entry.tokens[key[1]], entry.document_starts[key[1]] = tokens, starts
            self._lru[key] = None
            self.fetched_bytes += entry.sizes[key[1]]
            self.fetches += 1
            self._cond.notify_all()

    def _fetch(self, entry: _Split, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._closed:
            raise DataError("the stream cache is closed (its run ended)")
        shard = entry.shards[i]
        url = redact_text(entry.url)

        def get(rel: str, check) -> str:
            where = join(url, rel)
            remote = join(entry.root, rel)
            if is_local(entry.fs):  # a local or shared disk: no escaping symlinks, as in copy mode
                real_root = os.path.realpath(entry.root)
                if os.path.commonpath([os.path.realpath(remote), real_root]) != real_root:
                    raise DataError(f"{where}: shard path {rel!r} resolves outside the dataset (symlink?)")
            path = str(entry.directory / rel)
            reason = download_verified(entry.fs, remote, path, check, where,
                                       get=lambda r, p: _ranged_get(entry.fs, r, p))
            if reason is not None:
                raise DataError(f"{where}: {reason}: data.access=stream cannot skip a bad shard once training reads "
                                "it (data.on_corrupt_shard=skip works with data.access=copy); repair or re-prep the "
                                "dataset")
            return path

        path = get(shard.path, lambda p: check_shard(p, shard, entry.dtype, entry.vocab_size, shard.path))
        starts = None
        if shard.docs_path:
            try:
                docs = get(shard.docs_path, lambda p: check_docs(p, shard, path, entry.dtype, entry.eos_id))
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                raise
            starts = np.memmap(docs, dtype=DOCS_DTYPE, mode="r")
        return np.memmap(path, dtype=entry.dtype, mode="r"), starts

    def close(self) -> None:
        """Delete the cache's files (its directory was created for this process alone)."""
        with self._cond:
            self._closed = True
            for entry in self._splits:
                entry.tokens = [None] * len(entry.shards)
                entry.document_starts = [None] * len(entry.shards)
            self._lru.clear()
            self._used = 0
        if (self.directory / OWNER_FILE).exists():
            shutil.rmtree(self.directory, ignore_errors=True)


def _ranged_get(fs, remote: str, local: str) -> None:
    """Copy ``remote`` to ``local`` by ranged reads, PARTS_AT_ONCE at a time; the caller checks size and sha256."""
    size = int(fs.info(remote)["size"])
    with open(local, "wb") as f:
        for group in range(0, size, PART_BYTES * PARTS_AT_ONCE):
            starts = list(range(group, min(group + PART_BYTES * PARTS_AT_ONCE, size), PART_BYTES))
            ends = [min(start + PART_BYTES, size) for start in starts]
            for part in fs.cat_ranges([remote] * len(starts), starts, ends, on_error="raise"):
                f.write(part)


class StreamedSplit:
    """A split read through a StreamCache: what TokenWindows needs to lay out its windows (no shard is fetched)."""

    def __init__(self, cache: StreamCache, index: int, shards: list[ShardInfo]):
        self.cache, self.index, self.shards = cache, index, shards
        self.skipped: list[str] = []

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes + s.docs_num_bytes for s in self.shards)

    def open_shards(self, dtype: str) -> StreamedShards:
        return StreamedShards(self)


class StreamedShards:
    """TokenWindows' shard storage in data.access=stream (``tape_pretrain.data.cache.MemmapShards`` in copy mode)."""

    def __init__(self, split: StreamedSplit):
        self.cache, self.index = split.cache, split.index
        self.lengths = [s.num_tokens for s in split.shards]
        self.has_documents = all(s.docs_path for s in split.shards)

    def acquire(self, first: int, last: int) -> tuple[list, list]:
        return self.cache.acquire(self.index, first, last)

    def release(self, first: int, last: int) -> None:
        self.cache.release(self.index, first, last)

    def all_document_starts(self) -> list[np.ndarray]:
        raise DataError("every document start of a split is only at hand with data.access=copy")


def open_stream_cache(cache_dir: str, limit_bytes: int) -> StreamCache:
    """A new StreamCache in ``cache_dir/stream/``, deleted when this process exits. Caches left there by processes
    of this host that no longer run are deleted first (only directories this project marked as its own)."""
    root = Path(os.path.expanduser(cache_dir)) / "stream"
    root.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(root):
        match = _DIR_NAME.fullmatch(entry.name)
        if (match and match["host"] == NODE_NAME and not _alive(int(match["pid"]))
                and entry.is_dir(follow_symlinks=False) and os.path.exists(os.path.join(entry.path, OWNER_FILE))):
            shutil.rmtree(entry.path, ignore_errors=True)
    directory = root / f"{NODE_NAME}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    (directory / OWNER_FILE).write_text("a tape_pretrain stream cache, deleted when its process ends\n")
    cache = StreamCache(directory, limit_bytes)
    atexit.register(cache.close)
    return cache


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class StreamPrefetcher:
    """Fetches, in a background thread, the shards this rank will read in the loader's next ``ahead_batches``
    global batches, for every source read through a StreamCache. It follows the loader's position (and state, after
    a resume) and computes the windows on a copy of it, so the loader itself is never touched from this thread; it
    ends when the loader is garbage-collected or on ``close``."""

    def __init__(self, loader: GlobalBatchLoader, ahead_batches: int, poll_s: float = 0.05):
        self.ahead_batches, self.poll_s = max(1, ahead_batches), poll_s
        self._loader = weakref.ref(loader)
        self._view = copy.copy(loader)  # its own permutation cache: the loader's is not shared between threads
        self._view._permutations = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-prefetch", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # before the cache's own exit handler (registered earlier) deletes its files

    def plan(self, position: int) -> dict[StreamCache, list[tuple[int, int]]]:
        """Per cache, the (split, shard)s this rank reads from ``position`` on, in reading order."""
        view = self._view
        per_rank = view.global_windows // view.world_size
        mine = slice(view.rank * per_rank, (view.rank + 1) * per_rank)
        plans: dict[StreamCache, list[tuple[int, int]]] = {}
        for b in range(self.ahead_batches):
            sources, ids = view.global_windows_at(position + b * view.global_windows)
            sources, ids = sources[mine], ids[mine]
            for s in np.unique(sources):  # rank_batch reads source by source
                windows = view.sources[int(s)].windows
                if not isinstance(windows.shards, StreamedShards):
                    continue
                starts = ids[sources == s] * windows.window_len
                firsts = np.searchsorted(windows.starts, starts, side="right") - 1
                lasts = np.searchsorted(windows.starts, starts + windows.window_len, side="right") - 1
                order = np.lexsort((lasts, firsts))  # TokenWindows reads rows in shard order
                firsts, lasts = firsts[order], lasts[order]
                index = windows.shards.index
                keys = plans.setdefault(windows.shards.cache, [])
                for first, last in zip(firsts.tolist(), lasts.tolist()):
                    keys += [(index, i) for i in range(first, last + 1)]
        return plans

    def _run(self) -> None:
        while not self._stop.is_set():
            loader = self._loader()
            if loader is None:
                return
            view = self._view
            if view.seed != loader.seed:
                view._permutations = {}
            view.seed, view.base_position = loader.seed, loader.base_position
            view.base_counts = list(loader.base_counts)
            position = loader.windows_consumed
            del loader
            try:
                for cache, keys in self.plan(position).items():
                    cache.prefetch(keys, self._stop)
            except Exception:  # never fatal here: the reader fetches what it needs and reports any error
                pass
            self._stop.wait(self.poll_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
