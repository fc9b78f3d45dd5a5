#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install tape-pretrain with its test extras.
# Idempotent: a second run only checks that everything is installed.
# TORCH_SPEC overrides the PyTorch requirement; TORCH_INDEX_URL is the index torch alone comes from (pip's
# --index-url, e.g. https://download.pytorch.org/whl/cu128 for a CUDA 12.8 build); EXTRAS picks the optional
# dependency groups (default "test"; "test,gcs" adds gcsfs for gs:// URLs).
# On a machine with an NVIDIA GPU (or with TAPE_PRETRAIN_EXPECT_GPU=1) it fails, naming the torch build, unless
# torch can use CUDA; TAPE_PRETRAIN_EXPECT_GPU=0 skips that check.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-test}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# A torch that cannot use the GPU (a +cpu wheel from pip's configured indexes, a build newer than the driver) would
# train on the CPU without a word: checked on every run, a stamp made on a CPU login node included.
check_gpu() {
  local gpus=""
  case "${TAPE_PRETRAIN_EXPECT_GPU:-}" in
    0) return 0 ;;
    1) ;;
    "")
      # the listing is captured first: grep -q closing the pipe early would be a SIGPIPE failure under pipefail
      if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(timeout 10 nvidia-smi -L 2>/dev/null || true); fi
      [ -e /dev/nvidia0 ] || grep -q '^GPU ' <<<"$gpus" || return 0 ;;
    *) echo "setup_env: TAPE_PRETRAIN_EXPECT_GPU must be 0 or 1, not '$TAPE_PRETRAIN_EXPECT_GPU'" >&2; return 1 ;;
  esac
  "$VENV/bin/python" -m tape_pretrain.distributed.device_report --require-cuda
}
stamp="$VENV/.tape_pretrain_installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} [$EXTRAS]"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  check_gpu || exit 1
  exit 0
fi
torch_index=()
if [ -n "$TORCH_INDEX_URL" ]; then
  torch_index=(--index-url "$TORCH_INDEX_URL")
  # pip counts an installed 2.13.0+cpu as satisfying torch==2.13.0 and would keep it: remove a build whose local
  # tag (+cpu, +cu128, ...) is not the index's last path component
  tag=${TORCH_INDEX_URL%/}
  tag=${tag##*/}
  installed=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
  if [ -n "$installed" ] && [ "${installed#*+}" != "$tag" ]; then
    "$VENV/bin/python" -m pip uninstall -q -y torch
  fi
fi
# torch first and pinned: an unpinned torch (pulled in as a dependency) would fetch a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check ${torch_index[@]+"${torch_index[@]}"} "$TORCH_SPEC" \
  2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, deepspeed, sentencepiece, tape_pretrain" >/dev/null 2>&1 || {
  echo "setup_env: installation incomplete (import of torch/deepspeed/sentencepiece/tape_pretrain failed)" >&2
  exit 1
}
check_gpu || exit 1
echo "$want" > "$stamp"
