"""ALiBi: a per-head linear distance penalty -m_h (i - j) added to the logits."""

from __future__ import annotations

import math

import torch

from tape_pretrain.models.positional.base import PositionalEncoding, PositionalLayer, attention


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


class ALiBiLayer(PositionalLayer):
    def attend(self, q, k, v, state, causal):
        return attention(q, k, v, causal, bias=state), state


class ALiBi(PositionalEncoding):
    name = "alibi"
    layer_class = ALiBiLayer

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True):
        # Shift invariant by construction, so the offset does not enter. The state is the bias itself, built in
        # float64 from integer distances once per forward and shared by every layer: [1, H, N, N].
        n = torch.arange(seq_len, device=device)
        distance = n[:, None] - n[None, :]
        slopes = alibi_slopes(self.num_heads).to(device)
        bias = -slopes[:, None, None] * distance.abs().to(torch.float64)
        bias = bias.masked_fill(distance < 0, float("-inf")) if causal else bias
        return bias.to(dtype).unsqueeze(0)
