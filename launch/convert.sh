#!/bin/bash
# Convert a large dataset (ImageNet-21k size) into webdataset shards with a SLURM array job.
#
#   mkdir -p logs   # sbatch opens --output before the job starts: the folder must exist
#   sbatch [--array=0-N-1] [--cpus-per-task=C] [--partition=...] launch/convert.sh SOURCE OUT [convert options ...]
#   PARTS=N sbatch --array=3,5 launch/convert.sh SOURCE OUT [...]   # rerun parts 3 and 5 of N
#
# Array task I of N runs `python -m data_tools convert SOURCE OUT [options] --part I/N
# --workers C` (options: `python -m data_tools convert --help`; a --workers given here wins).
# The source is listed once: the first task to start takes OUT/_work/<split>/plan.lock, lists
# the source and writes the plan there; the others wait for it (a lock whose task died is
# taken over after 2 minutes), then read only their own shards' rows. Each task writes the
# shards i with i % N == I that are not there yet, re-checking size and sha256 of those
# that are. N is PARTS when set, else the array's size: keep it fixed when rerunning parts.
#
# The lowest task of the array submits the merge: the same command with --merge instead of
# --part, as a one-node job with the tasks' CPUs that starts once every array task has ended
# (--dependency=afterany, not afterok: after a failed part an afterok job would wait forever;
# this one runs, fails, and its log names the missing shards). It writes no image, checks
# that every planned shard exists with the size and sha256 its part recorded (hashed on all
# its CPUs), and writes _errors.jsonl and the split's _info.json.
# Its log goes next to the array's logs (<job-name>-merge-<id>.out). A failed or killed
# part: rerun it (PARTS=N sbatch --array=I ...; finished shards are kept), which submits a
# new merge. Relative SOURCE and OUT are taken from the submit directory.
# Variables read: PYTHON (interpreter with vitscale installed; default python3), PARTS.
#SBATCH --job-name=vitscale-convert
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --output=logs/%x-%A_%a.out
set -uo pipefail
# sbatch runs a copy of this script from its spool directory: find the checkout through the
# path the job was submitted with (scontrol's Command=), or this file outside SLURM. The
# last task of an array has the array's job id, which scontrol shows once per task: take one.
if [ -n "${SLURM_JOB_ID:-}" ]; then
  here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")
else
  here=$(dirname "${BASH_SOURCE[0]}")
fi
# shellcheck source=launch/common.sh
source "$here/common.sh"

if [ $# -lt 2 ]; then
  echo "usage: sbatch [--array=0-N-1] launch/convert.sh SOURCE OUT [data_tools convert options ...]" >&2
  exit "$EXIT_CONFIG"
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "error: launch/convert.sh is an sbatch array script: submit it with sbatch --array=0-N-1;" \
    "on one machine run python -m data_tools convert SOURCE OUT --workers C instead" >&2
  exit "$EXIT_CONFIG"
fi
PYTHON=${PYTHON:-python3}
parts=${PARTS:-$SLURM_ARRAY_TASK_COUNT}
part="$SLURM_ARRAY_TASK_ID/$parts"
convert=("$PYTHON" -m data_tools convert --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress "$@")

# vs_submit_merge: submit `convert ... --merge` to run after every task of this array.
vs_submit_merge() {
  local log_dir options=() merge_id
  log_dir=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p' | head -n 1)")
  [ -n "${SLURM_JOB_PARTITION:-}" ] && options+=(--partition="$SLURM_JOB_PARTITION")
  [ -n "${SLURM_JOB_ACCOUNT:-}" ] && options+=(--account="$SLURM_JOB_ACCOUNT")
  if merge_id=$(sbatch --parsable --job-name="$SLURM_JOB_NAME-merge" \
      --dependency="afterany:$SLURM_ARRAY_JOB_ID" --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
      "${options[@]}" \
      --output="$log_dir/%x-%j.out" --chdir="$PWD" --wrap="$(printf '%q ' "${convert[@]}" --merge)"); then
    vs_log "submitted merge job $merge_id (runs after every task of array job $SLURM_ARRAY_JOB_ID)"
  else
    vs_log "could not submit the merge job: once every part has finished, run" \
      "$(printf '%q ' "${convert[@]}" --merge)"
  fi
}

vs_log "vitscale convert: job ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID, part $part, restart" \
  "${SLURM_RESTART_COUNT:-0}, node $(hostname), cpus ${SLURM_CPUS_PER_TASK:-1}"
vs_log "working directory $PWD, python $(command -v "$PYTHON")"
if [ "$SLURM_ARRAY_TASK_ID" = "${SLURM_ARRAY_TASK_MIN:-0}" ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  vs_submit_merge
fi
vs_log "starting: ${convert[*]} --part $part"
"${convert[@]}" --part "$part"
status=$?
vs_log "part $part finished with exit status $status"
exit "$status"
