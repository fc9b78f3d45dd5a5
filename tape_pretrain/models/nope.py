"""NoPE: the causal mask is the only source of order."""

from __future__ import annotations

from .positional_base import (
    PositionalEncoding,
    PositionalLayer,
    attention,
    attention_after,
)


class NoPELayer(PositionalLayer):
    def attend(self, q, k, v, state, causal, documents=None):
        return attention(q, k, v, causal, documents=documents), state

    def attend_cached(self, q, k, v, state, cache):
        keys, values = cache.extend(k, v)
        return attention_after(q, keys, values, cache.past), state


class NoPE(PositionalEncoding):
    name = "nope"
    layer_class = NoPELayer
