"""Attention with an additive positional bias (ALiBi, FIRE) built one block of queries at a time.

Shapes: B batch, H heads, N tokens, D head dim, R query rows in a block, K keys a block meets.
A whole [1, H, N, N] bias (and FIRE's MLP over N x N x width) makes memory grow as N^2. Here each block of R query
rows builds only its own [1, H, R, K] bias, runs SDPA on it and drops it. R is cut so that a block holds at most
BLOCK_BYTES, so the live extra memory is at most one block's plus the [B, H, N, D] output: bounded, then linear in
N. Causal attention skips the keys after a block's last query (K = its last row + 1). In document mode (see
models.positional_base.DocumentLayout) a block's bias also holds -inf across documents, so it is [B, H, R, K]: the
encodings' bias_bytes_per_pair then count per batch row, and blocks get fewer rows.

Under autograd the blocks' saved tensors (the bias SDPA keeps as its mask, FIRE's MLP activations, and on the CPU
the attention probabilities of SDPA's math kernel) would add up to N^2 again, so each block runs under
``torch.utils.checkpoint`` (non-reentrant): it keeps only its q, k, v slices and rebuilds the bias and the block's
attention in the backward. The price is one more forward of the bias and of the layer's attention per backward
(ALiBi, paper-155m, B = 8, N = 4096 in two blocks, bf16 on an H200: 204 ms per step against 162 ms with the whole
matrix, 167 ms with the same blocks kept for the backward). Only a sequence that fits one block of at most
KEEP_BYTES is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .positional_base import attention

BLOCK_BYTES = 512 * 2**20
"""The most a block's transient tensors take: R = BLOCK_BYTES // (K * bytes per (query, key) pair). Large, because
every block costs Python and kernel launches that a GPU's speed does not hide (paper-155m, B = 8, N = 1024, bf16,
forward and backward on an H200: ALiBi 31 ms per step with the whole matrix, 137 ms in 7 blocks, FIRE 95 ms and
477 ms in 9). The paper's model at N = 1024 runs ALiBi and FIRE in one block; blocks begin beyond that."""

KEEP_BYTES = 64 * 2**20
"""Under autograd, a sequence that fits one block of at most this many bytes is not recomputed: its saved tensors
(at most KEEP_BYTES per layer) cost less than the recomputation. ALiBi's whole [1, H, N, N] bias in bf16 at the
paper's N = 1024 and 12 heads takes 24 MiB (paper-155m, B = 8, on an H200: 42 ms per step with the whole matrix or
one kept block); FIRE's hidden layer alone takes 128 MiB there, so FIRE is recomputed."""

MIN_BLOCK_ROWS = 16
"""A block never has fewer query rows (unless N does): beyond N = BLOCK_BYTES / (16 * pair bytes) a block holds
16 * N pairs, still linear in N, rather than ever more and ever smaller kernels."""

CPU_MAX_CAUSAL_BLOCK_ROWS = 128
"""On the CPU, causal attention cuts blocks of at most this many rows even when more would fit: a block computes its
rows against the keys up to its last row only, so small blocks skip most of the masked triangle, and there a block
costs little next to its arithmetic. Tiny preset, B = 2, forward and backward, 1 thread, at N = 1024: FIRE 1.75 s
with the whole matrix, 1.58 s in one block kept for the backward, 0.68 s in blocks of 128 rows; ALiBi 0.46, 0.49
and 0.44 s. At N = 256 (2 threads), where the recomputation costs more than the skipped work saves, ALiBi takes 39,
43 and 50 ms."""


