"""Measure the extra peak memory of a model's forward (and backward) pass, on the CPU or an accelerator.

On an accelerator the caching allocator keeps the numbers: the peak of allocated bytes during the pass minus the
bytes allocated before it. The CPU allocator keeps none, so there the profiler records every allocation and free
of the pass (``profile_memory=True``); their sum in time order is the live extra memory at each moment and its
running maximum is the peak. Both count tensors only (not allocator caches, not library workspaces outside the
allocator), so the two devices report the same quantity. On CUDA the first pass of a process also allocates
cuBLAS's workspace (32 MiB more for the tiny preset on an H200): measure after one pass.
"""

from __future__ import annotations

import torch
from torch import nn

_PROFILER_MEMORY_EVENT = "[memory]"  # the name the profiler gives its allocation and free records


def peak_forward_bytes(model: nn.Module, seq_len: int, batch: int, device, grad: bool = False) -> int:
    """Extra peak bytes of one forward of ``model`` (a Transformer: it reads ``model.config.vocab_size``) on
    ``batch`` x ``seq_len`` random token ids on ``device``.

    ``grad=False``: the forward under ``torch.no_grad()``. ``grad=True``: the forward with autograd, then the
    backward of ``logits.float().sum()``; every parameter's ``.grad`` is set to None before and after, so the
    gradients allocated by the backward count. The model's mode (train or eval) is left as the caller set it.
    The logits (``batch * seq_len * vocab`` floats) are part of the peak.
    """
    device = torch.device(device)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

    def run():
        if not grad:
            with torch.no_grad():
                model(ids)
            return
        model(ids).float().sum().backward()

    model.zero_grad(set_to_none=True)
    try:
        return peak_bytes(run, device)
    finally:
        model.zero_grad(set_to_none=True)


def peak_bytes(fn, device) -> int:
    """Extra peak bytes allocated on ``device`` while ``fn()`` runs (what fn returns is discarded)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    return _accelerator_peak_bytes(fn, device)


def _cpu_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw allocation records (a private attribute; torch is pinned to 2.13): the FunctionEvent view attributes an
    # allocation to the op that made it and keeps only its net self total, losing the order inside one op.
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == _PROFILER_MEMORY_EVENT and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def _accelerator_peak_bytes(fn, device: torch.device) -> int:
    memory = _allocator_stats(device)
    memory.synchronize(device)
    before = memory.memory_allocated(device)
    memory.reset_peak_memory_stats(device)
    fn()
    memory.synchronize(device)
    return memory.max_memory_allocated(device) - before


def _allocator_stats(device: torch.device):
    """The module with memory_allocated / max_memory_allocated / reset_peak_memory_stats for ``device``'s type."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "max_memory_allocated"):
        current = accelerator.current_accelerator()
        if current is not None and current.type == device.type:
            return accelerator
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "max_memory_allocated"):
        raise ValueError(f"peak memory: no allocator statistics for device type {device.type!r}")
    return backend
