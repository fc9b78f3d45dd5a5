#!/usr/bin/env bash
# Recipe: a tokenizer and shards from the Python standard library (no download), as the quickstart does.
# Usage: data_prep/builtin_quick.sh OUT_DIR [VOCAB]
set -euo pipefail
out=${1:?output directory}
vocab=${2:-4096}
mkdir -p "$out"
[ -f "$out/tokenizer.model" ] || tape-pretrain tokenizer train --input builtin:python-stdlib --vocab-size "$vocab" \
  --out "$out/tokenizer.model"
tape-pretrain prep --input builtin:python-stdlib --tokenizer "$out/tokenizer.model" --out "$out/dataset" \
  --workers 2 --val-fraction 0.02 --shard-tokens 2000000
