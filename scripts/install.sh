#!/usr/bin/env bash
# Create or update the project's virtual environment: the project with its pinned dependencies, then
# ColossalAI 0.5.0 without its dependencies (it pins torch<=2.5.1 and old transformers/diffusers, which would
# make a normal resolve fail; its real runtime dependencies are listed in pyproject.toml).
# `pip check` afterwards complains only about colossalai's own pins; that is expected.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -m pip install --quiet --no-deps colossalai==0.5.0
"$VENV/bin/python" -c "import torch, dagster, colossalai; print('venv ready: torch', torch.__version__, '| dagster', dagster.__version__, '| colossalai', colossalai.__version__)"
