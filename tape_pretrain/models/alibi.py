"""ALiBi: a per-head linear distance penalty -m_h (i - j) added to the logits (in document mode, -inf across
documents)."""

from __future__ import annotations

import math

import torch

from .blocked_bias import attention_in_query_blocks
from .positional_base import PositionalEncoding, PositionalLayer


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Geometric slopes 2^(-8h/n); for H not a power of two, the 2^floor(log2 H) slopes plus every
    other slope of the next power of two."""
    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_distance_table(slopes: torch.Tensor, num_distances: int, dtype: torch.dtype) -> torch.Tensor:
    """[H, num_distances + 1] of ``dtype``: -m_h d for the distances d = 0 .. num_distances - 1, then -inf.

    Products of float64 slopes and integer distances in float64, cast once (a bf16 slope or distance would round
    before the product); the -inf entry is the causal mask."""
    distances = torch.arange(num_distances, dtype=torch.float64, device=slopes.device)
    table = -slopes.to(torch.float64)[:, None] * distances  # [H, num_distances]
    return torch.cat((table, torch.full_like(table[:, :1], float("-inf"))), dim=1).to(dtype)


def alibi_bias(table: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
               causal: bool) -> torch.Tensor:
    """[1, H, Nq, Nk] bias -m_h |i - j| (-inf where j > i if ``causal``) looked up in an alibi_distance_table for
    integer positions; every |i - j| must be below its num_distances. Equal to computing each entry in float64 and
    casting it, at the cost of one gather per head."""
    index = query_positions[:, None] - key_positions[None, :]  # [Nq, Nk] integer distances i - j
    index = index.masked_fill_(index < 0, table.shape[1] - 1) if causal else index.abs_()
    return table[:, index].unsqueeze(0)


class ALiBiLayer(PositionalLayer):
    """Attention with the bias built per block of queries (models.blocked_bias): memory linear in N."""

    def attend(self, q, k, v, positions, causal, documents=None):
        # Slopes rebuilt here, not a buffer: model.to(bf16) would round them.
        slopes = alibi_slopes(q.shape[1]).to(q.device)
        return self.attend_with_bias(q, k, v, positions, causal, documents, slopes), positions

    def attend_cached(self, q, k, v, positions, cache):
        # positions: of every token, the cached ones first (ALiBi.decode_state); slopes copied to the device once
        keys, values = cache.extend(k, v)
        slopes = cache.constant("alibi_slopes", lambda: alibi_slopes(q.shape[1]).to(q.device))
        return self.attend_with_bias(q, keys, values, positions, True, None, slopes, past=cache.past), positions

    def attend_with_bias(self, q, k, v, positions, causal, documents, slopes, past: int = 0):
        """Attention of the queries at positions[past:] over the keys at positions (see attention_in_query_blocks)."""
        # Positions are consecutive, so every distance is below their number.
        table = alibi_distance_table(slopes, positions.shape[0], q.dtype)

        def block_bias(start, stop, num_keys):
            return alibi_bias(table, positions[start:stop], positions[:num_keys], causal)

        def document_block_bias(start, stop, num_keys):  # [B, H, R, K]: -inf across documents
            hidden = ~documents.visible(start, stop, num_keys).unsqueeze(1)
            return block_bias(start, stop, num_keys).masked_fill(hidden, float("-inf"))

        document_rows = 0 if documents is None else q.shape[0]
        bytes_per_pair = self.bias_bytes_per_pair(q.shape[1], q.element_size(), document_rows)
        return attention_in_query_blocks(q, k, v, causal, block_bias if documents is None else document_block_bias,
                                         bytes_per_pair, past=past)

    @staticmethod
    def bias_bytes_per_pair(num_heads: int, dtype_bytes: int, document_rows: int = 0) -> int:
        """Live bytes per (query, key) pair while a block's bias is built: the int64 index and its mask, the bias
        per head; in document mode (``document_rows`` = B) also per row the visibility mask, its negation and the
        masked bias per head."""
        return 9 + num_heads * dtype_bytes + document_rows * (2 + num_heads * dtype_bytes)


class ALiBi(PositionalEncoding):
    name = "alibi"
    layer_class = ALiBiLayer

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True, documents=None):
        # Integer positions [N], from which each layer builds its bias one block of queries at a time (a [1, H, N, N]
        # state made memory quadratic in N). Integers, so that an engine's cast of a block's floating-point inputs
        # to bf16 leaves them exact. Shift invariant: the offset cancels in every distance. In document mode too:
        # within a document i - j is the distance of the in-document positions, and the layers mask the rest.
        return torch.arange(offset, offset + seq_len, device=device)  # [N] int64

    def decode_state(self, batch_size, past, num_new, device, dtype, offset=0):
        # The positions of every token, cached ones included: a new query's bias spans all keys.
        return torch.arange(offset, offset + past + num_new, device=device)  # [past + n] int64
