# The `synth` role image: vLLM synthesis, pair building and evaluation (no Megatron, no TE).
#
# Base: the vLLM OpenAI image of the release requirements/synth.txt locks (its torch, CUDA
# kernels and flashinfer are built together). On top: the rest of requirements/synth.txt at
# its locked versions (what the image already has at those versions is kept), then
# avr-megatron itself.
#
#   docker build -f containers/synth.Dockerfile -t avr-synth .       (from the repository root)
#
# See containers/README.md for enroot / .sqsh.
ARG BASE_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/avr-megatron

COPY requirements/synth.txt requirements/synth.txt
RUN python3 -m pip install --no-cache-dir -r requirements/synth.txt

COPY pyproject.toml README.md ./
COPY avr_megatron ./avr_megatron
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -m avr_megatron.launch.roles synth \
    && avr info --role synth

# The base image starts the OpenAI server; pyxis (srun --container-image) and `docker run`
# run the command they are given.
ENTRYPOINT []
CMD ["avr", "info"]
