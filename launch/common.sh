# shellcheck shell=bash
# Shared body of the sbatch launchers (pretrain.sh, finetune.sh); sourced, not run.
#
# One job start does, in order:
#   1. log the job (id, restart count, nodes, tasks, rendezvous) at the top of the log;
#   2. print the resolved config (launch/describe.py); an unknown key or a badly typed value
#      fails the job here, once, with exit status 2 (the trainer runs the remaining checks
#      itself and exits 2 too);
#   3. DRY_RUN=1: also run the trainer's config checks, print the derived DeepSpeed config
#      (pretrain) and the srun command, and stop;
#   4. run the stage with `srun ... &` + `wait`, so that bash can run its USR1 trap meanwhile
#      (bash runs traps only between commands or while in `wait`, never during a foreground srun);
#   5. act on the training processes' exit status:
#        0  finished          -> the job completes;
#        75 preempted, saved  -> `scontrol requeue`: the job restarts later (SLURM_RESTART_COUNT
#                                counts the restarts) and the trainer resumes from the run
#                                directory's latest complete checkpoint by itself;
#        other after a USR1   -> also requeued: under --kill-on-bad-exit the first task's exit 75
#                                ends the others, and srun may report that kill (e.g. 143);
#        other                -> a real error: the job fails once and is never requeued.
#
# Preemption protocol: `#SBATCH --signal=B:USR1@300` (or `scancel --signal=USR1 --batch JOB`)
# signals this batch shell only; the trap forwards USR1 to srun, which forwards it to every
# task. Each trainer finishes its optimizer step, all ranks save a checkpoint together and
# exit 75 (EX_TEMPFAIL).
#
# srun options (see vs_srun_flags): --kill-on-bad-exit=1, so a rank that dies ends the step at
# once instead of leaving the others blocked in a collective until its timeout;
# --cpus-per-task=$SLURM_CPUS_PER_TASK, because since Slurm 22.05 srun no longer inherits it from
# sbatch (each task would be pinned to one core, all its data-loader workers sharing it);
# --cpu-bind=cores, each task on its own cores (with the default block distribution, local
# ranks 0-3 land on the first socket, next to GPUs 0-3 on the usual 8-GPU nodes). GPUs: every
# task sees all GPUs of its node and takes the one of its local rank, or, with SRUN_ARGS=
# "--gpus-per-task=1 --gpu-bind=single:1", sees only its own (pretrain/distributed.py handles both).
# Each trainer logs the CPUs it may use at start-up and warns when its data-loader workers
# (plus itself) exceed them.
#
# Environment of the tasks:
#   MASTER_ADDR   as exported by the user, else the first host of the job's node list
#                 (`scontrol show hostnames`);
#   MASTER_PORT   as exported by the user (e.g. a port the cluster's firewall opens), else
#                 15000 + job id % 20000: jobs sharing a node do not collide, and every task
#                 and pretrain/distributed.py's SLURM fallback derive the same port (a user's
#                 value wins there too);
#   OMP_NUM_THREADS  as exported by the user, else --cpus-per-task, else 1 (several CPU
#                 processes with more threads than cores slow each other down, and 1 avoids
#                 exit-time crashes seen with several processes on CPU);
#   PYTHONUNBUFFERED=1  so the ranks' lines reach the log as they are printed.
# NCCL settings are cluster-specific; export them before sbatch (sbatch passes the submitting
# environment on), e.g. NCCL_SOCKET_IFNAME=<fabric interface>, NCCL_IB_HCA=<HCAs>,
# NCCL_DEBUG=WARN (INFO to debug a hang); rank 0 logs them and torch's NCCL version at start.
# Collectives time out after distributed.timeout_min (default 30 minutes), so a rank that dies
# makes the others fail instead of hanging.
#
# Variables read: PYTHON (interpreter with vitscale installed; default python3), DRY_RUN=1,
# SRUN_ARGS (extra srun options, split on spaces, given after ours so they win).

EXIT_PREEMPTED=75
EXIT_CONFIG=2
VS_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VS_STEP_PID=
VS_PREEMPTED=0

vs_log() { echo "[launch $(date -u +%FT%TZ)] $*"; }

vs_on_preempt() {
  VS_PREEMPTED=1
  if [ -n "$VS_STEP_PID" ]; then
    vs_log "received USR1: asking the tasks to save a checkpoint and exit with $EXIT_PREEMPTED"
    kill -USR1 "$VS_STEP_PID" 2>/dev/null
  else
    vs_log "received USR1 before training started"
  fi
}

# Rendezvous and per-task environment (see the header).
vs_export_env() {
  local job=${SLURM_JOB_ID:-0}
  if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-$((15000 + job % 20000))}
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS PYTHONUNBUFFERED=1
}

