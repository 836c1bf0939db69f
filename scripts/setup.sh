#!/usr/bin/env bash
# Set up swift-sophia on a fresh machine: a virtual environment in .venv (or the active one), torch kept if
# present (GPU clusters keep their CUDA build), the CPU build of torch where there is none and no GPU, then the
# package with its dependencies.
#   bash scripts/setup.sh            # creates ./.venv
#   SOPHIA_VENV=/path/env bash scripts/setup.sh
#   EXTRAS=test,deepspeed,triton,liger,eval bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${EXTRAS:-test,deepspeed,triton,liger,eval}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv="${SOPHIA_VENV:-.venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
python -m pip install -q --upgrade "pip>=23" setuptools wheel
if python -c "import torch" 2>/dev/null; then
  echo "keeping torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q torch
else
  # CPU machine: the CPU build (a local wheel where the machine has one, else PyTorch's CPU index).
  python -m pip install -q "torch==2.13.0" 2>/dev/null \
    || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[${extras}]"
# decord's only wheel is tagged manylinux2010 + py3-none, which newer pip's check flags although it works.
python -m pip check | grep -v "^decord .* is not supported on this platform" || true
echo "swift-sophia installed into $(python -c 'import sys; print(sys.prefix)')"
echo "plugin: $(sophia plugin-path)"
