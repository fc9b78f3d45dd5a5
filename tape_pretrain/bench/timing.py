"""Shared timing helpers for the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternate(candidates: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each candidate, timed alternately so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def format_result(values: dict[str, float | int | str]) -> str:
    """The benchmark's last line: space-separated key=value pairs."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())
