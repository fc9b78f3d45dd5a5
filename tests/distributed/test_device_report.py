"""A GPU that torch cannot use stops a run before step 0 with one line naming the torch build and the fix; doctor
shows the stack and the SDPA backend of each of the project's attention calls."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tape_pretrain.distributed.device_report import (
    ATTENTION_CALLS,
    FUSED_BACKENDS,
    attention_inputs,
    cuda_problem,
    run_device_report,
    sdpa_choice,
)
from tests.helpers import base_env, train_command, write_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.path.exists("/dev/nvidia0"),
                                reason="simulates GPU machines on a machine without one")

H200 = "GPU 0: NVIDIA H200 (UUID: GPU-9b1b8ef2-0000-0000-0000-000000000000)"


def fake_nvidia_smi(directory: Path, works: bool = True) -> str:
    """A PATH whose nvidia-smi lists one GPU (or fails as it does without a driver), then the usual PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    body = f'echo "{H200}"' if works else (
        "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9")
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in base_env().items() if k not in ("TAPE_PRETRAIN_EXPECT_GPU", "TORCH_INDEX_URL")}
    return subprocess.run([sys.executable, "-m", "tape_pretrain.cli", *args], env={**environ, **env},
                          capture_output=True, text=True, timeout=180)


def test_doctor_stops_on_a_gpu_torch_cannot_use_and_shows_the_stack(tmp_path):
    out = cli("doctor", PATH=fake_nvidia_smi(tmp_path / "bin"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [out.stderr.strip().splitlines()[-1]], out.stderr
    assert errors[0].startswith(f"error: preflight: rank 0: an NVIDIA GPU is present (nvidia-smi -L: {H200})")
    assert f"torch {torch.__version__} (CPU-only build, torch.version.cuda=None)" in errors[0]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash launch/setup_env.sh" in errors[0]
    assert f"stack: torch {torch.__version__}, CUDA none, cuDNN none, NCCL none" in out.stdout
    assert "compute capability none" in out.stdout and "attention (SDPA, float32, causal)" in out.stdout
    for name in ATTENTION_CALLS:
        row = next(line for line in out.stdout.splitlines() if line.strip().startswith(name + " "))
        assert any(f": {b.name}" in row for b in (*FUSED_BACKENDS, SDPBackend.MATH)), row



def test_expect_gpu_stops_training_before_step_0(tmp_path, dataset_path):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 2})
    environ = dict(base_env(), TAPE_PRETRAIN_EXPECT_GPU="1")
    out = subprocess.run(train_command(0, cfg), env=environ, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: preflight: rank 0: TAPE_PRETRAIN_EXPECT_GPU=1 (though no NVIDIA device is "
                           "visible here"), last
    assert f"torch {torch.__version__}" in last and "TORCH_INDEX_URL=" in last, last
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_what_counts_as_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "broken", works=False))
    assert cuda_problem({}) is None  # nvidia-smi without a driver lists no GPU
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cuda_problem({}) is None  # no nvidia-smi at all
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin"))
    assert cuda_problem({"TAPE_PRETRAIN_EXPECT_GPU": "0"}) is None  # the user wants the CPU
    problem = cuda_problem({"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu128"})
    assert problem.startswith(f"an NVIDIA GPU is present (nvidia-smi -L: {H200}), but torch {torch.__version__}")
    assert "pip took this wheel from its own configuration" in problem
    assert "use 1 (this machine must train on CUDA) or 0" in cuda_problem({"TAPE_PRETRAIN_EXPECT_GPU": "yes"})


@pytest.mark.filterwarnings("ignore:Flash attention")  # torch explaining why flash declines the 2D-wide call
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_attention_call_is_reported_with_the_backend_that_runs_it(dtype):
    report = run_device_report(None, torch.device("cpu"))  # paper-155m at N=1024, fp32 on the CPU
    assert report.dtype == "float32" and [c.name for c in report.attention] == list(ATTENTION_CALLS)
    shapes = {c.name: (c.q_shape, c.v_shape) for c in report.attention}
    assert shapes["rope"] == shapes["tape_v"] == shapes["tape_cs"] == ((1, 12, 1024, 64), (1, 12, 1024, 64))
    assert shapes["tape_one_call"][1] == (1, 12, 1024, 128)

    for name, (q, k, v) in attention_inputs(2, 4, 64, 32, torch.device("cpu"), dtype).items():
        chosen = sdpa_choice(q, k, v)
        with sdpa_kernel([SDPBackend.__members__[chosen]]):  # the named backend alone runs the call
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if chosen == "MATH":  # and the math kernel is named only when no fused kernel takes the call
            with pytest.raises(RuntimeError), sdpa_kernel(list(FUSED_BACKENDS)):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            assert SDPBackend.__members__[chosen] in FUSED_BACKENDS, (name, chosen)