# vs_srun_flags: the srun options every training step gets (see the header).
vs_srun_flags() {
  VS_SRUN_FLAGS=(--kill-on-bad-exit=1 --cpu-bind=cores)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && VS_SRUN_FLAGS+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
}

vs_log_header() {
  local stage=$1
  vs_log "vitscale $stage: job ${SLURM_JOB_ID:-none (not inside a SLURM job)}, restart ${SLURM_RESTART_COUNT:-0}"
  vs_log "nodes ${SLURM_JOB_NODELIST:-none} (${SLURM_NNODES:-0}), tasks $VS_WORLD, cpus per task $OMP_NUM_THREADS," \
    "gpus per node ${SLURM_GPUS_PER_NODE:-none}, rendezvous $MASTER_ADDR:$MASTER_PORT"
  vs_log "working directory $PWD, python $(command -v "$PYTHON")"
}

# vs_run_step CMD...: run CMD in the background and wait for it, letting the USR1 trap run
# meanwhile; returns CMD's exit status.
vs_run_step() {
  "$@" &
  VS_STEP_PID=$!
  # A USR1 that arrived while the step was being started found no pid to forward to.
  [ "$VS_PREEMPTED" = 1 ] && kill -USR1 "$VS_STEP_PID" 2>/dev/null
  # `wait` returns early (status > 128) when a trap ran; wait again while the step lives.
  while wait "$VS_STEP_PID"; [ $? -gt 128 ] && kill -0 "$VS_STEP_PID" 2>/dev/null; do :; done
  wait "$VS_STEP_PID"
}

# vs_requeue WHY: requeue this job (its next start resumes from the latest checkpoint).
vs_requeue() {
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    vs_log "$1; not a SLURM job, so not requeued"
    exit "$EXIT_PREEMPTED"
  fi
  vs_log "$1: requeueing job $SLURM_JOB_ID"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    vs_log "scontrol requeue failed (was the job submitted with --requeue?); resubmit it to resume"
    exit "$EXIT_PREEMPTED"
  fi
  exit 0
}

# vs_launch STAGE CONFIG [section.key=value ...]: the whole job (see the header).
vs_launch() {
  local stage=$1
  shift
  trap vs_on_preempt USR1
  if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: sbatch [sbatch options] launch/$stage.sh CONFIG [section.key=value ...]" >&2
    echo "error: config file '${1:-}' not found (relative paths are taken from $PWD)" >&2
    exit "$EXIT_CONFIG"
  fi
  if [ -z "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
    echo "error: launch/$stage.sh is an sbatch script: submit it with sbatch, preview it with DRY_RUN=1," \
      "or run on this machine with launch/local.sh" >&2
    exit "$EXIT_CONFIG"
  fi
  local config=$1
  shift
  PYTHON=${PYTHON:-python3}
  VS_WORLD=${SLURM_NTASKS:-1}
  vs_export_env
  vs_log_header "$stage"

  local check=()
  [ "${DRY_RUN:-0}" = 1 ] && check=(--check --world-size "$VS_WORLD")
  "$PYTHON" "$VS_LAUNCH_DIR/describe.py" "$stage" "${check[@]}" --config "$config" "$@" \
    || { vs_log "invalid config: stopping before any training process starts (never requeued)"; exit "$EXIT_CONFIG"; }

  # shellcheck disable=SC2206  # SRUN_ARGS is split on spaces on purpose
  vs_srun_flags
  local cmd=(srun "${VS_SRUN_FLAGS[@]}" ${SRUN_ARGS:-} "$PYTHON" -m "$stage" --config "$config" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    vs_log "DRY_RUN=1, would run:"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
  fi
  [ "$VS_PREEMPTED" = 1 ] && vs_requeue "signalled before training started (nothing to save)"

  vs_log "starting: ${cmd[*]}"
  vs_run_step "${cmd[@]}"
  local status=$?
  case $status in
    0) vs_log "training finished"; exit 0 ;;
    "$EXIT_PREEMPTED") vs_requeue "preempted after a clean checkpoint (exit $EXIT_PREEMPTED)" ;;
    *) # After a USR1 the first task to exit 75 is a "bad exit" to --kill-on-bad-exit, which then
       # terminates the others, maybe before their own exit 75: srun reports that kill (e.g. 143).
       # Requeueing is safe whatever was cut short: the restart resumes from the latest complete
       # checkpoint (an unfinished save is never picked), and a real error fails the restart.
       [ "$VS_PREEMPTED" = 1 ] && vs_requeue "preempted: srun exited $status after the USR1 (the first task to exit $EXIT_PREEMPTED ends the others under --kill-on-bad-exit)"
       vs_log "training failed with exit status $status: a real error, the job is not requeued"
       exit "$status" ;;
  esac
}
