"""FIRE: a learned per-layer bias_h(i, j) = MLP_h(psi(i - j) / psi(max(i, L~))), psi(x) = log(|c x| + 1)."""

from __future__ import annotations

import torch
from torch import nn

from tape_pretrain.models.positional.base import (
    PositionalEncoding,
    PositionalLayer,
    attention,
    causal_mask_bias,
)


class FIRELayer(PositionalLayer):
    def __init__(self, num_heads: int, width: int, init_c: float, init_threshold: float):
        super().__init__()
        self.init_c, self.threshold_scale = init_c, init_threshold
        self.c = nn.Parameter(torch.tensor(init_c))
        self.threshold = nn.Parameter(torch.tensor(1.0))  # lambda; L~ = |lambda * init_threshold|
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, num_heads))

    def reset_parameters(self):
        with torch.no_grad():
            self.c.fill_(self.init_c)
            self.threshold.fill_(1.0)
            for linear in (self.mlp[0], self.mlp[2]):
                linear.bias.zero_()

    def bias(self, positions: torch.Tensor, causal_mask: torch.Tensor | None) -> torch.Tensor:
        """[1, H, N, N] additive bias for positions [N] (float)."""
        def psi(x):
            return torch.log(torch.abs(self.c * x) + 1)

        distance = positions[:, None] - positions[None, :]
        limit = torch.maximum(positions, torch.abs(self.threshold * self.threshold_scale))
        normalised = psi(distance) / psi(limit)[:, None]
        bias = self.mlp(normalised.unsqueeze(-1)).permute(2, 0, 1)  # [H, N, N]
        if causal_mask is not None:
            bias = bias + causal_mask
        return bias.unsqueeze(0)

    def attend(self, q, k, v, state, causal):
        positions, causal_mask = state
        return attention(q, k, v, causal, bias=self.bias(positions, causal_mask)), state


class FIRE(PositionalEncoding):
    name = "fire"

    def make_layer(self, layer_idx):
        p = self.config.positional
        return FIRELayer(self.num_heads, p.fire_mlp_width, p.fire_init_c, p.fire_init_threshold)

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True):
        positions = torch.arange(seq_len, device=device, dtype=dtype)  # relative: the offset cancels
        return positions, (causal_mask_bias(seq_len, device, dtype) if causal else None)

    def extra_forward_flops_per_token(self, seq_len):
        width = self.config.positional.fire_mlp_width
        return self.config.num_layers * seq_len * 2 * width * (1 + self.num_heads)
