#!/usr/bin/env bash
# Runs the whole test suite and the linter, then the Blender tests again on bpy 4.2.0 (the
# manifest's oldest Blender). Creates .venv and .venv-bpy42 on first use.
# Extra arguments go to pytest, e.g. scripts/test.sh -k bake -x; with arguments the bpy 4.2 run
# is left out unless MVDIFF_BPY42=1.
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

# pytest's status, with 5 (no tests collected) as a failure: a suite that runs nothing proves nothing.
run_pytest() {
    local status=0
    "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "pytest collected no tests: failing, a suite that runs nothing proves nothing." >&2
        return 1
    fi
    return "$status"
}

run_pytest "$PY" -m pytest "$@"

if [ "$#" -eq 0 ] || [ "${MVDIFF_BPY42:-0}" = "1" ]; then
    echo "== pytest tests/blender on bpy 4.2.0"
    source "$ROOT/scripts/env_bpy42.sh"
    BLENDER_USER_RESOURCES="$BLENDER_USER_RESOURCES/bpy42"  # its own preferences and extension folders
    mkdir -p "$BLENDER_USER_RESOURCES"
    # test_demo runs scripts/demo.sh, which always uses .venv (bpy 5.0.1): nothing in it runs on 4.2.
    run_pytest "$BPY42_PY" -m pytest tests/blender -p no:cacheprovider \
        --deselect tests/blender/test_demo.py::test_demo_writes_the_textured_blend_texture_and_world "$@"
fi
