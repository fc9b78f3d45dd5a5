"""RandPE (randomised RoPE, TAPE.md section 7): RoPE at a sorted random subset of N distinct positions.

Training: each row draws its own subset of [0, M), M = model.positional.randrope_max_len (2 x model.max_seq_len by
default), anew every forward, from the global generator (the trainer seeds it per rank).

Evaluation (``model.eval()``) keeps the training distribution of distances rather than using 0..N-1, which would
halve every distance the model saw (neighbours sit about M / max_seq_len = 2 apart in training): at length N the
range scales with N, R = floor(N x M / max_seq_len), which is the official code's [0, 2 N_eval) at the default M
(TAPE.md section 7). ``model.positional.randrope_eval`` chooses how:

- ``sample`` (default, as the official code): each row draws N sorted distinct positions from [0, R), as in
  training, from a CPU generator seeded with ``randrope_eval_seed`` at every forward. Eval mode therefore never
  touches the global RNG and is a deterministic function of its input, on any device (row b of a batch of length N
  always gets the same draw, whatever the batch size): an evaluation is reproducible, and its mean loss averages
  over the draws of the rows of a batch (per-draw averaging needs no separate pass).
- ``expected``: the evenly spaced positions floor(i R / N), i.e. 2i at the default M: the mean training gap,
  without a draw.

Document mode (a row packing several documents, models.positional_base.DocumentLayout): a token at position p of its
document gets the row's p-th smallest drawn position (training and ``sample``: draw.gather(1, p), draw [B, N] the row's
sorted draw), so every document of a row restarts at the row's first drawn position and keeps the row's gaps (about
M / N in training). A document of length n run alone would spread its n positions over all of [0, M) instead (gaps
about M / n): sampled positions in document mode are not those of the document run alone. ``expected`` gives
floor(p R / N), R = eval_range(N) for the row length N: exactly the positions of the document run alone,
floor(p R_n / n) with R_n = eval_range(n), whenever M / max_seq_len is an integer r or at most 1 (both are r p, or p);
otherwise the two may differ by one.

Cached decoding (models.cache) needs positions that a prefix keeps as the sequence grows. Training draws anew every
forward, and eval-mode ``sample`` draws all N positions anew for each length N: a cache refuses both (cache_refusal;
greedy generation then recomputes the prefix). ``expected`` positions floor(i R / N) are prefix-consistent when
M / max_seq_len is an integer r (they are r i) or at most 1 (they are i), and the cache takes exactly those (for the
new tokens after L cached ones: r (L + j)); any other ratio is refused.

Draws are per row and shared by every layer, in training and evaluation, where the official code draws per layer
(one set of positions for the whole batch in each layer). Per row follows the definition of randomised positional
encodings (one ordered sample of positions per sequence, so every layer sees a token at the same position) and this
package's design (an encoding builds one initial state per forward; layers only read it).
"""

from __future__ import annotations

import torch

from .model_config import ConfigError
from .rope import RoPE


def sorted_random_positions(batch_size: int, seq_len: int, limit: int, device=None, generator=None) -> torch.Tensor:
    """[B, N] int64: per row, N distinct integers from [0, limit) in increasing order, uniformly over the subsets."""
    scores = torch.rand(batch_size, limit, device=device, generator=generator)
    return scores.topk(seq_len, dim=-1).indices.sort(dim=-1).values


class RandRoPE(RoPE):
    name = "randrope"

    def __init__(self, config):
        super().__init__(config)
        p = config.positional
        self.max_len = p.randrope_max_len or 2 * config.max_seq_len
        self.train_len = config.max_seq_len or self.max_len // 2  # the length whose gap M / L evaluation keeps
        self.eval_mode, self.eval_seed = p.randrope_eval, p.randrope_eval_seed

    def eval_range(self, seq_len: int) -> int:
        """R: eval-mode positions lie in [0, R) at length seq_len (2 x seq_len at the default max_len)."""
        return max(seq_len, seq_len * self.max_len // self.train_len)

    def decode_stride(self) -> int | None:
        """The gap r of the expected positions r i at every length, or None where they depend on the length."""
        if self.max_len <= self.train_len:
            return 1  # R = N: positions 0 .. N-1
        return self.max_len // self.train_len if self.max_len % self.train_len == 0 else None

    def cache_refusal(self):
        if self.training:
            return ("RandPE draws new positions every training forward, which a decoding cache cannot keep: call "
                    "model.eval() with model.positional.randrope_eval=expected to decode with a cache")
        if self.eval_mode == "sample":
            return ("RandPE's randrope_eval=sample draws all N positions anew for each length N, so a prefix's "
                    "positions change as the sequence grows and cannot be cached: set model.positional.randrope_eval="
                    "expected to decode with a cache, or decode without one")
        if self.decode_stride() is None:
            return (f"RandPE's expected positions floor(i R / N) change with the length N unless randrope_max_len / "
                    f"max_seq_len is an integer or at most 1 (here {self.max_len} / {self.train_len}): decode without "
                    "a cache")
        return None

    def decode_state(self, batch_size, past, num_new, device, dtype, offset=0):
        positions = torch.arange(past, past + num_new, device=device) * self.decode_stride() + offset
        return self.tables(positions.unsqueeze(0), dtype)  # [1, n]: the expected positions r i of these tokens

    def positions(self, batch_size, seq_len, device, offset, documents=None):
        if not self.training:
            limit = self.eval_range(seq_len)
            if self.eval_mode == "expected":
                if documents is not None:
                    return documents.positions * limit // seq_len + offset  # [B, N]
                return (torch.arange(seq_len, device=device) * limit // seq_len + offset).unsqueeze(0)  # [1, N]
            # on the CPU: the same positions on every device, and no generator state that outlives the call
            generator = torch.Generator().manual_seed(self.eval_seed)
            draw = sorted_random_positions(batch_size, seq_len, limit, generator=generator).to(device)
        else:
            if seq_len > self.max_len:
                raise ConfigError(f"randrope: sequence length {seq_len} exceeds model.positional.randrope_max_len="
                                  f"{self.max_len}")
            draw = sorted_random_positions(batch_size, seq_len, self.max_len, device)  # [B, N]
        if documents is not None:
            draw = draw.gather(1, documents.positions)  # each document restarts at the row's first drawn position
        return draw + offset
