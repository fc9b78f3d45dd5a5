"""What a run reports about its own execution: a torch.profiler trace of chosen steps (trainer.profile_steps), peak
memory, and durations people read."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from tape_pretrain.distributed.env import DistEnv
from tape_pretrain.utils.logs import log


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak memory so far: CUDA's allocator peak on a GPU (a host-side counter: no device sync), the
    peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def format_duration(seconds: float) -> str:
    """12s, 5m03s, 2h04m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepProfiler:
    """A torch.profiler trace of training steps first..last (1-based, inclusive) to
    RUN_DIR/profile/trace_rank<R>_steps<first>-<last>.json (chrome://tracing, Perfetto), and on CUDA a memory
    snapshot beside it (memory_rank<R>_steps<first>-<last>.pickle, for pytorch.org/memory_viz). A run resumed past
    ``first`` records nothing."""

    def __init__(self, steps: list[int], run_dir: Path, env: DistEnv):
        self.first, self.last = steps
        self.cuda = env.device.type == "cuda"
        name = f"rank{env.rank}_steps{self.first}-{self.last}"
        directory = run_dir / "profile"
        self.trace, self.snapshot = directory / f"trace_{name}.json", directory / f"memory_{name}.pickle"
        self.profile = None

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profile.__enter__()

    def after_step(self, step: int) -> None:
        if self.profile is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write what was recorded (also when the run stops inside the range)."""
        if self.profile is None:
            return
        profile, self.profile = self.profile, None
        profile.__exit__(None, None, None)
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.trace))
        written = [self.trace]
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(self.snapshot)
        log.info(f"profile: wrote {', '.join(str(p) for p in written)}")
