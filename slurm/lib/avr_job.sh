#!/usr/bin/env bash
# Shared body of slurm/avr_*.sh (sourced, not run): runs one `avr` stage as one process per GPU
# across the job's nodes, forwards the pre-timeout signal so training checkpoints, and requeues
# the job when training stopped for a checkpoint (exit 75) so that it resumes.
#
# Inputs (environment; the wrapper script sets AVR_RECIPE):
#   AVR_RECIPE     recipe YAML (the wrapper's default; override: AVR_RECIPE=... sbatch ...)
#   STAGE          smoke | sft | dpo | logps  (default sft), or AVR_CMD="synth stage1" etc.
#   AVR_PYTHON     Python with avr_megatron installed, the train environment (default: the
#                  repository's .venv/bin/python; an error naming AVR_PYTHON when there is none)
#   AVR_CONTAINER_IMAGE  run the processes in this container (pyxis: srun --container-image),
#                  with AVR_CONTAINER_MOUNTS (srun --container-mounts) and AVR_CONTAINER_PYTHON
#                  (default python); AVR_PYTHON then only reads the recipe on the batch host
#                  (the launch environment suffices)
#   AVR_LOG_DIR    per-stage logs (default: <run.dir>/logs)
#   AVR_MAX_REQUEUES  requeues after a checkpoint-and-stop before giving up (default 20)
#   DRYRUN=1       print the plan (resources, parallel layout, commands) and exit
#   Script arguments are recipe overrides (key=value), e.g. run.dir=/lustre/me/avr70b.

avr_log() { echo "avr_job[${SLURM_JOB_ID:-dryrun}]: $*" >&2; }

avr_die() { avr_log "error: $*"; exit 2; }

# STAGE -> the `avr` subcommand words.
avr_stage_command() {
  if [[ -n ${AVR_CMD:-} ]]; then echo "$AVR_CMD"; return; fi
  case ${STAGE:-sft} in
    smoke) echo "smoke" ;;
    sft|rsft|thought_sft) echo "train sft" ;;
    dpo|stage1_dpo|stage2_dpo) echo "train dpo" ;;
    logps) echo "logps" ;;
    *) avr_die "STAGE=${STAGE} is not one of smoke, sft, rsft, thought_sft, dpo, stage1_dpo, stage2_dpo, logps (or set AVR_CMD)" ;;
  esac
}

# Rank 0's address and a rendezvous port, from Slurm: the first node's NodeAddr (node names
# need not resolve), a port from the job id and the restart count (a requeued job must not meet
# the socket of its previous run). avr_megatron/runtime/distributed.py reads these plus
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID in each srun task.
avr_rendezvous() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  addr=$(scontrol show node "$first" -o 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
  export MASTER_ADDR=${MASTER_ADDR:-${addr:-$first}}
  export MASTER_PORT=${MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID * 4 + ${SLURM_RESTART_COUNT:-0} % 4) % 20000 ))}
}

# The value of an #SBATCH option in the job script ($1), for the dry run outside a job.
avr_sbatch_opt() {
  sed -n "s/^#SBATCH --$2[= ]\([^ ]*\).*/\1/p" "$1" | tail -n 1
}

# The Python that reads the recipe (and, without a container, runs the processes): AVR_PYTHON,
# else the repository's .venv. Checked before anything else runs, so a missing environment is
# reported as such (not as a traceback followed by a wrong diagnosis).
avr_python() {
  local py=() what
  if [[ -n ${AVR_PYTHON:-} ]]; then
    read -r -a py <<<"$AVR_PYTHON"  # may carry words: "env X=1 /venv/bin/python"
    what="AVR_PYTHON=$AVR_PYTHON"
  elif [[ -x $AVR_HOME/.venv/bin/python ]]; then
    py=("$AVR_HOME/.venv/bin/python")
    what="the repository's environment $AVR_HOME/.venv"
  else
    avr_die "no Python environment: $AVR_HOME/.venv does not exist and AVR_PYTHON is not set." \
      "Create .venv from requirements/train.txt (README: On a cluster) or set AVR_PYTHON to the" \
      "Python that has avr_megatron installed${AVR_CONTAINER_IMAGE:+ (with AVR_CONTAINER_IMAGE the launch environment suffices)}"
  fi
  local err
  if ! err=$("${py[@]}" -c 'import avr_megatron.launch.plan' 2>&1); then
    avr_die "$what cannot import avr_megatron (${err##*$'\n'}): set AVR_PYTHON to the Python" \
      "of an environment with avr_megatron and its requirements installed (requirements/train.txt," \
      "then pip install --no-deps -e .)"
  fi
  AVR_PY=("${py[@]}")
}

