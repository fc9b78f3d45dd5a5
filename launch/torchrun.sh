#!/usr/bin/env bash
# torchrun with c10d rendezvous. One node:   launch/torchrun.sh CONFIG.yaml [key=value ...]
# Several nodes (run on every node):       NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh CONFIG.yaml
# Ranks come from the rendezvous (NODE_RANK is not needed with c10d). Variables: NNODES, NPROC_PER_NODE
# (default: GPUs, or 1 on CPU), MASTER_ADDR, MASTER_PORT, RDZV_ID, MAX_RESTARTS (torchrun restarts all
# workers of a failed attempt; each attempt auto-resumes from the last complete checkpoint), LOCAL_ADDR.
set -euo pipefail
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
extra=()
if [ -n "${LOCAL_ADDR:-}" ]; then extra+=(--local-addr "$LOCAL_ADDR"); fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-tape-pretrain}" \
  --max-restarts "${MAX_RESTARTS:-0}" "${extra[@]}" -m tape_pretrain.cli train "$@"
