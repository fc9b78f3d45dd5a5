#!/usr/bin/env bash
# The whole pipeline on one machine: tokenizer -> shards -> 2-process DeepSpeed ZeRO-2 training of a tiny
# TAPE model with a 64 -> 128 -> 256 curriculum (paused once and resumed) -> perplexity at 1x, 2x, 4x length.
# Safe to re-run: finished work (venv, tokenizer, shards, training) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash launch/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo PYTHONUNBUFFERED=1
DATA=runs/quickstart_data
RUN=runs/quickstart
mkdir -p "$DATA"

if [ ! -f "$DATA/tokenizer.model" ]; then
  tape-pretrain tokenizer train --input builtin:python-stdlib --vocab-size 4096 --out "$DATA/tokenizer.model"
fi
# Stands in for a bucket: any fsspec URL works here (s3://..., gs://...). A finished, identical dataset is
# reused as is; --overwrite rebuilds this derived data if a newer tape-pretrain prepares it differently.
tape-pretrain prep --input builtin:python-stdlib --tokenizer "$DATA/tokenizer.model" --out "$DATA/dataset" \
  --workers 2 --val-fraction 0.02 --shard-tokens 2000000 --overwrite

port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
launch() {
  torchrun --nproc-per-node 2 --nnodes 1 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" \
    -m tape_pretrain.cli train configs/runs/quickstart.yaml "$@"
}
if [ ! -f "$RUN/export/model.safetensors" ]; then
  if [ ! -d "$RUN/checkpoints" ]; then
    echo "== training steps 1-100, then pausing with a checkpoint (as a preempted job would)"
    launch trainer.stop_at_step=100
  fi
  echo "== the same command again: resumes from the newest complete checkpoint"
  launch
fi

echo "== perplexity at 1x, 2x and 4x the final training length (256)"
tape-pretrain eval "$RUN" --data "$DATA/dataset" --lengths 256,512,1024 --max-tokens 60000 --plot --out "$RUN/eval"

python - "$RUN" "$start" <<'PY'
import json, sys, time
run, start = sys.argv[1], int(sys.argv[2])
records = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
train = [r for r in records if "loss" in r]
val = [r for r in records if "val_loss" in r]
ppl = json.load(open(f"{run}/eval/eval.json"))
print("\n== summary")
print(f"| steps | first loss | final loss | final val loss | " + " | ".join(f"ppl@{k}" for k in ppl) + " |")
print("|---:|---:|---:|---:|" + "---:|" * len(ppl))
print(f"| {train[-1]['step']} | {train[0]['loss']:.3f} | {train[-1]['loss']:.3f} | {val[-1]['val_loss']:.3f} | "
      + " | ".join(f"{v['perplexity']:.1f}" for v in ppl.values()) + " |")
print(f"metrics:     {run}/metrics.jsonl")
print(f"checkpoints: {run}/checkpoints/")
print(f"export:      {run}/export/ (safetensors + config + tokenizer)")
print(f"plot:        {run}/eval/perplexity.png")
print(f"total time:  {time.time() - start:.0f}s")
PY
