# syntax=docker/dockerfile:1
#
# iip-vllm: GPU LLM steps (labeling, evolution, responses, judging, loss scoring) with vLLM's offline
# engine, and the vLLM OpenAI-compatible server of helm/iip (which overrides the command with
# `python -m vllm.entrypoints.openai.api_server`).
#
#   docker build -f docker/vllm.Dockerfile -t iip-vllm:0.1.0 .
#
# The base image brings CUDA, torch and vLLM built together; installing `.[gpu]` keeps them as they are
# (constraints below) and adds our package and its dependencies.

ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- wheel: the project wheel, built once ----
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operators ./operators
RUN pip wheel --no-deps --wheel-dir /dist .

# ---- runtime ----
FROM ${VLLM_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /dist /tmp/dist
# Freeze what the base image built together (torch, vLLM, kernels) so resolving our dependencies
# cannot swap them; then make sure `python` is the interpreter that has them.
RUN set -eux; \
    export PIP_BREAK_SYSTEM_PACKAGES=1; \
    py="$(command -v python3)"; \
    "$py" -m pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|vllm|xformers|triton|flashinfer-python|transformers|tokenizers|numpy)==' \
      > /tmp/keep.txt; \
    "$py" -m pip install --constraint /tmp/keep.txt "$(ls /tmp/dist/*.whl)[gpu]"; \
    command -v python >/dev/null 2>&1 || ln -s "$py" /usr/local/bin/python; \
    rm -rf /tmp/dist /tmp/keep.txt /root/.cache; \
    python -c "import operators, vllm"
RUN groupadd --gid 10001 iip \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin iip
# Read-only root filesystem: every cache (HF, vLLM, torch.compile, Triton, outlines) lives under /tmp.
ENV HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/hf \
    VLLM_CACHE_ROOT=/tmp/vllm \
    VLLM_CONFIG_ROOT=/tmp/vllm-config \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor \
    OUTLINES_CACHE_DIR=/tmp/outlines \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["python", "-m", "operators"]
CMD ["steps"]
