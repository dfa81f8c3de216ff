#!/usr/bin/env bash
# Create .venv and install peftbooth with its test tools.
# CPU machines: the pinned CPU torch is installed first, so no multi-GB CUDA build is pulled in.
# GPU machines: set TORCH_SPEC to your CUDA torch (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124")
# or install torch into .venv before running this; an importable torch is kept as it is.
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
