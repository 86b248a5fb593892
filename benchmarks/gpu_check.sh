#!/usr/bin/env bash
# One prepared GPU check (benchmarks/gpu_check.py says what it measures): one command, no network.
#   bash benchmarks/gpu_check.sh [--smoke]      # JSON to $OUT/gpu_check.json, else benchmarks/out/
# Uses $PYTHON (default python3). When megatron_video's dependencies are missing it installs the
# project from this working tree with what is on the machine: wheels carried in .whl/ if present,
# else the project alone (--no-deps). Transformer Engine and flash-attn are used only if present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, megatron.core, megatron_video" >/dev/null 2>&1; then
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --find-links .whl -e . || "$PY" -m pip install -q --no-deps -e .
    else
        "$PY" -m pip install -q --no-deps -e .
    fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
