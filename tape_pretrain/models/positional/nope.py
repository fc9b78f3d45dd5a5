"""NoPE: the causal mask is the only source of order."""

from __future__ import annotations

from tape_pretrain.models.positional.base import PositionalEncoding, PositionalLayer, attention


class NoPELayer(PositionalLayer):
    def attend(self, q, k, v, state, causal, documents=None):
        return attention(q, k, v, causal, documents=documents), state


class NoPE(PositionalEncoding):
    name = "nope"
    layer_class = NoPELayer
