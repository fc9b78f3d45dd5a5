"""launch/setup_env.sh refuses a torch that cannot use the machine's GPU, even when its stamp says all is installed."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, base_env

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.path.exists("/dev/nvidia0"),
                                reason="simulates a GPU machine on a machine without one")


def test_setup_env_refuses_a_torch_that_cannot_use_the_gpu(tmp_path):
    # A stand-in venv whose stamp matches (the quick path) and whose python is this one but cannot install anything.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\ncase "$*" in *"-m pip"*) exit 99 ;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / ".tape_pretrain_installed").write_text(f"{digest} torch==2.13.0 [test]\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in base_env().items()
           if k not in ("TORCH_SPEC", "TORCH_INDEX_URL", "EXTRAS", "TAPE_PRETRAIN_EXPECT_GPU")}
    env.update(VENV=str(venv), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")

    out = subprocess.run(["bash", str(ROOT / "launch" / "setup_env.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: an NVIDIA GPU is present (nvidia-smi -L: GPU 0: NVIDIA H200 (UUID: GPU-0)), but "
        f"torch {torch.__version__} (CPU-only build, torch.version.cuda=None) cannot use CUDA: reinstall a CUDA "
        "build with TORCH_INDEX_URL="), out.stderr

    env["TAPE_PRETRAIN_EXPECT_GPU"] = "0"
    out = subprocess.run(["bash", str(ROOT / "launch" / "setup_env.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