def query_block_rows(num_queries: int, num_keys: int, bytes_per_pair: int, max_rows: int | None = None) -> int:
    """Query rows per block so that a block of ``num_keys`` keys holds at most BLOCK_BYTES (but at least
    MIN_BLOCK_ROWS rows, and at most ``max_rows``), evened out over the blocks that takes."""
    rows = max(MIN_BLOCK_ROWS, BLOCK_BYTES // max(1, num_keys * bytes_per_pair))
    if max_rows is not None:
        rows = min(rows, max_rows)
    rows = max(1, min(num_queries, rows))
    num_blocks = -(-num_queries // rows)
    # Equal blocks, not full ones and a sliver: ALiBi at N = 4096 above took 315 ms per step in 3971 + 125 rows.
    return -(-num_queries // num_blocks)


def block_plan(batch: int, num_heads: int, n: int, causal: bool, bias_bytes_per_pair: int, device_type: str,
               grad: bool, num_keys: int | None = None) -> tuple[int, bool]:
    """(query rows per block, whether the blocks are recomputed in the backward) of attention_in_query_blocks for
    ``n`` queries and ``num_keys`` keys (n unless cached tokens precede the queries; also read by
    tape_pretrain.memory_plan)."""
    num_keys = n if num_keys is None else num_keys
    on_cpu = device_type == "cpu"
    pair_bytes = bias_bytes_per_pair
    if on_cpu and grad:
        # SDPA's math kernel (the CPU's when the bias needs a gradient) holds scores and probabilities in fp32 for
        # each of the B * H rows of a pair; the fused kernels (CPU flash, CUDA's) hold tiles only.
        pair_bytes += 2 * batch * num_heads * 4
    rows = query_block_rows(n, num_keys, pair_bytes, CPU_MAX_CAUSAL_BLOCK_ROWS if causal and on_cpu else None)
    recompute = grad and not (rows >= n and n * num_keys * pair_bytes <= KEEP_BYTES)
    return rows, recompute


BlockBias = Callable[[int, int, int], torch.Tensor]
"""block_bias(start, stop, num_keys) -> [1 or B, H, stop - start, num_keys]: the additive bias for queries
start..stop-1 against keys 0..num_keys-1, the causal mask (-inf) included; indices count from the sequence's first
token, cached ones included."""


def attention_in_query_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                              block_bias: BlockBias, bias_bytes_per_pair: int,
                              scale: float | None = None, past: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) @ v with the bias built per block of queries by ``block_bias``.

    q, k, v: [B, H, N, D] -> [B, H, N, D]. ``bias_bytes_per_pair``: the bytes ``block_bias`` keeps live per (query,
    key) pair while it builds a block (its temporaries and result); SDPA's scores and probabilities are added here.
    Cached decoding (``past`` > 0, causal only): q [B, H, n, D] holds the tokens past .. past + n - 1 and k, v
    [B, H, past + n, D] every token; the output is [B, H, n, D].
    """
    b, h, n, _ = q.shape
    assert causal or past == 0, "cached decoding is causal"
    rows, recompute = block_plan(b, h, n, causal, bias_bytes_per_pair, q.device.type, torch.is_grad_enabled(),
                                 num_keys=past + n)
    one_block = rows >= n
    # Every block adds its share to the gradients of k and v, which in bf16 round once per block: against fp32, dk
    # and dv came out 5-15 % (causal) and up to 25 % (bidirectional, 6 blocks) less accurate than from one call.
    # Slicing fp32 copies would sum them in fp32, but the blocks would keep the copies for the backward: 8 B N d
    # bytes more per layer.
    outs = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        num_keys = past + stop if causal else n
        args = (block_bias, past + start, past + stop, scale, q[:, :, start:stop], k[:, :, :num_keys],
                v[:, :, :num_keys])
        if recompute:
            outs.append(checkpoint(_attend_block, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(_attend_block(*args))
    return outs[0] if one_block else torch.cat(outs, dim=2)  # [B, H, N, D]


def _attend_block(block_bias: BlockBias, start: int, stop: int, scale: float | None, q, k, v) -> torch.Tensor:
    return attention(q, k, v, causal=False, bias=block_bias(start, stop, k.shape[-2]), scale=scale)
