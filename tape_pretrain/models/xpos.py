"""xPos: RoPE with a per-frequency exponential decay, q scaled by zeta^(n/s) and k by zeta^(-n/s)."""

from __future__ import annotations

import torch

from .positional_base import (
    PositionalEncoding,
    PositionalLayer,
    apply_rotary,
    attention,
    attention_after,
    rotary_frequencies,
)


class XPosLayer(PositionalLayer):
    def attend(self, q, k, v, state, causal, documents=None):
        cos_q, sin_q, cos_k, sin_k = state
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
        return attention(q, k, v, causal, documents=documents), state

    def attend_cached(self, q, k, v, state, cache):
        cos_q, sin_q, cos_k, sin_k = state  # the new tokens' tables
        keys, values = cache.extend(apply_rotary(k, cos_k, sin_k), v)  # rotated and scaled by zeta^(-n/s)
        return attention_after(apply_rotary(q, cos_q, sin_q), keys, values, cache.past), state


class XPos(PositionalEncoding):
    name = "xpos"
    layer_class = XPosLayer

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True, documents=None):
        # A per-frequency scale commutes with the rotation of its (f, f+F) pair, so it folds into the tables.
        # Everything in float64 from integer positions; only the four tables are cast.
        d = self.head_dim
        theta = rotary_frequencies(d, self.config.positional.rope_base, device, self.config.positional.interpolation)
        zeta = (torch.arange(0, d, 2, dtype=torch.float64, device=device) + 0.4 * d) / (1.4 * d)  # (2f+0.4D)/1.4D
        if documents is None:
            positions = torch.arange(offset, offset + seq_len, device=device).unsqueeze(0)  # [1, N]
        else:
            positions = documents.positions + offset  # [B, N]: each token's position in its document
        n = positions.to(torch.float64).unsqueeze(-1)
        angles = n * theta
        scale = zeta ** (n / self.config.positional.xpos_scale_base)  # [1 or B, N, F]
        cos, sin = angles.cos(), angles.sin()
        tables = (cos * scale, sin * scale, cos / scale, sin / scale)
        return tuple(t.to(dtype).unsqueeze(1) for t in tables)  # each [1 or B, 1, N, F]
