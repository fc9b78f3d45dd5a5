"""Training batches: windows of Lmax+1 tokens in one global order per (seed, epoch).

The concatenation of a split's shards is cut into W windows with stride Lmax (inputs and labels
both Lmax long). Epoch e visits the windows in permutation P_e = rng(seed, e).permutation(W). A
global batch is the next G windows of that sequence; data-parallel rank r takes windows
[r G/R, (r+1) G/R) of it. The order therefore does not depend on the world size, and the state is a
few integers: {fingerprint, seed, epoch, tokens_consumed}.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from tape_pretrain.data.cache import CachedSplit
from tape_pretrain.errors import CheckpointError, DataError


class TokenWindows:
    """Random access to windows of ``window_len + 1`` tokens over the concatenated shards (memory-mapped)."""

    def __init__(self, split: CachedSplit, dtype: str, window_len: int, where: str = "the split"):
        self.arrays = [np.memmap(s.path, dtype=dtype, mode="r") for s in split.shards]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.window_len = window_len
        total = int(self.starts[-1])
        self.num_windows = (total - 1) // window_len if total > 1 else 0
        if self.num_windows == 0:
            raise DataError(f"{where} has {total:,} tokens, too few for one window of length {window_len:,}")

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """[len(indices), window_len + 1] int64 tokens of windows ``indices`` (stride window_len)."""
        return self.gather_spans(np.asarray(indices, dtype=np.int64) * self.window_len)

    def gather_spans(self, starts: np.ndarray) -> np.ndarray:
        """[len(starts), window_len + 1] int64 tokens beginning at the given token offsets."""
        n = self.window_len + 1
        out = np.empty((len(starts), n), dtype=np.int64)
        for row, start in enumerate(starts):  # one slice per window, never per token
            start = int(start)
            shard = int(np.searchsorted(self.starts, start, side="right")) - 1
            offset = start - int(self.starts[shard])
            piece = self.arrays[shard][offset:offset + n]
            out[row, :len(piece)] = piece
            filled = len(piece)
            while filled < n:  # the window continues into the next shard(s)
                shard += 1
                piece = self.arrays[shard][: n - filled]
                out[row, filled:filled + len(piece)] = piece
                filled += len(piece)
        return out


@dataclass
class LoaderState:
    fingerprint: str
    seed: int
    epoch: int
    tokens_consumed: int


class GlobalBatchLoader:
    """Yields this rank's slice of each global batch as a LongTensor [G/R, Lmax+1]."""

    def __init__(self, windows: TokenWindows, fingerprint: str, seed: int, global_windows: int, rank: int,
                 world_size: int, prefetch: int = 2):
        if global_windows % world_size:
            raise DataError(f"a global batch of {global_windows} windows does not split over {world_size} ranks")
        self.windows, self.fingerprint, self.seed = windows, fingerprint, seed
        self.global_windows, self.rank, self.world_size = global_windows, rank, world_size
        self.windows_consumed = 0
        self.prefetch = prefetch
        self._permutations: dict[int, np.ndarray] = {}
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations = {epoch: rng.permutation(self.windows.num_windows)}  # keep only the current
        return self._permutations[epoch]

    def global_indices(self, first_window: int) -> np.ndarray:
        """Window ids of the global batch starting at position ``first_window`` of the global sequence."""
        w = self.windows.num_windows
        positions = np.arange(first_window, first_window + self.global_windows)
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(positions // w):
            mask = positions // w == epoch
            out[mask] = self.permutation(int(epoch))[positions[mask] % w]
        return out

    def rank_batch(self, first_window: int) -> torch.Tensor:
        per_rank = self.global_windows // self.world_size
        indices = self.global_indices(first_window)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return torch.from_numpy(self.windows.gather(indices))

    # -- iteration with optional background prefetch --------------------------------------------

    def next_batch(self) -> torch.Tensor:
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

    def state_dict(self) -> dict:
        w = self.windows.num_windows
        return {"fingerprint": self.fingerprint, "seed": self.seed, "epoch": self.windows_consumed // w,
                "tokens_consumed": self.windows_consumed * self.windows.window_len}

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
        self.windows_consumed = state["tokens_consumed"] // self.windows.window_len
        self.seed = state["seed"]
