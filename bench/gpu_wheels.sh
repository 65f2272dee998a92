#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on a GPU machine without network access:
# bench/gpu_check_requirements.txt for Linux x86_64, CPython 3.12 (megatron-core 0.19 ships
# cp312 only) into bench/wheels/ (ignored by git, about 20 MB).
#
#   bench/gpu_wheels.sh [DEST]            # here, with PyPI reachable
#
# Ship them with the checkout, e.g. the device tool's `carry: ["bench/wheels"]` (at most 64 MiB
# of ignored files travel: these do; a Transformer Engine wheel, ~276 MB for its CUDA core,
# does not: use a GPU image with TE preinstalled for the TE checks).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$root/bench/wheels}
pip=(python3 -m pip)
if [[ -x "$root/.venv/bin/python" ]]; then pip=("$root/.venv/bin/python" -m pip); fi
mkdir -p "$dest"
"${pip[@]}" download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    --python-version 3.12 --implementation cp \
    --dest "$dest" -r "$root/bench/gpu_check_requirements.txt"
du -sh "$dest"
ls "$dest"
