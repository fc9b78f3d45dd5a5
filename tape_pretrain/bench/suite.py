"""bench all: every benchmark in its own process, then their results merged into one last line.

Separate processes because DeepSpeed keeps the first process group it saw for the life of the process: after
one benchmark has torn its group down, a second one that initialises DeepSpeed in the same process fails.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("model", "prep", "loader", "train", "checkpoint")


def run_all(options: list[str]) -> dict[str, str]:
    """Runs ``tape-pretrain bench NAME OPTIONS`` for every benchmark, echoing its output as it comes."""
    merged: dict[str, str] = {}
    for name in BENCHMARKS:
        print(f"== bench {name}", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "tape_pretrain.cli", "bench", name, *options],
                                stdout=subprocess.PIPE, text=True)
        last = ""
        for line in proc.stdout:
            print(line, end="", flush=True)
            last = line.strip() or last
        if proc.wait() != 0:
            raise SystemExit(f"error: bench {name} failed (exit status {proc.returncode}); see its output above")
        merged.update(pair.split("=", 1) for pair in last.split())
    print(" ".join(f"{key}={value}" for key, value in merged.items()))
    return merged
