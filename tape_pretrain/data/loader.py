"""Training batches: windows of Lmax+1 tokens in one global order per (seed, epoch).

The concatenation of a split's shards is cut into W windows with stride Lmax (inputs and labels
both Lmax long). Epoch e visits the windows in permutation P_e = rng(seed, e).permutation(W). A
global batch is the next G windows of that sequence; data-parallel rank r takes windows
[r G/R, (r+1) G/R) of it. The order therefore does not depend on the world size, and the state is a
few integers: {fingerprint, seed, epoch, tokens_consumed}.

A mixture of sources (data.sources) interleaves the sources' own window sequences by their weights
(tape_pretrain.data.mixture): position p of the global sequence is the k-th window of source s, a
function of p and the weights alone. Source s > 0 permutes its windows with rng(seed, e, s).

Where the dataset records document starts, every batch carries per-token document ids: equal ids mark
one document within a row (ids are only compared, never used as positions).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from tape_pretrain.data.cache import CachedSplit, MemmapShards
from tape_pretrain.data.mixture import Interleaving, integer_weights
from tape_pretrain.data.stream import StreamedSplit
from tape_pretrain.errors import CheckpointError, DataError


class TokenWindows:
    """Random access to windows of ``window_len + 1`` tokens over the concatenated shards, and to the document each
    token belongs to where the shards' document starts are recorded.

    ``split`` gives the shard storage: a CachedSplit (data.access=copy: local files, memory-mapped) or a
    StreamedSplit (data.access=stream: shards fetched when first read, through a bounded cache). A window's shards
    are acquired while it is copied out and released after; the storage is safe to read from several threads."""

    def __init__(self, split: CachedSplit | StreamedSplit, dtype: str, window_len: int, where: str = "the split"):
        opener = getattr(split, "open_shards", None)  # anything with .shards of local files reads as a CachedSplit
        self.shards = opener(dtype) if opener is not None else MemmapShards(split, dtype)
        self.starts = np.cumsum([0] + list(self.shards.lengths))
        self.window_len = window_len
        total = int(self.starts[-1])
        self.num_windows = (total - 1) // window_len if total > 1 else 0
        if self.num_windows == 0:
            raise DataError(f"{where} has {total:,} tokens, too few for one window of length {window_len:,}")

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def has_documents(self) -> bool:
        return self.shards.has_documents

    def gather(self, indices: np.ndarray, with_documents: bool = False):
        """[len(indices), window_len + 1] int64 tokens of windows ``indices`` (stride window_len); with
        ``with_documents`` also their [len(indices), window_len + 1] int32 document ids."""
        return self.gather_spans(np.asarray(indices, dtype=np.int64) * self.window_len, with_documents)

    def gather_spans(self, starts: np.ndarray, with_documents: bool = False):
        """[len(starts), window_len + 1] int64 tokens beginning at the given token offsets (and document ids, as
        ``gather``)."""
        if with_documents and not self.has_documents:
            raise DataError("this dataset records no document starts (prepared before document offsets)")
        n = self.window_len + 1
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), n), dtype=np.int64)
        # 1 where a document begins inside the row; the running sum is then the row's document ids
        begins = np.zeros((len(starts), n), dtype=np.int32) if with_documents else None
        firsts = np.searchsorted(self.starts, starts, side="right") - 1  # each row's first and last shard
        lasts = np.searchsorted(self.starts, starts + (n - 1), side="right") - 1
        bases = self.starts[firsts]
        storage, held = self.shards, None
        # rows in shard order, each to its own place: the storage is acquired once per run of rows on the same
        # shards (and a stream cache fetches a shard once per call)
        order = np.lexsort((lasts, firsts))
        try:
            for row, start, shard, last, base in zip(order.tolist(), starts[order].tolist(), firsts[order].tolist(),
                                                     lasts[order].tolist(), bases[order].tolist()):
                if held != (shard, last):
                    if held is not None:
                        storage.release(*held)
                        held = None
                    arrays, document_starts = storage.acquire(shard, last)
                    held = (shard, last)
                offset, filled = start - base, 0
                while filled < n:  # one slice per window and shard, never per token: it may span shards
                    piece = arrays[shard][offset:offset + n - filled]
                    out[row, filled:filled + len(piece)] = piece
                    if begins is not None:
                        self._mark_document_starts(begins[row], document_starts[shard], offset, len(piece), filled)
                    filled += len(piece)
                    shard, offset = shard + 1, 0
        finally:
            if held is not None:
                storage.release(*held)
        if begins is None:
            return out
        return out, np.cumsum(begins, axis=1, dtype=np.int32)

    def within_document_starts(self, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """(token offsets, is-first flags) of the windows of window_len + 1 tokens that lie inside one document:
        every ``stride`` tokens from each document's start while the window fits, in corpus order. A window is first
        when it starts its document."""
        if not self.has_documents:
            raise DataError("this dataset records no document starts (prepared before document offsets)")
        starts = np.concatenate([s.astype(np.int64) + int(base)
                                 for s, base in zip(self.shards.all_document_starts(), self.starts)])
        lengths = np.diff(np.append(starts, self.num_tokens))
        counts = np.where(lengths > self.window_len, (lengths - self.window_len - 1) // stride + 1, 0)
        ordinal = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # window j of its document
        return np.repeat(starts, counts) + ordinal * stride, ordinal == 0

    @staticmethod
    def _mark_document_starts(begins: np.ndarray, starts: np.ndarray, offset: int, length: int, filled: int) -> None:
        """Set begins[filled + j] = 1 where a document starts at token offset + j of the shard whose document
        ``starts`` are given (j < length); the row's first token starts the row's first id whether or not a document
        starts there."""
        first = int(np.searchsorted(starts, offset, side="right" if filled == 0 else "left"))
        last = int(np.searchsorted(starts, offset + length, side="left"))
        begins[starts[first:last].astype(np.int64) - offset + filled] = 1


@dataclass
class WindowSource:
    """One dataset of a mixture: its windows, weight and identity."""

    name: str
    windows: TokenWindows
    weight: float
    fingerprint: str


@dataclass
class WindowBatch:
    """This rank's windows of one global batch."""

    tokens: torch.Tensor
    """[rows, Lmax + 1] int64."""
    document_ids: torch.Tensor | None
    """[rows, Lmax + 1] int32 document ids (None when the data records no document starts or they are not asked
    for)."""
    sources: np.ndarray
    """[rows] the source index of each window."""


