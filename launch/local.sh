#!/usr/bin/env bash
# Train on this machine with N processes (CPU or GPUs), for development and the demo:
#
#   launch/local.sh CONFIG [N] [section.key=value ...]
#   STAGE=finetune launch/local.sh configs/finetune/demo.yaml 2 init=runs/demo/export/model.safetensors
#
# N defaults to the number of GPUs (1 without GPUs). It runs
# `python -m torch.distributed.run --standalone --nproc_per_node N -m $STAGE --config CONFIG ...`
# (torchrun from the interpreter's own torch), which gives every process its rank and a free
# rendezvous port; on CPU torchrun sets OMP_NUM_THREADS=1 per process unless it is set.
# The config and the data manifests it names are checked first (launch/describe.py --check, pretrain/preflight.py):
# a bad one exits 2 with one line before any process starts.
# PYTHON selects the interpreter (default: python3 on PATH, e.g. an activated venv).
# A real SLURM cluster uses launch/pretrain.sh / launch/finetune.sh instead.
set -euo pipefail
PYTHON=${PYTHON:-python3}
STAGE=${STAGE:-pretrain}
usage() { echo "usage: [STAGE=pretrain|finetune] $0 CONFIG [N] [section.key=value ...]" >&2; exit 2; }
case $STAGE in pretrain|finetune) ;; *) echo "error: STAGE=$STAGE is not pretrain or finetune" >&2; usage ;; esac
[ $# -ge 1 ] || usage
config=$1
shift
[ -f "$config" ] || { echo "error: config file '$config' not found" >&2; usage; }
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  nproc=$1
  shift
  [ "$nproc" -ge 1 ] || { echo "error: N must be at least 1, got $nproc" >&2; usage; }
elif command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$gpus" -gt 0 ]; then
  nproc=$gpus
else
  nproc=1
fi
# The trainer's own config checks, once, before torchrun: a typo or a missing data path gives
# one clear line and exit status 2 instead of one failure report per process.
"$PYTHON" "$(dirname "$0")/describe.py" "$STAGE" --check --world-size "$nproc" --config "$config" "$@" >/dev/null \
  || exit 2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m "$STAGE" --config "$config" "$@"
