"""FIRE: a learned per-layer bias_h(i, j) = MLP_h(psi(i - j) / (psi(max(i, L~)) + eps)), psi(x) = log(|c x| + 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tape_pretrain.models.positional.base import (
    PositionalEncoding,
    PositionalLayer,
    attention,
    causal_mask_bias,
)

NORMALISER_EPS = 1e-6
"""The official FIRE code's epsilon in the normaliser: keeps psi(max(i, L~)) away from 0 when c or L~ reach 0."""


class FIRELayer(PositionalLayer):
    def __init__(self, num_heads: int, width: int, init_c: float, init_threshold: float):
        super().__init__()
        self.init_c, self.threshold_scale = init_c, init_threshold
        # One-element vectors, not 0-dim scalars: FSDP2 cannot shard a scalar parameter and DeepSpeed cannot
        # broadcast one (both fail at start-up).
        self.c = nn.Parameter(torch.tensor([init_c]))
        self.threshold = nn.Parameter(torch.tensor([1.0]))  # lambda; L~ = |lambda * init_threshold|
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, num_heads))

    def initial_value(self, name, shape):
        if name == "c":
            return torch.full(shape, self.init_c)
        if name == "threshold":
            return torch.ones(shape)
        return None  # the MLP: normal weights, zero biases (the model-wide rule)

    def bias(self, positions: torch.Tensor, causal_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """[1, H, N, N] additive bias of ``dtype`` for integer positions [N].

        Distances, the normaliser and the MLP run in fp32 (fp64 in an fp64 model) whatever the parameters' dtype
        (bf16 under the engines' mixed precision): in bf16 only 513 of the positions 0..1023 are distinct. Only
        the bias is cast.
        """
        work = torch.promote_types(self.c.dtype, torch.float32)
        c, threshold = self.c.to(work), self.threshold.to(work)

        def psi(x):
            return torch.log(torch.abs(c * x) + 1)

        distance = (positions[:, None] - positions[None, :]).to(work)  # exact: integers below 2^24
        limit = torch.maximum(positions.to(work), torch.abs(threshold * self.threshold_scale))  # max(i, L~)
        normalised = psi(distance) / (psi(limit)[:, None] + NORMALISER_EPS)  # [N, N]
        first, second = self.mlp[0], self.mlp[2]
        hidden = F.relu(F.linear(normalised.unsqueeze(-1), first.weight.to(work), first.bias.to(work)))
        bias = F.linear(hidden, second.weight.to(work), second.bias.to(work)).permute(2, 0, 1)  # [H, N, N]
        bias = bias.to(dtype)
        if causal_mask is not None:
            bias = bias + causal_mask
        return bias.unsqueeze(0)

    def attend(self, q, k, v, state, causal):
        positions, causal_mask = state
        return attention(q, k, v, causal, bias=self.bias(positions, causal_mask, q.dtype)), state


class FIRE(PositionalEncoding):
    name = "fire"

    def make_layer(self, layer_idx):
        p = self.config.positional
        return FIRELayer(self.num_heads, p.fire_mlp_width, p.fire_init_c, p.fire_init_threshold)

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True):
        # Integer positions: an engine casts floating-point block inputs to the compute dtype (FSDP2's
        # cast_forward_inputs), which would round them. FIRE is relative only below L~: psi(max(i, L~)) depends on
        # the absolute query position i once i exceeds L~, so the offset is applied, not dropped.
        positions = torch.arange(offset, offset + seq_len, device=device)  # [N] int64
        return positions, (causal_mask_bias(seq_len, device, dtype) if causal else None)

    def extra_forward_flops_per_token(self, seq_len):
        width = self.config.positional.fire_mlp_width
        return self.config.num_layers * seq_len * 2 * width * (1 + self.num_heads)
