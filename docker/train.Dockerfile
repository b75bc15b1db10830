# syntax=docker/dockerfile:1
#
# iip-train: two-stage supervised fine-tuning with DeepSpeed ZeRO-3 on GPU nodes.
#
#   docker build -f docker/train.Dockerfile -t iip-train:0.1.0 .
#   docker build -f docker/train.Dockerfile --build-arg TORCH_CUDA_ARCH_LIST="9.0" -t iip-train:0.1.0 .
#
# Built on the CUDA devel image so DeepSpeed's fused ops are compiled ahead of time (a read-only pod
# without a compiler cannot JIT-build them), then copied as a virtualenv onto the smaller runtime image
# of the same torch build. torch==2.13.0 matches the project's pin.

ARG TORCH_DEVEL_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
ARG TORCH_RUNTIME_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- wheel: the project wheel, built once ----
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operators ./operators
RUN pip wheel --no-deps --wheel-dir /dist .

# ---- build: DeepSpeed with precompiled ops + our package, in a venv over the base's torch ----
FROM ${TORCH_DEVEL_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEEPSPEED_VERSION=0.19.8
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1
RUN python -m venv --system-site-packages /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY --from=wheel /dist /dist
RUN set -eux; \
    python -m pip list --format=freeze | grep -iE '^(torch|numpy)==' > /tmp/keep.txt; \
    pip install "setuptools>=70,<85" "wheel>=0.43" "ninja>=1.11" "packaging>=24"; \
    pip install --no-build-isolation --constraint /tmp/keep.txt "deepspeed==${DEEPSPEED_VERSION}"; \
    pip install --constraint /tmp/keep.txt "$(ls /dist/*.whl)[train]"; \
    python -m compileall -q -j 0 /opt/venv/lib; \
    python -c "import operators, deepspeed, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# ---- runtime ----
FROM ${TORCH_RUNTIME_IMAGE} AS runtime
RUN groupadd --gid 10001 iip \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin iip
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem: caches and DeepSpeed/Triton scratch under /tmp (the pod's emptyDir).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/hf \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["python", "-m", "operators"]
CMD ["steps"]
