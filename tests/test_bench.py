"""`tape-pretrain bench all` runs every benchmark and ends with one line of key=value results (sizes kept tiny:
the figures themselves are reported from full-size runs, never asserted)."""

import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

EXPECTED = {
    "model": ["tape_ms", "rope_ms", "ratio_tape_over_rope"],
    "prep": ["raw_tokens_per_s", "prep_over_raw_1w", "speedup_2w"],
    "loader": ["loader_tokens_per_s", "documents_vs_plain", "mixture_vs_plain", "stream_vs_copy"],
    "train": ["trainer_step_ms", "bare_step_ms", "trainer_overhead", "document_vs_causal", "mixture_vs_single"],
    "checkpoint": ["save_over_raw", "load_over_raw", "async_blocking_over_sync"],
}


def test_bench_all_runs_every_benchmark(cli_env):
    result = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "bench", "all", "--preset", "tiny",
                             "--seq-len", "64", "--repeats", "1"],
                            env=cli_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert [line for line in lines if line.startswith("== bench ")] == [f"== bench {name}" for name in EXPECTED]
    values = dict(pair.split("=", 1) for pair in lines[-1].split())
    for name, keys in EXPECTED.items():
        for key in keys:
            assert key in values, f"bench {name}: {key} missing from the last line"
            assert math.isfinite(float(values[key])) and float(values[key]) > 0, (key, values[key])
