"""What every positional encoding provides, and the helpers they share.

Shapes: B batch, H heads, N tokens, D head dim, F = D/2 rotary frequencies.
An encoding is one model-level module (builds the initial positional *state*) plus one layer
module per block (uses the state in attention and may update it). The decoder block never
branches on the variant: it hands the state to its layer module and takes back the new one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tape_pretrain.config import ModelConfig

State = Any  # each encoding's own state: None, a tensor or a tuple of tensors


def rotary_frequencies(head_dim: int, base: float, device=None) -> torch.Tensor:
    """theta_f = base^(-2f/D) for f < D/2, in float64.

    Encodings build their constants in ``initial_state`` rather than holding them as buffers: a buffer is cast by
    ``model.to(torch.bfloat16)`` or an engine's ``module.bfloat16()``, which rounds theta by up to 0.4 % (about
    2.8 rad of phase at position 1023)."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


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


def attention(q, k, v, causal: bool, bias: torch.Tensor | None = None, scale: float | None = None):
    """Scaled dot-product attention; an additive bias (which already holds the causal mask) or is_causal."""
    if bias is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    return gradient_in_output_layout(out)  # a function of this module: tests route every call through it


def causal_mask_bias(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """[N, N] additive mask: 0 on and below the diagonal, -inf above."""
    return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu(1)


class PositionalLayer(nn.Module):
    """The per-block part of an encoding: attention with the state, then an optional state update."""

    def attend(self, q, k, v, state: State, causal: bool) -> tuple[torch.Tensor, State]:  # q,k,v: [B,H,N,D]
        raise NotImplementedError

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
                      causal: bool = True) -> State:
        """The state entering layer 0 for positions offset .. offset+seq_len-1."""
        return None

    def extra_forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token beyond a NoPE Llama (matmul-dominated terms only)."""
        return 0.0
