#!/usr/bin/env bash
# Create .venv and install peftbooth with its test tools.
# torch is installed first, as TORCH_SPEC (default: torch==2.13.0 from PyPI). On Linux x86-64, PyPI's torch is the
# CUDA build on every machine, GPU or not (several GB of nvidia-* packages; it also runs on the CPU). For the small
# CPU-only build: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
# For one CUDA version: TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
# A torch already importable in .venv is kept as it is (install yours there first to choose it yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
# constraints.txt pins the library versions the suite was last run with; pyproject.toml keeps ranges.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
echo "peftbooth installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
