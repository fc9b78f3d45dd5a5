"""RoPE: rotate-half rotary embedding, positions 0..N-1 (Hugging Face Llama layout); in document mode each
token's position in its document."""

from __future__ import annotations

import torch

from .positional_base import (
    DocumentLayout,
    PositionalEncoding,
    PositionalLayer,
    apply_rotary,
    attention,
    attention_after,
    rotary_frequencies,
    rotary_tables,
)


class RotaryLayer(PositionalLayer):
    """Attention with fixed rotary tables; the state (cos, sin) is [1 or B, 1, N, F] and never changes."""

    def attend(self, q, k, v, state, causal, documents=None):
        cos, sin = state
        return attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, causal, documents=documents), state

    def attend_cached(self, q, k, v, state, cache):
        cos, sin = state  # the new tokens' tables
        keys, values = cache.extend(apply_rotary(k, cos, sin), v)  # rotated keys: final once computed
        return attention_after(apply_rotary(q, cos, sin), keys, values, cache.past), state


class RoPE(PositionalEncoding):
    name = "rope"
    layer_class = RotaryLayer

    def positions(self, batch_size: int, seq_len: int, device, offset: int,
                  documents: DocumentLayout | None = None) -> torch.Tensor:
        """Positions for the rotary tables: [1, N] shared by every row, or with ``documents`` [B, N], each token's
        position in its document (RandPE overrides)."""
        if documents is not None:
            return documents.positions + offset
        return torch.arange(offset, offset + seq_len, device=device).unsqueeze(0)

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True, documents=None):
        return self.tables(self.positions(batch_size, seq_len, device, offset, documents), dtype)

    def tables(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The state (cos, sin), each [1 or B, 1, N, F], of integer positions [1 or B, N]."""
        theta = rotary_frequencies(self.head_dim, self.config.positional.rope_base, positions.device,
                                   self.config.positional.interpolation)
        cos, sin = rotary_tables(positions, theta, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [1 or B, 1, N, F]
