#!/usr/bin/env bash
# GPU check: the code paths that only run on a GPU (CUDA/NCCL local spec against the CPU,
# `avr smoke`, SFT and DPO steps with tokens/s and model TFLOP/s, and with Transformer Engine
# the TE spec in bf16 and FP8 with an FP8 save and resume); the list is in bench/gpu_check.py.
# Results: bench/results/gpu_check.json. Budget: under 8 minutes on one H100.
#
#   bench/gpu_check.sh                  # on a GPU machine that has torch
#   bench/gpu_check.sh --cpu            # dry run without a GPU: tiny shapes, GPU checks skipped
#
# Options: --python PY    interpreter with torch (default: $PYTHON or python3)
#          --wheels DIR   wheels for what torch lacks (default bench/wheels, made here by
#                         bench/gpu_wheels.sh: megatron-core and small pure packages, ~20 MB),
#                         installed only when megatron-core is not importable
#          --out FILE     results file (default bench/results/gpu_check.json)
#          --only NAME..  run only these checks (last option)
# Env: AVR_GPU_CHECK_TIMEOUT (seconds for the checks, default 450).
# Exit status: 0 every check that ran passed, 1 some failed, 2 set-up problem.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

mode=gpu
py=${PYTHON:-python3}
wheels=bench/wheels
out=bench/results/gpu_check.json
only=()
while (($#)); do
    case $1 in
        --cpu) mode=cpu ;;
        --python) py=$2; shift ;;
        --wheels) wheels=$2; shift ;;
        --out) out=$2; shift ;;
        --only) shift; only=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "gpu_check: $*" >&2; exit 2; }

"$py" -c 'import torch' 2>/dev/null || die "$py cannot import torch (pass --python)"
if [[ $mode == gpu ]]; then
    "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "torch sees no CUDA device (use --cpu for the dry run)"
fi

# What torch lacks comes from the wheel folder, installed beside the checkout (no network).
deps="$root/bench/.gpu_check_deps"
if ! "$py" -c 'import megatron.core, omegaconf, yaml, tqdm, psutil' 2>/dev/null; then
    [[ -d $wheels ]] || die "megatron-core is not importable and there is no wheel folder" \
        "$wheels (make it with bench/gpu_wheels.sh on a machine with PyPI access)"
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [[ $version == 3.12 ]] || die "Python $version: the wheels (megatron-core 0.19) need 3.12"
    rm -rf "$deps"
    "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --find-links "$wheels" --target "$deps" -r bench/gpu_check_requirements.txt \
        || die "installing bench/gpu_check_requirements.txt from $wheels failed"
    export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

args=(run --out "$out")
if [[ $mode == cpu ]]; then args+=(--cpu); fi
if ((${#only[@]})); then args+=(--only "${only[@]}"); fi
"$py" -c 'import megatron.core' || die "megatron-core still not importable"
exec timeout "${AVR_GPU_CHECK_TIMEOUT:-450}" "$py" bench/gpu_check.py "${args[@]}"
