"""What every positional encoding provides, and the helpers they share.

Shapes: B batch, H heads, N tokens, D head dim, F = D/2 rotary frequencies.
An encoding is one model-level module (builds the initial positional *state*) plus one layer
module per block (uses the state in attention and may update it). The decoder block never
branches on the variant: it hands the state to its layer module and takes back the new one.

Document mode (``Transformer.forward(..., document_ids=...)``): a row packs several documents. A DocumentLayout,
built once per forward, holds where each token's document starts; every encoding then restarts its positions at 0
at each document start, and attention is block-causal (a query sees the keys of its own document at or before it).

Cached decoding (tape_pretrain.models.cache): the model builds the new tokens' state with ``decode_state``, and each
layer's ``attend_cached`` appends what later tokens need to its LayerCache and attends over every cached token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .model_config import ModelConfig

if TYPE_CHECKING:
    from .cache import LayerCache

State = Any  # each encoding's own state: None, a tensor or a tuple of tensors


def rotary_frequencies(head_dim: int, base: float, device=None, interpolation: float = 1.0) -> torch.Tensor:
    """theta_f = base^(-2f/D) / interpolation for f < D/2, in float64: angles n theta_f are those of position
    n / interpolation (linear position interpolation; exactly the plain frequencies at 1).

    Encodings build their constants in ``initial_state`` rather than holding them as buffers: a buffer is cast by
    ``model.to(torch.bfloat16)`` or an engine's ``module.bfloat16()``, which rounds theta by up to 0.4 % (about
    2.8 rad of phase at position 1023)."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim) / interpolation


def rotary_tables(positions: torch.Tensor, theta: torch.Tensor, dtype: torch.dtype):
    """cos and sin of integer positions x theta, in float64 before the cast (fp32 angles drift at large t).

    positions: [..., N] integers; theta: [F] float64; returns two [..., N, F] tensors of ``dtype``.
    """
    if positions.is_floating_point() or theta.dtype != torch.float64:
        raise TypeError("rotary_tables needs integer positions and float64 frequencies (bf16 rounds both)")
    angles = positions.to(torch.float64).unsqueeze(-1) * theta.to(positions.device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary: (u1 c - u2 s, u2 c + u1 s) with u1, u2 the two halves of the last dim."""
    u1, u2 = u.chunk(2, dim=-1)
    return torch.cat((u1 * cos - u2 * sin, u2 * cos + u1 * sin), dim=-1)


class _GradientInOutputLayout(torch.autograd.Function):
    """Identity whose backward hands the gradient on in the memory layout of the forward output.

    cuDNN's SDPA backward reads d(out) with the strides of out: with torch 2.11 / cuDNN 9.19 on an H200, a d(out)
    laid out otherwise (the model's ``out.transpose(1, 2).reshape(...)`` gives [B,N,H,D] strides to a [B,H,N,D]
    output) produced gradients 130-180 % off on dq, dk and dv, and RoPE's gradient norm 36 % low, with no error.
    One copy of d(out) in that case, none otherwise."""

    @staticmethod
    def forward(ctx, out):
        ctx.out_stride = out.stride()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        if grad.stride() == ctx.out_stride:
            return grad
        return torch.empty_strided(grad.shape, ctx.out_stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def needs_gradient_layout(out: torch.Tensor) -> bool:
    """Whether ``out``'s gradient must be handed on in out's layout: on CUDA, where cuDNN's kernel may run (the CPU
    kernels read any layout, so the copy is saved there)."""
    return out.requires_grad and out.is_cuda


def gradient_in_output_layout(out: torch.Tensor) -> torch.Tensor:
    """``out``, whose gradient reaches the attention kernel in out's own layout (see _GradientInOutputLayout)."""
    if not needs_gradient_layout(out):
        return out
    return _GradientInOutputLayout.apply(out)


