#!/usr/bin/env bash
# Runs the main job end to end and writes its results under out/. Creates .venv on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
"$PY" -m backend demo --out "${OUT:-$ROOT/out}" "$@"
