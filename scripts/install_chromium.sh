#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the browser test of the Gradio app (tests/training/test_app.py).
# Idempotent: does nothing when `chromium` is already on PATH. Needs root (CI runs as root); set SUDO=sudo otherwise.
set -euo pipefail
SUDO="${SUDO:-}"
if command -v chromium >/dev/null 2>&1; then
  echo "chromium already installed: $(command -v chromium)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
command -v chromium
