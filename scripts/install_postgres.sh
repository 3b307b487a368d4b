#!/usr/bin/env bash
# Install Debian's PostgreSQL (15) for the tests that run against a real server (tests/services.py).
# Idempotent: does nothing when an initdb already exists under /usr/lib/postgresql/*/bin. Needs root (CI runs as root);
# set SUDO=sudo otherwise. The tests start their own throwaway cluster (own data folder, own port), so the Debian
# cluster service that the package may start is stopped again: nothing is left listening on 5432.
set -euo pipefail
SUDO="${SUDO:-}"
shopt -s nullglob
found=(/usr/lib/postgresql/*/bin/initdb)
if [ ${#found[@]} -gt 0 ]; then
  echo "postgresql already installed: ${found[*]}"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql
# Stop any cluster the package started (containers without systemd start it through pg_ctlcluster).
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name _port status _rest; do
    if [ "$status" = "online" ]; then
      $SUDO pg_ctlcluster "$ver" "$name" stop || true
    fi
  done || true
fi
found=(/usr/lib/postgresql/*/bin/initdb)
if [ ${#found[@]} -eq 0 ]; then
  echo "error: postgresql installed but no /usr/lib/postgresql/*/bin/initdb found" >&2
  exit 1
fi
echo "postgresql installed: ${found[*]}"