class GlobalBatchLoader:
    """Yields this rank's slice of each global batch as a WindowBatch of [G/R, Lmax+1] tokens.

    ``sources``: one TokenWindows (a single dataset), or a mixture's WindowSources. ``documents``: deliver document
    ids with every batch (the data must record document starts)."""

    def __init__(self, sources: TokenWindows | list[WindowSource], fingerprint: str, seed: int, global_windows: int,
                 rank: int, world_size: int, prefetch: int = 2, documents: bool = False):
        if global_windows % world_size:
            raise DataError(f"a global batch of {global_windows} windows does not split over {world_size} ranks")
        if isinstance(sources, TokenWindows):
            sources = [WindowSource("main", sources, 1.0, fingerprint)]
        self.sources, self.is_mixture = sources, len(sources) > 1
        self.windows = sources[0].windows  # the window length and, for one source, the whole data
        if len({s.windows.window_len for s in sources}) != 1:
            raise DataError("every source of a mixture needs the same window length")
        if documents and not all(s.windows.has_documents for s in sources):
            raise DataError("document ids were asked for, but a source records no document starts")
        self.documents = documents
        self.interleaving = Interleaving([s.weight for s in sources]) if self.is_mixture else None
        # The interleaving continues from here: weights changed on resume (checkpoint.allow_changes: [data]) start
        # a new interleaving at the position of the change, from each source's count of windows at that point.
        self.base_position, self.base_counts = 0, [0] * len(sources)
        self.fingerprint, self.seed = fingerprint, seed
        self.global_windows, self.rank, self.world_size = global_windows, rank, world_size
        self.windows_consumed = 0
        self.prefetch = prefetch
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self._permutations_lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def permutation(self, epoch: int, source: int = 0) -> np.ndarray:
        key = (source, epoch)
        with self._permutations_lock:  # the prefetch thread and the training loop (its log line) both ask
            if key not in self._permutations:
                rng = np.random.default_rng([self.seed, epoch] if source == 0 else [self.seed, epoch, source])
                self._permutations = {k: v for k, v in self._permutations.items() if k[0] != source}  # current only
                self._permutations[key] = rng.permutation(self.sources[source].windows.num_windows)
            return self._permutations[key]

    def _source_windows(self, source: int, ordinals: np.ndarray) -> np.ndarray:
        """Window ids of a source's windows number ``ordinals`` in its own sequence (epoch after epoch)."""
        w = self.sources[source].windows.num_windows
        out = np.empty(len(ordinals), dtype=np.int64)
        for epoch in np.unique(ordinals // w):
            mask = ordinals // w == epoch
            out[mask] = self.permutation(int(epoch), source)[ordinals[mask] % w]
        return out

    def global_windows_at(self, first_window: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window id) [G] of the global batch starting at position ``first_window`` of the sequence."""
        if not self.is_mixture:
            ordinals = np.arange(first_window, first_window + self.global_windows)
            return np.zeros(self.global_windows, dtype=np.int64), self._source_windows(0, ordinals)
        sources, ordinals = self.interleaving.windows(first_window - self.base_position, self.global_windows)
        ordinals += np.asarray(self.base_counts, dtype=np.int64)[sources]
        ids = np.empty_like(ordinals)
        for s in np.unique(sources):
            mask = sources == s
            ids[mask] = self._source_windows(int(s), ordinals[mask])
        return sources, ids

    def global_indices(self, first_window: int) -> np.ndarray:
        """The global batch's window ids (one source), or [2, G] (source, window id) for a mixture."""
        sources, ids = self.global_windows_at(first_window)
        return np.stack([sources, ids]) if self.is_mixture else ids

    def rank_batch(self, first_window: int) -> WindowBatch:
        per_rank = self.global_windows // self.world_size
        sources, ids = self.global_windows_at(first_window)
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        sources, ids = sources[mine], ids[mine]
        n = self.windows.window_len + 1
        tokens = np.empty((per_rank, n), dtype=np.int64)
        documents = np.empty((per_rank, n), dtype=np.int32) if self.documents else None
        for s in np.unique(sources):
            rows = np.flatnonzero(sources == s)
            got = self.sources[int(s)].windows.gather(ids[rows], with_documents=self.documents)
            if self.documents:
                tokens[rows], documents[rows] = got
            else:
                tokens[rows] = got
        return WindowBatch(torch.from_numpy(tokens), None if documents is None else torch.from_numpy(documents),
                           sources)

    # -- iteration with optional background prefetch --------------------------------------------

    def next_batch(self) -> WindowBatch:
        if self.prefetch <= 0:
            batch = self.rank_batch(self.windows_consumed)
        else:
            if self._thread is None:
                self._start_prefetch()
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                raise batch
        self.windows_consumed += self.global_windows
        return batch

    def _start_prefetch(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        start = self.windows_consumed

        def work():
            position = start
            try:
                while not self._stop.is_set():
                    batch = self.rank_batch(position)
                    position += self.global_windows
                    while not self._stop.is_set():
                        try:
                            self._queue.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as exc:  # surfaced to the training loop on its next batch
                self._queue.put(exc)

        self._thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    # -- state -----------------------------------------------------------------------------------

    def source_counts(self) -> list[int]:
        """Windows consumed from each source so far."""
        if not self.is_mixture:
            return [self.windows_consumed]
        done = self.interleaving.counts(self.windows_consumed - self.base_position)
        return [base + n for base, n in zip(self.base_counts, done)]

    def state_dict(self) -> dict:
        w = self.windows.num_windows
        state = {"fingerprint": self.fingerprint, "seed": self.seed, "epoch": self.windows_consumed // w,
                 "tokens_consumed": self.windows_consumed * self.windows.window_len}
        if self.is_mixture:
            state["mixture"] = {"sources": [{"name": s.name, "fingerprint": s.fingerprint, "weight": s.weight}
                                            for s in self.sources],
                                "base_position": self.base_position, "base_counts": list(self.base_counts)}
        return state

    def load_state_dict(self, state: dict, allow_fingerprint_change: bool = False) -> None:
        if state["fingerprint"] != self.fingerprint and not allow_fingerprint_change:
            raise CheckpointError(
                f"dataset fingerprint {self.fingerprint[:16]} differs from the checkpoint's "
                f"{state['fingerprint'][:16]}: resuming on other data (add 'data' to checkpoint.allow_changes "
                "if intended)")
        if state["tokens_consumed"] % self.windows.window_len:
            raise CheckpointError(f"loader state: tokens_consumed {state['tokens_consumed']} is not a multiple "
                                  f"of the window length {self.windows.window_len}")
        self.close()
        position = state["tokens_consumed"] // self.windows.window_len
        self._load_mixture(state.get("mixture"), position, allow_fingerprint_change)
        self.windows_consumed = position
        self.seed = state["seed"]

    def _load_mixture(self, saved: dict | None, position: int, allow_change: bool) -> None:
        names = [s.name for s in self.sources]
        saved_names = [s["name"] for s in saved["sources"]] if saved else ["main"]
        if saved_names != names and (saved or self.is_mixture):
            raise CheckpointError(f"the checkpoint's data sources {saved_names} differ from this run's {names}: "
                                  "sources cannot be added, removed or renamed on resume (start a new run, with "
                                  "model.init_from the export)")
        if not self.is_mixture:
            return
        weights, saved_weights = [s.weight for s in self.sources], [s["weight"] for s in saved["sources"]]
        self.base_position, self.base_counts = int(saved["base_position"]), [int(c) for c in saved["base_counts"]]
        if integer_weights(weights) == integer_weights(saved_weights):
            return
        if not allow_change:
            raise CheckpointError(f"data.sources weights {weights} differ from the checkpoint's {saved_weights}: "
                                  "the mixture would change (add 'data' to checkpoint.allow_changes if intended)")
        # continue each source where it stopped, interleaved by the new weights from here on
        old = Interleaving(saved_weights).counts(position - self.base_position)
        self.base_counts = [base + n for base, n in zip(self.base_counts, old)]
        self.base_position = position
