"""The decoding cache: what a causal forward keeps per layer so that later tokens attend to earlier ones without
recomputing them.

Legend: B batch, H heads, L cached tokens, n new tokens, C capacity (>= L + n), D head dim, F = D / 2.

``cache = model.new_cache()``, then ``logits = model(input_ids, cache=cache)`` for each chunk of new tokens (the
prompt, then one token per step): the new tokens take positions position_offset + cache.length ..., attend to every
cached token and causally to each other, are appended, and only their logits come back (``logits_for="last"``: only
the last one's). Causality makes a past token's keys, values and positional state final, so the cached forward gives
the uncached forward's logits (to rounding) for every encoding whose positions do not depend on the total length.

What each layer holds (every tensor [B, H, C, width], filled up to cache.length):

- RoPE, xPos, RandPE: the rotated keys and the values (xPos: the keys scaled by zeta^(-n/s) too).
- ALiBi, FIRE: keys and values; the layers rebuild the bias of the new queries (positions L .. L+n-1, FIRE's
  normaliser at the query's absolute position) against keys 0 .. L+n-1 from integer positions.
- NoPE: keys and values.
- TAPE: the rotated keys, and [v | c | s]: the values with the state Z = c + i s that entered the layer (a new token's
  attention-side update A @ [c|s] reads the layer-input state of every key, cached or new); 3D wide per token, 1.5x
  a RoPE cache (TAPE.md section 4). Layers that do not update the state in attention (the last one, whose update is
  never read, or tape_attention_update=false) keep only keys and values. The MLP-side update is per token: nothing
  of it is cached.

RandPE (models.randrope): eval-mode ``sample`` draws the positions of all N tokens anew for each length N,
so a prefix's positions change as the sequence grows, and training mode draws them per forward: neither can be
cached, and model.new_cache() refuses both with an error. Eval-mode ``expected`` positions floor(i R / N) are those of
a prefix whenever randrope_max_len / max_seq_len is an integer r (then r i) or at most 1 (then i): the cache takes
them, and refuses the other ratios. TAPE with tape_random_offset in training mode is refused likewise (a new offset
per forward). Transformer.cache_refusal() says why, or None; greedy generation then recomputes the prefix instead.

Storage grows geometrically (capacity doubles when full; ``new_cache(max_length)`` preallocates), in the dtype and on
the device of the keys and values the model computes: appending is a copy of the new tokens, never a concatenation
of the whole past. The cache is for inference: run it under torch.no_grad() or torch.inference_mode().
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LayerCache:
    """One layer's cached tensors: entries [B, H, C, width_i], the first ``past`` tokens of each filled."""

    def __init__(self, owner: DecodeCache):
        self.owner = owner
        self.buffers: list[torch.Tensor] = []

    @property
    def past(self) -> int:
        """Tokens cached before the current forward: the new tokens sit at past, past + 1, ..."""
        return self.owner.length

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[-2] if self.buffers else 0

    def extend(self, *entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write each entry [B, H, n, width_i] of the new tokens at positions past .. past + n - 1, and return every
        entry of all past + n tokens: views [B, H, past + n, width_i] of the storage."""
        past, n = self.past, entries[0].shape[-2]
        end = past + n
        if not self.buffers:
            capacity = max(end, self.owner.max_length)
            self.buffers = [e.new_empty(*e.shape[:-2], capacity, e.shape[-1]) for e in entries]
        elif end > self.capacity:  # doubling: amortised O(1) copies per token, not O(L) per step
            capacity = max(end, 2 * self.capacity)
            grown = [b.new_empty(*b.shape[:-2], capacity, b.shape[-1]) for b in self.buffers]
            for new, old in zip(grown, self.buffers):
                new[..., :past, :].copy_(old[..., :past, :])
            self.buffers = grown
        assert [b.shape[-1] for b in self.buffers] == [e.shape[-1] for e in entries], "entries changed between calls"
        for buffer, entry in zip(self.buffers, entries):
            buffer[..., past:end, :].copy_(entry)
        return tuple(buffer[..., :end, :] for buffer in self.buffers)

    def constant(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor built once per cache and shared by every layer (e.g. ALiBi's slopes on the device: building them
        from Python numbers each step would copy host to device, a synchronisation per layer and token)."""
        constants = self.owner.constants
        if name not in constants:
            constants[name] = make()
        return constants[name]


class DecodeCache:
    """Every layer's LayerCache and the number of tokens they hold (see the module docstring).

    Built by Transformer.new_cache(); Transformer.forward(..., cache=cache) fills and reads it."""

    is_compileable = False  # read by transformers' generate when a cache is passed in (Hugging Face exports)

    def __init__(self, num_layers: int, max_length: int = 0):
        self.length = 0
        """Tokens cached so far: the next forward's tokens take positions position_offset + length ..."""
        self.max_length = max_length
        """Capacity to preallocate on first use (0: as long as the first chunk; then doubling)."""
        self.batch_size: int | None = None
        self.position_offset: int | None = None
        self.layers = [LayerCache(self) for _ in range(num_layers)]
        self.constants: dict[str, torch.Tensor] = {}

    def start_forward(self, batch_size: int, position_offset: int) -> int:
        """Check a forward's batch size and position offset against the earlier ones; returns the cached length."""
        if self.batch_size is None:
            self.batch_size, self.position_offset = batch_size, position_offset
        if batch_size != self.batch_size:
            raise ValueError(f"this cache holds {self.batch_size} sequences, the input has {batch_size} rows: give "
                             "each forward all rows of the batch the cache was started with")
        if position_offset != self.position_offset:
            raise ValueError(f"position_offset={position_offset}, but this cache started at position_offset="
                             f"{self.position_offset}: it is the position of the cache's first token, the same in "
                             "every forward (new tokens follow at position_offset + cache.length)")
        return self.length

    def advance(self, num_new: int) -> None:
        """Count the tokens every layer has just appended."""
        self.length += num_new

    def num_bytes(self) -> int:
        """Bytes of storage held (capacity, not only the filled part)."""
        return sum(b.numel() * b.element_size() for layer in self.layers for b in layer.buffers)
