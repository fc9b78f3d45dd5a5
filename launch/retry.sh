#!/usr/bin/env bash
# Re-run a crashed or preempted job up to N times; every attempt resumes from the last complete checkpoint.
# Usage: launch/retry.sh N COMMAND [ARGS ...]      e.g. launch/retry.sh 3 launch/torchrun.sh configs/runs/x.yaml
set -uo pipefail
max=${1:?number of restarts}; shift
attempt=0
while true; do
  "$@"
  status=$?
  if [ $status -eq 0 ]; then
    exit 0
  fi
  if [ $attempt -ge "$max" ]; then
    echo "retry: attempt $((attempt + 1)) failed with status $status; no restarts left" >&2
    exit $status
  fi
  attempt=$((attempt + 1))
  echo "retry: attempt $attempt failed with status $status; restarting ($attempt/$max)" >&2
  sleep "${RETRY_DELAY_S:-2}"
done
