"""Token-weighted perplexity on the val split at several evaluation lengths."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import TokenWindows
from tape_pretrain.data.manifest import load_manifest


@torch.no_grad()
def perplexity(model, windows: TokenWindows, max_tokens: int, batch_size: int, device) -> dict:
    """exp(mean next-token loss) over the first non-overlapping windows of the split (up to max_tokens)."""
    count = max(1, min(windows.num_windows, max_tokens // windows.window_len))
    total_loss, total_tokens = 0.0, 0
    for start in range(0, count, batch_size):
        tokens = torch.from_numpy(windows.gather(np.arange(start, min(start + batch_size, count)))).to(device)
        logits = model(tokens[:, :-1])  # SDPA's fused kernels keep memory linear in length
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
        total_loss += float(loss)
        total_tokens += tokens[:, 1:].numel()
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "windows": count}


def evaluate_lengths(model, data_url: str, lengths: list[int], cache_dir: str, max_tokens: int, batch_size: int,
                     device="cpu", storage_options=None) -> dict[int, dict]:
    manifest, fp = load_manifest(data_url, storage_options)
    split = cache_split(data_url, manifest, fp, "val", cache_dir, storage_options)
    return {length: perplexity(model, TokenWindows(split, manifest.dtype, length), max_tokens, batch_size, device)
            for length in lengths}
