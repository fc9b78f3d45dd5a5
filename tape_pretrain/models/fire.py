"""FIRE: a learned per-layer bias_h(i, j) = MLP_h(psi(i - j) / (psi(max(i, L~)) + eps)), psi(x) = log(|c x| + 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocked_bias import attention_in_query_blocks
from .positional_base import PositionalEncoding, PositionalLayer

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

    def bias(self, positions: torch.Tensor, key_positions: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32, causal: bool = False) -> torch.Tensor:
        """[1, H, Nq, Nk] additive bias of ``dtype`` for integer query positions [Nq] and key positions [Nk] (the
        query positions when None); -inf where the key comes after the query if ``causal``.

        Distances, the normaliser and the MLP run in fp32 (fp64 in an fp64 model) whatever the parameters' dtype
        (bf16 under the engines' mixed precision): in bf16 only 513 of the positions 0..1023 are distinct. Only
        the bias is cast.
        """
        key_positions = positions if key_positions is None else key_positions
        return self._bias(self._work_parameters(), positions, key_positions, dtype, causal)

    def _work_parameters(self) -> tuple[torch.Tensor, ...]:
        """c, lambda and the MLP's weights in the work dtype: fp32, or fp64 in an fp64 model."""
        work = torch.promote_types(self.c.dtype, torch.float32)
        first, second = self.mlp[0], self.mlp[2]
        return tuple(p.to(work) for p in (self.c, self.threshold, first.weight, first.bias, second.weight,
                                          second.bias))

    def _bias(self, parameters, positions, key_positions, dtype, causal, visible=None) -> torch.Tensor:
        """[1, H, Nq, Nk] for positions [Nq], [Nk]; in document mode [B, H, Nq, Nk] for each row's in-document
        positions [B, Nq], [B, Nk], -inf where ``visible`` [B, Nq, Nk] is False (the causal mask included)."""
        c, threshold, first_weight, first_bias, second_weight, second_bias = parameters
        work = c.dtype

        def psi(x):
            return torch.log(torch.abs(c * x) + 1)

        distance = (positions[..., :, None] - key_positions[..., None, :]).to(work)  # exact: integers below 2^24
        limit = torch.maximum(positions.to(work), torch.abs(threshold * self.threshold_scale))  # max(i, L~)
        normalised = psi(distance) / (psi(limit)[..., None] + NORMALISER_EPS)  # [(B,) Nq, Nk]
        # ReLU in place (the first linear's backward needs its input, not its output) on the 2D matmul result: on a
        # view of it, autograd would copy the whole hidden layer back in the backward.
        hidden = F.relu(F.linear(normalised.reshape(-1, 1), first_weight, first_bias), inplace=True)  # [.. * Nk, W]
        bias = F.linear(hidden, second_weight, second_bias)  # [(B *) Nq * Nk, H]
        bias = bias.view(*normalised.shape, -1).movedim(-1, -3).to(dtype)  # [(B,) H, Nq, Nk]
        if visible is not None:
            return bias.masked_fill(~visible.unsqueeze(1), float("-inf"))
        if causal:
            bias = bias.masked_fill(distance < 0, float("-inf"))
        return bias.unsqueeze(0)

    def attend(self, q, k, v, positions, causal, documents=None):
        return self.attend_with_bias(q, k, v, positions, causal, documents), positions

    def attend_cached(self, q, k, v, positions, cache):
        # positions: of every token, the cached ones first (FIRE.decode_state); the queries are positions[past:]
        keys, values = cache.extend(k, v)
        return self.attend_with_bias(q, keys, values, positions, True, past=cache.past), positions

    def attend_with_bias(self, q, k, v, positions, causal, documents=None, past: int = 0):
        """Attention of the queries at positions[past:] over the keys at positions (see attention_in_query_blocks)."""
        # Cast once for all blocks: a bf16 parameter's gradient then sums the blocks' shares in fp32 and rounds once.
        parameters = self._work_parameters()

        def block_bias(start, stop, num_keys):
            visible = None if documents is None else documents.visible(start, stop, num_keys)
            return self._bias(parameters, positions[..., start:stop], positions[..., :num_keys], q.dtype, causal,
                              visible)

        document_rows = 0 if documents is None else q.shape[0]
        bytes_per_pair = self.bias_bytes_per_pair(q.shape[1], q.element_size(), parameters[0].element_size(),
                                                  document_rows)
        return attention_in_query_blocks(q, k, v, causal, block_bias, bytes_per_pair, past=past)

    def bias_bytes_per_pair(self, num_heads: int, dtype_bytes: int, work_bytes: int, document_rows: int = 0) -> int:
        """Live bytes per (query, key) pair while a block's bias is built, in the work dtype: the distance, psi's
        temporaries and the normalised distance; the MLP's hidden layer (and its gradient in the backward) and its
        output per head; then per head the cast and the masked bias. In document mode (``document_rows`` = B) the
        normaliser differs per row, so all of it is per row, plus the visibility mask and its negation."""
        width = self.mlp[0].out_features
        per_row = work_bytes * (4 + 2 * width + num_heads) + 2 * num_heads * dtype_bytes
        return max(1, document_rows) * per_row + 2 * document_rows


class FIRE(PositionalEncoding):
    name = "fire"

    def make_layer(self, layer_idx):
        p = self.config.positional
        return FIRELayer(self.num_heads, p.fire_mlp_width, p.fire_init_c, p.fire_init_threshold)

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True, documents=None):
        # Integer positions: an engine casts floating-point block inputs to the compute dtype (FSDP2's
        # cast_forward_inputs), which would round them. FIRE is relative only below L~: psi(max(i, L~)) depends on
        # the absolute query position i once i exceeds L~, so the offset is applied, not dropped; in document mode
        # i is the query's position in its document.
        # Each layer builds its bias one block of queries at a time from these (models.blocked_bias): a
        # [N, N] causal mask in the state made memory quadratic in N.
        if documents is not None:
            return documents.positions + offset  # [B, N] int64
        return torch.arange(offset, offset + seq_len, device=device)  # [N] int64

    def decode_state(self, batch_size, past, num_new, device, dtype, offset=0):
        # The positions of every token, cached ones included: a new query's bias spans all keys, and its normaliser
        # psi(max(i, L~)) reads its absolute position offset + past + j.
        return torch.arange(offset, offset + past + num_new, device=device)  # [past + n] int64

    def extra_forward_flops_per_token(self, seq_len):
        width = self.config.positional.fire_mlp_width
        return self.config.num_layers * seq_len * 2 * width * (1 + self.num_heads)
