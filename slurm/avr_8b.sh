#!/usr/bin/env bash
# AvR training of Llama-3 8B on H100 nodes with plain sbatch (no NeMo-Run needed).
#
#   cd /path/to/avr-megatron                        # the job finds slurm/lib and recipes/ here
#   STAGE=sft sbatch slurm/avr_8b.sh run.dir=/lustre/$USER/avr8b data.train=/lustre/.../rsft.parquet
#   STAGE=logps sbatch slurm/avr_8b.sh run.dir=...  # then STAGE=dpo for the DPO stages
#   DRYRUN=1 bash slurm/avr_8b.sh run.dir=...      # print resources, TP/PP/DP and the command
#
# Edit for your cluster: --account / --partition below (or pass them to sbatch), --nodes (the
# recipe's TP x PP x CP must divide nodes x 8), --time, and the --output directory (must exist).
# Stage: STAGE=smoke|sft|rsft|thought_sft|dpo|stage1_dpo|stage2_dpo|logps, or AVR_CMD="synth stage1".
# Arguments after the script are recipe overrides (key=value). AVR_RECIPE picks another recipe,
# AVR_PYTHON the Python that has avr_megatron installed (default: the repository's .venv, the
# train environment: README "On a cluster"); AVR_CONTAINER_IMAGE runs the processes in a
# container instead (containers/train.Dockerfile; AVR_CONTAINER_MOUNTS for the file systems).
# Placeholders (/path/to..., YOUR_...) in the keys the stage reads are refused, naming the key.
# Preemption: Slurm sends USR1 to this script 10 min before the time limit; it is forwarded to
# the training processes, which save a checkpoint and exit 75; the job then requeues itself and
# resumes from checkpoint.dir. A job requeued by Slurm (node failure, `scontrol requeue`) also
# resumes, from the last periodic checkpoint (checkpoint.save_interval). See docs/slurm.md.
#
#SBATCH --job-name=avr-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --account=CHANGE_ME
##SBATCH --partition=CHANGE_ME
set -euo pipefail
AVR_SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")  # this file (sbatch: its spool copy)
AVR_HOME=${AVR_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$AVR_HOME"
AVR_RECIPE=${AVR_RECIPE:-recipes/llama3_8b.yaml}
# NCCL over InfiniBand on H100 clusters; adjust to your fabric.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22} CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# shellcheck source=slurm/lib/avr_job.sh
source "$AVR_HOME/slurm/lib/avr_job.sh"
avr_main "$AVR_SCRIPT" "$@"
