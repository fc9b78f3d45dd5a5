#!/usr/bin/env bash
# The DeepSpeed launcher. One node: launch/deepspeed.sh CONFIG.yaml [key=value ...]
# Several nodes over ssh/pdsh: HOSTFILE=launch/hostfile.example launch/deepspeed.sh CONFIG.yaml
# Without ssh (each node started by your scheduler): NO_SSH=1 NODE_RANK=r NNODES=n MASTER_ADDR=node0 on every node.
# Variables: NPROC_PER_NODE (GPUs, or processes on CPU), HOSTFILE, MASTER_ADDR, MASTER_PORT, NO_SSH, NODE_RANK, NNODES.
set -euo pipefail
PYTHON=${PYTHON:-python}
args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${NPROC_PER_NODE:-}" ]; then args+=(--num_gpus "$NPROC_PER_NODE"); fi
if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi
if [ -n "${MASTER_ADDR:-}" ]; then args+=(--master_addr "$MASTER_ADDR"); fi
if [ -n "${NO_SSH:-}" ]; then args+=(--no_ssh --node_rank "${NODE_RANK:?NODE_RANK}" --num_nodes "${NNODES:?NNODES}"); fi
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module tape_pretrain.cli train "$@"
