#!/usr/bin/env bash
# Two torchrun "nodes" on this machine over loopback (NPROC_PER_NODE processes each, default 1), as a real
# multi-node job would run. If either node fails, the other is stopped too and the script exits non-zero,
# so launch/retry.sh can restart both. Usage: launch/local_multinode.sh CONFIG.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} NNODES=2 NPROC_PER_NODE=${NPROC_PER_NODE:-1}
export MASTER_ADDR=127.0.0.1 LOCAL_ADDR=127.0.0.1
export MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export RDZV_ID="local-$MASTER_PORT"
pids=()
for node in 0 1; do
  bash launch/torchrun.sh "$@" &
  pids+=($!)
  echo "local_multinode: node $node started (pid $!)" >&2
done
trap 'kill "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
# the first node to finish decides: a failure stops the other node at once
if ! wait -n "${pids[@]}"; then
  status=1
  kill "${pids[@]}" 2>/dev/null || true
fi
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
