#!/usr/bin/env bash
# Recipe: prep across machines. A SLURM job array runs part i of PARTS on array task i (all writing to OUT), and a
# job that starts once every task succeeded (--dependency=afterok) merges them into the dataset: byte-identical to
# one `tape-pretrain prep` of the same inputs and options.
# Usage: data_prep/slurm_prep_array.sh PARTS OUT TOKENIZER SRC... [-- PREP_OPTION...]
#   e.g. data_prep/slurm_prep_array.sh 32 s3://bucket/c4-llama2 llama2.model 's3://bucket/c4/en/c4-train.*.json.gz' \
#          -- --val-fraction 0.0005 --shard-tokens 100000000
# SRC must be files (globs, folders, builtin:): a part prepares whole segments of about --segment-bytes (default 1 GiB)
# of consecutive input files, and a hf: dataset is one segment, which no number of parts can split. Quote globs.
# A failed or preempted part can be submitted again alone (it resumes), then the merge:
#   sbatch --array=I ... (the same command line), then `tape-pretrain data merge OUT`; the merge names missing parts.
# Environment: CPUS_PER_PART (default 16; also each part's --workers), SBATCH_ARGS (extra sbatch options, e.g.
# "--partition=cpu --time=12:00:00 --account=me"), TAPE_PRETRAIN (the command, default tape-pretrain).
set -euo pipefail
parts=${1:?number of parts}
out=${2:?dataset URL}
tokenizer=${3:?tokenizer.model}
shift 3
inputs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  inputs+=("$1")
  shift
done
[ "${1:-}" = "--" ] && shift
[ ${#inputs[@]} -gt 0 ] || { echo "error: give at least one SRC after TOKENIZER" >&2; exit 2; }
[ "$parts" -ge 1 ] 2>/dev/null || { echo "error: PARTS must be a positive integer, got '$parts'" >&2; exit 2; }
cpus=${CPUS_PER_PART:-16}
tool=${TAPE_PRETRAIN:-tape-pretrain}
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"

quoted() { [ $# -eq 0 ] || printf ' %q' "$@"; }  # the arguments as one shell-safe string for --wrap

# options after -- come last: a --workers there wins over the default here
part_cmd="$tool prep --input$(quoted "${inputs[@]}") --tokenizer$(quoted "$tokenizer") --out$(quoted "$out")"
part_cmd+=" --workers $cpus --quiet --num-parts $parts --part \$SLURM_ARRAY_TASK_ID$(quoted "$@")"
array_job=$(sbatch --parsable --job-name=tape-prep --array="0-$((parts - 1))" --ntasks=1 \
  --cpus-per-task="$cpus" ${sbatch_args[@]+"${sbatch_args[@]}"} --wrap "$part_cmd")
array_job=${array_job%%;*}  # --parsable prints JOBID[;CLUSTER]
merge_job=$(sbatch --parsable --job-name=tape-prep-merge --dependency="afterok:$array_job" --kill-on-invalid-dep=yes \
  --ntasks=1 --cpus-per-task=1 ${sbatch_args[@]+"${sbatch_args[@]}"} --wrap "$tool data merge$(quoted "$out")")
echo "parts: job $array_job (array 0-$((parts - 1))); merge: job ${merge_job%%;*} once every part has succeeded"
