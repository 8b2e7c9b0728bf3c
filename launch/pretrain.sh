#!/bin/bash
# Pretrain on a SLURM cluster, one process per GPU, surviving time limits and preemption.
#
#   mkdir -p logs   # sbatch opens --output before the job starts: the folder must exist
#   sbatch --nodes=N [--gpus-per-node=G --ntasks-per-node=G] [--time=...] [--partition=...] \
#       launch/pretrain.sh configs/pretrain/vit_b16_i21k.yaml [section.key=value ...]
#   DRY_RUN=1 bash launch/pretrain.sh CONFIG [...]   # print config, DeepSpeed config, srun command
#
# Command-line sbatch options override the #SBATCH defaults below (edit them for your
# cluster). Keep --ntasks-per-node equal to the GPUs per node, and --cpus-per-task above the
# recipe's data.num_workers (the recipes use 10 for pretraining, 8 for finetuning). GPU-less partitions:
# --gpus-per-node=0 and --ntasks-per-node=<processes>; each task then trains on CPU (gloo).
# About 5 minutes before the time limit (--signal) every rank saves and exits 75, and the
# job requeues itself and resumes from that checkpoint; a real error fails the job once.
# The run directory (run.dir, default runs/<run.name>) is what makes a restart resume:
# relative paths are taken from the submit directory. Details: launch/common.sh.
# Run under the environment that has vitscale installed (or set PYTHON=/path/to/python).
#SBATCH --job-name=vitscale-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -uo pipefail
# sbatch runs a copy of this script from its spool directory: find the checkout through the
# path the job was submitted with (scontrol's Command=), or this file outside SLURM.
if [ -n "${SLURM_JOB_ID:-}" ]; then
  here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")
else
  here=$(dirname "${BASH_SOURCE[0]}")
fi
# shellcheck source=launch/common.sh
source "$here/common.sh"
vs_launch pretrain "$@"
