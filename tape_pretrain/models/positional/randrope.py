"""RandPE (randomised RoPE): during training, each row uses a sorted random subset of N distinct
positions from [0, max_len), resampled every forward; in eval it uses 0..N-1."""

from __future__ import annotations

import torch

from tape_pretrain.config import ConfigError
from tape_pretrain.models.positional.rope import RoPE


class RandRoPE(RoPE):
    name = "randrope"

    def __init__(self, config):
        super().__init__(config)
        self.max_len = config.positional.randrope_max_len or 2 * config.max_seq_len

    def positions(self, batch_size, seq_len, device, offset):
        if not self.training:
            return super().positions(batch_size, seq_len, device, offset)
        if seq_len > self.max_len:
            raise ConfigError(f"randrope: sequence length {seq_len} exceeds model.positional.randrope_max_len="
                              f"{self.max_len}")
        scores = torch.rand(batch_size, self.max_len, device=device)
        return scores.topk(seq_len, dim=-1).indices.sort(dim=-1).values + offset  # [B, N]