# avr_main SCRIPT [key=value ...]
avr_main() {
  local script=$1; shift
  [[ -n ${AVR_RECIPE:-} ]] || avr_die "AVR_RECIPE is not set"
  local AVR_PY=() py=()
  avr_python
  py=("${AVR_PY[@]}")
  [[ -f $AVR_RECIPE ]] || avr_die "recipe $AVR_RECIPE not found (run from the repository root or set AVR_RECIPE to an absolute path)"
  local words cmd=() overrides=("$@")
  words=$(avr_stage_command)
  read -r -a cmd <<<"$words"
  local stage=${STAGE:-sft}
  [[ -n ${AVR_CMD:-} && -z ${STAGE:-} ]] && stage=${words// /_}
  # Inside a job Slurm's variables say what was granted; outside (DRYRUN=1 bash slurm/...)
  # the script's own #SBATCH lines say what would be asked for.
  local nodes per_node gpus time_limit
  nodes=${SLURM_JOB_NUM_NODES:-$(avr_sbatch_opt "$script" nodes)}
  per_node=${SLURM_NTASKS_PER_NODE:-$(avr_sbatch_opt "$script" ntasks-per-node)}
  gpus=${SLURM_GPUS_PER_NODE:-$(avr_sbatch_opt "$script" gpus-per-node)}
  time_limit=$(avr_sbatch_opt "$script" time)
  nodes=${nodes:-1}; per_node=${per_node%%(*}; per_node=${per_node:-1}
  local ntasks=${SLURM_NTASKS:-$(( nodes * per_node ))}

  # The recipe's parallel layout for this world size (also checks it divides), and run.dir.
  local plan dry=()
  [[ ${DRYRUN:-0} == 1 ]] && dry=(--dryrun)
  plan=$("${py[@]}" -m avr_megatron.launch.plan --recipe "$AVR_RECIPE" --world-size "$ntasks" \
         --command "$words" "${dry[@]}" "${overrides[@]}") \
    || avr_die "the recipe is not ready for this job (see the message above: the key named)"
  local run_dir
  run_dir=$(sed -n 's/^run.dir: //p' <<<"$plan")
  local log_dir=${AVR_LOG_DIR:-$run_dir/logs}
  # In a container the processes use its Python (pyxis/enroot flags go to srun).
  local container=() task_py=("${py[@]}")
  if [[ -n ${AVR_CONTAINER_IMAGE:-} ]]; then
    container=(--container-image="$AVR_CONTAINER_IMAGE" --container-workdir="$AVR_HOME")
    [[ -n ${AVR_CONTAINER_MOUNTS:-} ]] && container+=(--container-mounts="$AVR_CONTAINER_MOUNTS")
    read -r -a task_py <<<"${AVR_CONTAINER_PYTHON:-python}"
  fi
  local avr=("${task_py[@]}" -m avr_megatron.cli.main "${cmd[@]}" --recipe "$AVR_RECIPE" "${overrides[@]}")

  if [[ ${DRYRUN:-0} == 1 ]]; then
    echo "stage:     $stage (avr $words)"
    echo "recipe:    $AVR_RECIPE"
    echo "resources: ${nodes} node(s) x ${per_node} task(s) per node = ${ntasks} processes (one per GPU), GPUs per node: ${gpus:-0}, time limit: ${time_limit:-partition default}"
    echo "sbatch:    $(grep '^#SBATCH' "$script" | sed 's/^#SBATCH //' | tr '\n' ' ')"
    echo "$plan"
    echo "logs:      $log_dir/$stage.<jobid>.rank<N>.log"
    echo "python:    $(printf '%q ' "${py[@]}")(reads the recipe${AVR_CONTAINER_IMAGE:+; the processes run in container $AVR_CONTAINER_IMAGE})"
    echo "command:   srun --kill-on-bad-exit=1 $(printf '%q ' "${container[@]}" "${avr[@]}")"
    return 0
  fi

  [[ -n ${SLURM_JOB_ID:-} ]] || avr_die "not inside a Slurm job (submit with sbatch, or DRYRUN=1)"
  mkdir -p "$log_dir"
  avr_rendezvous
  avr_log "stage $stage on $SLURM_JOB_NODELIST ($ntasks processes), restart ${SLURM_RESTART_COUNT:-0}, rendezvous $MASTER_ADDR:$MASTER_PORT"
  avr_log "$(tr '\n' ' ' <<<"$plan")"
  avr_log "logs: $log_dir/$stage.$SLURM_JOB_ID.rank*.log"

  # The pre-timeout signal (#SBATCH --signal=B:USR1@...) reaches this shell only: forward it to
  # the training processes, which checkpoint and exit with 75.
  local srun_pid rc
  # shellcheck disable=SC2317  # invoked by the trap
  avr_forward() {
    avr_log "received $1: asking the training processes to checkpoint and stop"
    # srun does not forward USR1: signal the tasks of the job's steps directly.
    local steps
    steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -vE '\.(batch|extern)$' || true)
    # shellcheck disable=SC2086  # one argument per step
    [[ -n $steps ]] && scancel --signal="$1" $steps
  }
  trap 'avr_forward USR1' USR1
  trap 'avr_forward TERM' TERM
  # With B: the signal goes to the batch step's processes, srun among them, which would die of
  # it: start srun with USR1 ignored (srun sets its own handlers for the signals it forwards).
  # srun's own messages also go to a file: "task N: Exited with exit code X" says which task
  # failed first, and how (see below).
  local srun_log=$log_dir/$stage.$SLURM_JOB_ID.r${SLURM_RESTART_COUNT:-0}.srun.log
  (trap '' USR1; exec srun --kill-on-bad-exit=1 --open-mode=append \
       --output="$log_dir/$stage.$SLURM_JOB_ID.rank%t.log" "${container[@]}" "${avr[@]}" \
       2> >(tee -a "$srun_log" >&2)) &
  srun_pid=$!
  # `wait` returns early when a trapped signal arrives: keep waiting for srun itself.
  while true; do
    rc=0; wait "$srun_pid" || rc=$?  # (the wrappers run under set -e)
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  # With several processes srun's code is often the signal that ended the others
  # (--kill-on-bad-exit); the first task to exit non-zero tells the cause (2: bad input, 75:
  # checkpoint saved, ...).
  local first
  first=$(sed -n 's/.*: tasks\{0,1\} [0-9,-]*: Exited with exit code \([0-9]*\).*/\1/p' \
          "$srun_log" 2>/dev/null | head -n 1)
  [[ $rc -ne 0 && -n $first ]] && rc=$first
  tail -n 5 "$log_dir/$stage.$SLURM_JOB_ID.rank0.log" >&2 || true

  if [[ $rc -eq 75 ]]; then
    if (( ${SLURM_RESTART_COUNT:-0} < ${AVR_MAX_REQUEUES:-20} )); then
      avr_log "checkpoint saved (exit 75): requeueing job $SLURM_JOB_ID to resume"
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    avr_log "checkpoint saved (exit 75) but AVR_MAX_REQUEUES=${AVR_MAX_REQUEUES:-20} reached; resubmit to resume"
  elif [[ $rc -ne 0 ]]; then
    avr_log "stage $stage failed with exit code $rc; see $log_dir/$stage.$SLURM_JOB_ID.rank*.log"
  else
    avr_log "stage $stage finished"
  fi
  exit "$rc"
}
