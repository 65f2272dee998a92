# The `train` role image: Megatron-Core training with Transformer Engine and apex.
#
# Base: an NGC PyTorch image, whose torch, Transformer Engine, apex, NCCL and CUDA libraries are
# built and tested together (TE's PyTorch extension is source-only on PyPI and would otherwise
# be compiled against the installed torch). On top: every other package of
# requirements/train.txt at its locked version, then avr-megatron itself.
#
#   docker build -f containers/train.Dockerfile -t avr-train .       (from the repository root)
#   docker build -f containers/train.Dockerfile --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<tag> .
#
# Pick a base whose torch is within pyproject.toml's range for the `megatron` extra
# (torch>=2.13,<2.15): the build ends by printing `avr info --role train`, which lists every
# package of the role with its version. See containers/README.md for enroot / .sqsh.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.08-py3
FROM ${BASE_IMAGE}

# NGC images pin their own builds through PIP_CONSTRAINT; the packages the base provides are
# left out of the install below instead, so the constraint file is not needed.
ENV PIP_CONSTRAINT="" \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/avr-megatron

# The lock without what the base image builds together (torch, triton, Transformer Engine,
# apex and the CUDA libraries): --no-deps, so pip takes exactly the locked versions and leaves
# the base's builds alone.
COPY requirements/train.txt requirements/train.txt
RUN grep -vE '^(torch|triton|pytorch-triton|transformer-engine[a-z0-9-]*|apex|nvidia-[a-z0-9-]+)==' \
        requirements/train.txt > /tmp/train-on-ngc.txt \
    && python -m pip install --no-cache-dir --no-deps -r /tmp/train-on-ngc.txt

COPY pyproject.toml README.md ./
COPY avr_megatron ./avr_megatron
# The role check fails the build when a package the role needs is missing.
RUN python -m pip install --no-cache-dir --no-deps . \
    && python -m avr_megatron.launch.roles train \
    && avr info --role train
