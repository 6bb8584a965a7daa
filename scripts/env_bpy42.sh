# Sourced after env.sh: makes sure .venv-bpy42 exists, a Python 3.11 environment with bpy 4.2.0
# (the manifest's blender_version_min), so the Blender tests also run against Blender 4.2 LTS.
#
# Only bpy and numpy are installed into it (bpy 4.2.0 is a ~350 MB wheel, cp311 only). pytest,
# torch, diffusers and the rest come from .venv through a .pth file, which Python appends to
# sys.path after the environment's own site-packages: bpy 4.2 is found first, everything else
# is shared instead of installed twice. Re-created when the pins below or .venv's location change
# (a stamp file holds them).
# Sets BPY42_PY.
set -euo pipefail
: "${ROOT:?source env.sh first}" "${VENV:?source env.sh first}"
BPY42_VENV="$ROOT/.venv-bpy42"
BPY42_PINS="bpy==4.2.0 numpy==1.26.4"
BPY42_STAMP="$BPY42_VENV/.requirements"
PYTHON311_BIN="${PYTHON311:-python3.11}"

if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "$VENV is not Python 3.11; the bpy 4.2 environment shares its packages, so it must be." >&2
    return 1 2>/dev/null || exit 1
fi
shared_site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
bpy42_want="$BPY42_PINS $shared_site"
if [ ! -x "$BPY42_VENV/bin/python" ] || [ "$(cat "$BPY42_STAMP" 2>/dev/null)" != "$bpy42_want" ]; then
    if ! command -v "$PYTHON311_BIN" >/dev/null; then
        echo "bpy 4.2 needs Python 3.11 ($PYTHON311_BIN not found; set PYTHON311 to its path)." >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "Setting up $BPY42_VENV (bpy 4.2.0 for the Blender 4.2 tests)..." >&2
    rm -rf "$BPY42_VENV"
    "$PYTHON311_BIN" -m venv "$BPY42_VENV"
    # shellcheck disable=SC2086  # the pins are separate arguments
    "$BPY42_VENV/bin/python" -m pip install --quiet $BPY42_PINS
    bpy42_site="$("$BPY42_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$shared_site" > "$bpy42_site/zz_shared_dot_venv.pth"
    echo "$bpy42_want" > "$BPY42_STAMP"
fi
BPY42_PY="$BPY42_VENV/bin/python"
