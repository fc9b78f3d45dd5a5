#!/usr/bin/env bash
# Recipe: C4 (en) tokenized with the Llama-2 SentencePiece model into shards on S3-compatible storage.
# Usage: data_prep/c4_llama2_to_s3.sh path/to/llama2_tokenizer.model s3://bucket/c4-llama2 [WORKERS]
# Credentials and endpoint come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_ENDPOINT_URL) or a profile. Re-running resumes; a finished dataset is left untouched.
set -euo pipefail
tokenizer=${1:?llama2 tokenizer.model}
out=${2:?destination URL, e.g. s3://bucket/c4-llama2}
workers=${3:-$(nproc)}
exec tape-pretrain prep --input "hf:allenai/c4:en@train" --tokenizer "$tokenizer" --out "$out" \
  --workers "$workers" --val-fraction 0.0005 --shard-tokens 100000000
