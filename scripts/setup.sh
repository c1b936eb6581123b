#!/usr/bin/env bash
# Create .venv and install adapters-mgr with its test tools, without ever pulling a CUDA torch
# onto a CPU-only machine.
#
#   bash scripts/setup.sh                 # CPU build of torch unless an NVIDIA GPU is present
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash scripts/setup.sh   # pick a CUDA build
#
# Order of preference for torch: a local wheel pip already knows about (find-links / wheelhouse),
# then the CPU wheel index on machines without `nvidia-smi`, then the default index (CUDA builds).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
elif wheel_dir=$(mktemp -d) && "${PIP[@]}" download -q --no-deps --no-index "$TORCH_SPEC" -d "$wheel_dir" 2>/dev/null; then
  "${PIP[@]}" install -q "$wheel_dir"/torch-*.whl   # a wheel pip's find-links already holds (no network)
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" install -q "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
else
  "${PIP[@]}" install -q "$TORCH_SPEC"
fi

# torch is already satisfied, so this never replaces it (pyproject constrains it below 2.14 too).
"${PIP[@]}" install -q -e ".[dev]"
echo "ready: $VENV/bin/adapters-mgr ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
