#!/usr/bin/env bash
# Build the extension zip with Blender's own extension builder, validate it, print its path.
#
#   scripts/build_extension.sh [OUTPUT_DIR]        (default: dist/)
#
# With $BLENDER (a Blender 4.2+ binary) it runs `blender --command extension build/validate`;
# otherwise the same builder from the bpy module in .venv (blender_ext.py inside the bpy wheel;
# $PYTHON picks another Python that has bpy). What goes into the zip is blender_manifest.toml's
# [build] paths_exclude_pattern. Exit status non-zero when building or validating fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

if [ -n "${BLENDER:-}" ]; then
    ext() { "$BLENDER" --background --factory-startup --command extension "$@"; }
else
    if ! BLENDER_EXT="$("$PYTHON" - <<'PY'
import glob, importlib.util, sys
spec = importlib.util.find_spec("bpy")
if spec is None:
    sys.exit("bpy is not installed in this Python")
found = sorted(glob.glob(spec.submodule_search_locations[0] + "/*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
if not found:
    sys.exit("blender_ext.py not found inside the bpy module")
print(found[0])
PY
)"; then
        echo "error: no extension builder: set BLENDER=/path/to/blender, or PYTHON to a Python with bpy" >&2
        exit 1
    fi
    ext() { "$PYTHON" "$BLENDER_EXT" "$@"; }
fi

# The zip is named after the manifest's id and version; remove an old one so a failed build cannot leave it.
name="$(sed -n 's/^id *= *"\(.*\)"/\1/p' "$ROOT/blender_manifest.toml")-$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/blender_manifest.toml").zip"
rm -f "$OUT/$name"
ext build --source-dir "$ROOT" --output-dir "$OUT" >&2
if [ ! -f "$OUT/$name" ]; then
    echo "error: the build did not write $OUT/$name" >&2
    exit 1
fi
ext validate "$OUT/$name" >&2
echo "$OUT/$name"
