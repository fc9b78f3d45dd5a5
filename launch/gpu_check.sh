#!/usr/bin/env bash
# The project's check of one GPU, from a clone: sets up .venv (launch/setup_env.sh: refuses a torch that cannot use
# the GPU), then runs `tape-pretrain bench gpu` (environment and SDPA backends, TAPE vs RoPE speed and MFU at
# paper-155m for N=1024 and 4096, each SDPA backend's error against the math kernel, a 30-step FSDP2 run with a
# bitwise-checked resume, an async save checked against the live weights) and writes its output to a report file.
# Usage: launch/gpu_check.sh [bench gpu options, e.g. --seq-lens 1024 --batch 4]
# Variables: REPORT (default runs/gpu_check/report_HOST_TIME.txt), TORCH_INDEX_URL (passed to setup_env.sh),
# CUDA_VISIBLE_DEVICES (which GPU), TAPE_PRETRAIN_EXPECT_GPU (default 1: no GPU is an error; 0 runs on the CPU,
# with tiny sizes only: --preset tiny --seq-lens 64 --batch 2 --train-seq-len 64 --train-batch 2 --train-steps 6).
# Exits non-zero when any section FAILs.
set -euo pipefail
cd "$(dirname "$0")/.."
export TAPE_PRETRAIN_EXPECT_GPU=${TAPE_PRETRAIN_EXPECT_GPU:-1} PYTHONUNBUFFERED=1
bash launch/setup_env.sh
report=${REPORT:-runs/gpu_check/report_$(hostname -s)_$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$(dirname "$report")"
status=0
"${VENV:-.venv}/bin/python" -m tape_pretrain.cli bench gpu "$@" 2>&1 | tee "$report" || status=$?
echo "report: $report"
exit "$status"
