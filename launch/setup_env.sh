#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install tape-pretrain with its test extras.
# Idempotent: a second run only checks that everything is installed.
# TORCH_SPEC overrides the PyTorch requirement (e.g. a CUDA build on GPU machines); EXTRAS picks the optional
# dependency groups (default "test"; "test,gcs" adds gcsfs for gs:// URLs).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.tape_pretrain_installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC [$EXTRAS]"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# torch first and pinned: an unpinned torch (pulled in as a dependency) would fetch a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, deepspeed, sentencepiece, tape_pretrain" >/dev/null 2>&1 || {
  echo "setup_env: installation incomplete (import of torch/deepspeed/sentencepiece/tape_pretrain failed)" >&2
  exit 1
}
echo "$want" > "$stamp"