def allow_cudnn_attention(allowed: bool) -> None:
    """Whether SDPA may choose cuDNN's attention kernel in this process (trainer.cudnn_attention; the other fused
    kernels and the math kernel stay available). A no-op without CUDA."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(allowed)


FLEX_BLOCK_SIZE = 128
"""Query and key rows per tile of FlexAttention's block mask (FlexAttention's default)."""


@dataclass(eq=False)
class DocumentLayout:
    """The documents packed in a micro-batch: tokens of one document are contiguous in a row.

    A document starts where a token's document id differs from its left neighbour's, and at the row start (a
    document continued from the previous window starts at 0 there too): only equality between neighbours matters.
    Built once per forward by Transformer.forward and handed to the encoding's initial_state and to every layer's
    attend; the masks are built on first use and shared by all layers."""

    document_ids: torch.Tensor  # [B, N] integers
    starts: torch.Tensor  # [B, N] int64: the index in the row of the first token of each token's document
    positions: torch.Tensor  # [B, N] int64: each token's position in its document (index - start)

    @classmethod
    def from_ids(cls, document_ids: torch.Tensor) -> DocumentLayout:
        if document_ids.dim() != 2 or document_ids.is_floating_point() or document_ids.is_complex():
            raise ValueError(f"document_ids must be an integer tensor [batch, tokens], got {document_ids.dtype} "
                             f"{list(document_ids.shape)}")
        index = torch.arange(document_ids.shape[1], device=document_ids.device)
        first = torch.ones_like(document_ids, dtype=torch.bool)
        first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        starts = torch.where(first, index, 0).cummax(dim=1).values  # [B, N]
        return cls(document_ids, starts, index - starts)

    def visible(self, start: int, stop: int, num_keys: int) -> torch.Tensor:
        """[B, stop - start, num_keys] bool: whether query i (start <= i < stop) sees key j < num_keys, i.e. the key
        lies in the query's document at or before it: starts[i] <= j <= i."""
        queries = torch.arange(start, stop, device=self.starts.device)[:, None]  # [R, 1]
        keys = torch.arange(num_keys, device=self.starts.device)  # [K]
        return (keys <= queries) & (keys >= self.starts[:, start:stop, None])

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[B, 1, N, N] bool, the block-diagonal causal mask for SDPA (quadratic in N: the CPU's kernel)."""
        n = self.starts.shape[1]
        return self.visible(0, n, n).unsqueeze(1)

    @functools.cached_property
    def block_mask(self) -> BlockMask:
        """FlexAttention's block mask, built from the document starts tile by tile (B x (N / 128)^2 entries; the
        generic create_block_mask would evaluate all B x N^2 pairs)."""
        return document_block_mask(self.starts)


def document_block_mask(starts: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """The BlockMask of the mask_mod ``starts[b, q] <= kv <= q`` for document starts [B, N], equal to
    ``create_block_mask(mask_mod, B, None, N, N, BLOCK_SIZE=block_size)`` (tests check it).

    Tile (query block qb, key block kb) is empty unless kb <= qb and kb ends at or after the first query's document
    start (starts only grow along a row); full (no mask_mod needed) when kb < qb, kb begins at or after the last
    query's document start, and the query block lies wholly inside the row."""
    b, n = starts.shape
    num_blocks = -(-n // block_size)
    blocks = torch.arange(num_blocks, device=starts.device)
    first_start = starts[:, blocks * block_size]  # [B, nq]: the smallest start in each query block
    last_start = starts[:, (blocks * block_size + block_size - 1).clamp(max=n - 1)]  # [B, nq]: the largest
    # Rows past N (the last block's padding) see only themselves, should the kernel evaluate the mask there.
    padding = torch.arange(n, num_blocks * block_size, device=starts.device)
    starts = torch.cat((starts, padding.expand(b, -1)), dim=1)  # [B, nq * block_size]
    query_block, key_block = blocks[:, None], blocks[None, :]  # [nq, 1], [1, nkv]
    below = key_block < query_block
    nonempty = (key_block <= query_block) & ((key_block + 1) * block_size - 1 >= first_start[:, :, None])
    whole_rows = (query_block + 1) * block_size <= n
    full = below & whole_rows & (key_block * block_size >= last_start[:, :, None])  # [B, nq, nkv]
    partial = nonempty & ~full

    def ordered(dense):  # per query block: how many key blocks, and their indices first in increasing order
        dense = dense.unsqueeze(1).to(torch.int32)  # [B, 1, nq, nkv]
        order = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), order.to(torch.int32)

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= starts[batch, q_idx])

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def document_attention_kernel(device_type: str) -> str:
    """The kernel of document-mode attention without a bias on ``device_type``: "flex" on CUDA (FlexAttention with
    the layout's block mask: memory linear in N, the masked tiles skipped), "sdpa" elsewhere (SDPA with the boolean
    [B, 1, N, N] mask; FlexAttention has no CPU backward in torch 2.13)."""
    return "flex" if device_type == "cuda" else "sdpa"


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process, on first use (uncompiled, it materialises every score)."""
    return torch.compile(flex_attention)


def attention(q, k, v, causal: bool, bias: torch.Tensor | None = None, scale: float | None = None,
              documents: DocumentLayout | None = None):
    """Scaled dot-product attention; an additive bias (which already holds the causal mask) or is_causal; with
    ``documents`` (and no bias), block-causal within each document on document_attention_kernel's kernel."""
    if documents is not None and bias is None:
        assert causal, "document mode is causal"
        if document_attention_kernel(q.device.type) == "flex":
            out = compiled_flex_attention()(q, k, v, block_mask=documents.block_mask, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.mask, scale=scale)
    elif bias is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    return gradient_in_output_layout(out)  # a function of this module: tests route every call through it


def attention_after(q, k, v, past: int, scale: float | None = None):
    """Causal attention of cached decoding: n new queries [B, H, n, D] at positions past .. past + n - 1 over the
    keys and values of all past + n tokens [B, H, past + n, *]; query i sees keys 0 .. past + i.

    SDPA's is_causal aligns its mask top-left when n != past + n, so a chunk after cached tokens gets an explicit mask
    (none for a single query, which sees every key). A first chunk (past = 0) runs as the uncached forward."""
    n = q.shape[-2]
    if past == 0:
        return attention(q, k, v, causal=True, scale=scale)
    mask = None if n == 1 else torch.ones(n, past + n, dtype=torch.bool, device=q.device).tril(past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def causal_mask_bias(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """[N, N] additive mask: 0 on and below the diagonal, -inf above."""
    return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu(1)


class PositionalLayer(nn.Module):
    """The per-block part of an encoding: attention with the state, then an optional state update."""

    def attend(self, q, k, v, state: State, causal: bool,
               documents: DocumentLayout | None = None) -> tuple[torch.Tensor, State]:  # q,k,v: [B,H,N,D]
        """Attention with the state (causal, or bidirectional); with ``documents``, block-causal per document."""
        raise NotImplementedError

    def attend_cached(self, q, k, v, state: State, cache: LayerCache) -> tuple[torch.Tensor, State]:
        """Cached decoding (models.cache): attention of the new tokens' q, k, v [B,H,n,D] at positions cache.past ..
        over every cached token and causally over themselves, after appending what later tokens need to ``cache``;
        ``state`` is the encoding's decode_state, as the layers hand it on."""
        raise NotImplementedError(f"{type(self).__name__} has no cached decoding")

    def after_mlp(self, mlp_out: torch.Tensor, state: State) -> State:  # mlp_out: [B,N,d]
        return state

    def initial_value(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        """The initial fp32 value of this layer's parameter ``name`` (relative to the layer), or None for the
        model-wide rule (normal weights, zero biases). Override where the encoding's init differs."""
        return None


class PositionalEncoding(nn.Module):
    """The model-level part of an encoding: the initial state and a layer module per block."""

    name: ClassVar[str]
    layer_class: ClassVar[type[PositionalLayer]]

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads

    def make_layer(self, layer_idx: int) -> PositionalLayer:
        return self.layer_class()

    def initial_state(self, batch_size: int, seq_len: int, device, dtype, offset: int = 0,
                      causal: bool = True, documents: DocumentLayout | None = None) -> State:
        """The state entering layer 0 for positions offset .. offset+seq_len-1; with ``documents``, for each token's
        position in its document plus offset."""
        return None

    def decode_state(self, batch_size: int, past: int, num_new: int, device, dtype, offset: int = 0) -> State:
        """The state entering layer 0 in cached decoding for ``num_new`` tokens after ``past`` cached ones (positions
        offset + past ..): the initial state of those tokens, unless an encoding's layers need more (ALiBi, FIRE)."""
        return self.initial_state(batch_size, num_new, device, dtype, offset=offset + past)

    def cache_refusal(self) -> str | None:
        """Why cached decoding would not reproduce the uncached forward in this encoding's current mode, or None
        when it does."""
        return None

    def extra_forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token beyond a NoPE Llama (matmul-dominated terms only)."""
        return 0.0
