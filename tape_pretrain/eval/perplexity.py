"""Token-weighted perplexity on the val split at several evaluation lengths."""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from tape_pretrain.config import ConfigError
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import TokenWindows
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.utils.progress import Progress, format_duration

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eval_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when torch can use it, else the CPU: as training chooses), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from tape_pretrain.distributed.device_report import torch_build

            raise ConfigError(f"--device {name}: {torch_build()} cannot use CUDA here (torch.cuda.is_available() is "
                              "False): use --device cpu, or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def eval_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` (bf16 on a CUDA device with native bf16, else fp32), ``fp32`` or ``bf16``. bf16 also runs on the
    CPU, as ``trainer.precision`` does (slowly; it reproduces a bf16 model's numbers on a machine without a GPU)."""
    if name == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: use auto, fp32 or bf16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'fp32', 'bf16', or torch's name of another dtype."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def eval_placement(device="auto", dtype="auto") -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a model is evaluated; names as ``eval_device``/``eval_dtype`` take them, or torch's.
    The weights are cast (as the engines' bf16 does); logits are scored in fp32 whatever the dtype."""
    device = eval_device(device) if isinstance(device, str) else torch.device(device)
    dtype = eval_dtype(dtype, device) if isinstance(dtype, str) else dtype
    return device, dtype


@torch.no_grad()
def perplexity(model, windows: TokenWindows, max_tokens: int, batch_size: int, device, stride: int | None = None,
               rank: int = 0, world_size: int = 1, attention: str = "causal", within_documents: bool = False,
               progress: bool = False) -> dict:
    """exp(mean next-token loss) over the first windows of the split (about max_tokens scored tokens).

    Without a stride the windows do not overlap and every token is scored. With a stride S < length, windows
    start every S tokens and only their last S tokens are scored (the first window scores all), so each token is
    predicted once, with at least length - S tokens of context. Under several ranks each takes every
    world_size-th window and the sums are all-reduced. The loss is computed from fp32 logits whatever the
    model's dtype; ``device`` is the model's.

    ``attention``: ``causal`` (every token sees its whole window) or ``document`` (only its own document, positions
    from its start). ``within_documents``: only windows inside one document, S apart from each document's start (the
    first window of a document scores all its tokens), so that every scored token has its document's own context of
    up to ``length`` tokens and nothing else.

    ``progress``: a bar over this rank's windows on stderr when it is a terminal, else one line when done.
    """
    length = windows.window_len
    stride = stride or length
    if not 0 < stride <= length:
        raise ValueError(f"stride {stride} must be in (0, {length}]")
    if within_documents:
        starts, first = windows.within_document_starts(stride)
        if len(starts) == 0:
            raise ConfigError(f"--within-documents: no document of the val split is longer than {length} tokens")
        count = max(1, min(len(starts), max_tokens // stride))
        starts, first = starts[:count], first[:count]
    else:
        last_start = windows.num_tokens - length - 1
        count = max(1, min(last_start // stride + 1, max_tokens // stride))
        starts = np.arange(count, dtype=np.int64) * stride
        first = starts == 0
    documents = attention == "document"
    mine = np.arange(rank, count, world_size)
    # on the model's device: no host sync per batch, and NCCL (GPU) can only all-reduce device tensors
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    bar = Progress(f"eval {length}", total=len(mine), unit="window", enabled=progress, delay_s=0.5, lines=False)
    for begin in range(0, len(mine), batch_size):
        batch_ids = mine[begin:begin + batch_size]
        gathered = windows.gather_spans(starts[batch_ids], with_documents=documents)
        tokens = torch.from_numpy(gathered[0] if documents else gathered).to(device)
        kwargs = {"document_ids": torch.from_numpy(gathered[1][:, :-1]).to(device)} if documents else {}
        logits = model(tokens[:, :-1], **kwargs)  # SDPA's fused kernels keep memory linear in length
        losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        losses = losses.view(len(batch_ids), length)
        scored = torch.full((len(batch_ids), length), True, device=losses.device)
        scored[torch.from_numpy(~first[batch_ids]), : length - stride] = False
        sums += torch.stack([losses[scored].double().sum(), scored.sum().double()])
        bar.update(len(batch_ids))
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    total_loss, total_tokens = float(sums[0]), int(sums[1])
    mean = total_loss / total_tokens
    bar.close(f"{count:,} windows, {total_tokens:,} tokens, loss {mean:.4f}, perplexity {math.exp(mean):.2f} "
              f"({format_duration(bar.elapsed())})")
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "windows": count}


def evaluate_lengths(model, data_url: str, lengths: list[int], cache_dir: str, max_tokens: int, batch_size: int,
                     device="auto", storage_options=None, stride: int | None = None, rank: int = 0,
                     world_size: int = 1, dtype="auto", attention: str | None = None,
                     within_documents: bool = False, progress: bool = False) -> dict[int, dict]:
    """``perplexity`` at each length on the val split, the model moved to ``device`` in ``dtype`` (see
    ``eval_placement``; the defaults pick what training would). ``attention`` None follows the model's training
    (model.attention). ``progress``: per length, a bar on a terminal, else one line on stderr."""
    device, dtype = eval_placement(device, dtype)
    model.to(device=device, dtype=dtype)
    attention = attention or model.config.attention
    placement = {"device": str(device), "dtype": dtype_name(dtype), "attention": attention,
                 "within_documents": within_documents}
    manifest, fp = load_manifest(data_url, storage_options)
    split = cache_split(data_url, manifest, fp, "val", cache_dir, storage_options)
    # every length's windows first: a length the split cannot hold fails before any evaluation runs
    windows = {n: TokenWindows(split, manifest.dtype, n, where=f"{data_url}: the val split") for n in lengths}
    if (attention == "document" or within_documents) and not windows[lengths[0]].has_documents:
        what = "--within-documents" if within_documents else "document attention"
        raise ConfigError(f"{what} needs document boundaries, but {data_url} records none (prepared before document "
                          "offsets): prep it again, or evaluate with --attention causal")
    return {n: perplexity(model, w, max_tokens, batch_size, device, stride=min(stride, n) if stride else None,
                          rank=rank, world_size=world_size, attention=attention,
                          within_documents=within_documents, progress=progress) | placement
            for n, w in windows.items()}
