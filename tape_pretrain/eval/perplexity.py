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
def perplexity(model, windows: TokenWindows, max_tokens: int, batch_size: int, device, stride: int | None = None,
               rank: int = 0, world_size: int = 1) -> dict:
    """exp(mean next-token loss) over the first windows of the split (about max_tokens scored tokens).

    Without a stride the windows do not overlap and every token is scored. With a stride S < length, windows
    start every S tokens and only their last S tokens are scored (the first window scores all), so each token is
    predicted once, with at least length - S tokens of context. Under several ranks each takes every
    world_size-th window and the sums are all-reduced.
    """
    length = windows.window_len
    stride = stride or length
    if not 0 < stride <= length:
        raise ValueError(f"stride {stride} must be in (0, {length}]")
    last_start = windows.num_tokens - length - 1
    count = max(1, min(last_start // stride + 1, max_tokens // stride))
    starts = np.arange(count, dtype=np.int64) * stride
    mine = np.arange(rank, count, world_size)
    # on the model's device: no host sync per batch, and NCCL (GPU) can only all-reduce device tensors
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for first in range(0, len(mine), batch_size):
        batch_ids = mine[first:first + batch_size]
        tokens = torch.from_numpy(windows.gather_spans(starts[batch_ids])).to(device)
        logits = model(tokens[:, :-1])  # SDPA's fused kernels keep memory linear in length
        losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        losses = losses.view(len(batch_ids), length)
        scored = torch.full((len(batch_ids), length), True, device=losses.device)
        scored[torch.from_numpy(batch_ids) > 0, : length - stride] = False
        sums += torch.stack([losses[scored].double().sum(), scored.sum().double()])
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    total_loss, total_tokens = float(sums[0]), int(sums[1])
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "windows": count}


def evaluate_lengths(model, data_url: str, lengths: list[int], cache_dir: str, max_tokens: int, batch_size: int,
                     device="cpu", storage_options=None, stride: int | None = None, rank: int = 0,
                     world_size: int = 1) -> dict[int, dict]:
    manifest, fp = load_manifest(data_url, storage_options)
    split = cache_split(data_url, manifest, fp, "val", cache_dir, storage_options)
    # every length's windows first: a length the split cannot hold fails before any evaluation runs
    windows = {n: TokenWindows(split, manifest.dtype, n, where=f"{data_url}: the val split") for n in lengths}
    return {n: perplexity(model, w, max_tokens, batch_size, device, stride=min(stride, n) if stride else None,
                          rank=rank, world_size=world_size)
            for n, w in windows.items()}
