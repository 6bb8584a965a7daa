#!/usr/bin/env bash
# Runs the whole test suite and the linter. Creates .venv on first use.
# Extra arguments go to pytest, e.g. scripts/test.sh -k bake -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

echo "== ruff check"
"$VENV/bin/ruff" check backend mvdiff_blender tests scripts __init__.py

echo "== pytest"
# Blender writes user preferences and caches under this folder, not into the home directory.
BLENDER_USER_RESOURCES="$(mktemp -d)"
export BLENDER_USER_RESOURCES
trap 'rm -rf "$BLENDER_USER_RESOURCES"' EXIT
set +e
"$PY" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing, a suite that runs nothing proves nothing." >&2
    exit 1
fi
exit "$status"
