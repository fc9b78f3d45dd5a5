"""`tape-pretrain bench gpu` runs every section at a tiny size on the CPU and reports each on its own line."""

import math
import subprocess
import sys

import pytest
from torch.nn.attention import SDPBackend

from tests.helpers import base_env

pytestmark = pytest.mark.slow


def test_bench_gpu_reports_every_section(dataset_path):
    command = [sys.executable, "-m", "tape_pretrain.cli", "bench", "gpu", "--preset", "tiny", "--seq-lens", "64",
               "--batch", "2", "--repeats", "1", "--train-seq-len", "64", "--train-batch", "2", "--train-steps", "6",
               "--data", dataset_path, "--peak-flops", "1e12"]
    env = {k: v for k, v in base_env().items() if k != "TAPE_PRETRAIN_EXPECT_GPU"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    summary = lines[lines.index("== summary") + 1:-1]
    assert [line.split(":")[0] for line in summary] == [
        "PASS environment", "INFO speed N=64", "INFO mfu N=64", "PASS sdpa", "PASS model_grads", "PASS train_resume",
        "PASS async_save"]
    assert "stopped at 3 and resumed" in summary[5] and "bitwise equal" in summary[5]
    values = dict(pair.split("=", 1) for pair in lines[-1].split())
    assert values["failed"] == "0"
    for key in ("tape_over_rope_N64", "mfu_rope_N64", "mfu_tape_N64"):
        assert math.isfinite(float(values[key])) and float(values[key]) > 0, (key, values[key])
    for name in ("rope", "tape", "nope", "alibi", "fire", "xpos", "randrope"):  # fp32 default dispatch vs math
        assert float(values[f"grad_error_{name}"]) < 1e-4, (name, values[f"grad_error_{name}"])
    for call in ("rope", "tape_v", "tape_cs", "tape_one_call"):
        assert values[f"sdpa_{call}_N64"] in SDPBackend.__members__, values


def test_gradient_errors_are_relative_with_a_floor_for_zero_gradients():
    import torch

    from tape_pretrain.bench.gpu import gradient_errors

    reference = {"w": torch.tensor([3.0, 4.0]), "zero_true_gradient": torch.tensor([1e-10, -1e-10])}
    grads = {"w": torch.tensor([3.0, 4.5]), "zero_true_gradient": torch.tensor([2e-6, 0.0])}
    errors = gradient_errors(grads, reference)
    assert errors["w"] == pytest.approx(0.5 / 5)
    # floor 1e-3 * 5 / sqrt(2): noise on a zero gradient reads small, not 1e4
    assert errors["zero_true_gradient"] == pytest.approx(2e-6 / (1e-3 * 5 / 2**0.5), rel=1e-3)
