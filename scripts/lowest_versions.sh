#!/usr/bin/env bash
# A second environment, .venv-lowest, at the lowest versions of diffusers, peft, transformers and accelerate that
# pyproject.toml allows (constraints-lowest.txt), and the smoke tests there (tests/test_lowest_versions.py): train
# LoRA, LoHa and LoKr on layers as wide as SD 1.5's (so LoHa/LoKr take the factored path), generate, export.
# torch is installed as scripts/setup.sh does (TORCH_SPEC, default torch==2.13.0). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LOWEST_VENV:-.venv-lowest}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
"$VENV/bin/python" -m pip install -q -c constraints-lowest.txt -e ".[test]"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -E -i "^(torch|diffusers|peft|transformers|accelerate) "
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_lowest_versions.py "$@"
