#!/usr/bin/env bash
# Textures the demo room through the Blender add-on and gives it a 360 HDRI World, headless, on
# the tiny offline model. Writes out/demo.blend, out/demo_texture.png and out/demo_world.exr.
# Creates .venv on first use. Extra arguments go to both jobs, e.g. --models /path/to/sd2 --device cuda
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
rm -f "$OUT/demo.blend" "$OUT/demo_texture.png" "$OUT/demo_world.exr"
BLENDER_USER_RESOURCES="$(mktemp -d)"
export BLENDER_USER_RESOURCES
trap 'rm -rf "$BLENDER_USER_RESOURCES"' EXIT
MODELS=(--models tiny)
if [[ " $* " == *" --models "* ]]; then MODELS=(); fi

echo "== the demo room and its camera loop"
"$PY" scripts/build_demo_scene.py "$OUT/demo_scene.blend" --views 12

echo "== texturing it through the add-on"
"$PY" scripts/texture_scene.py "$OUT/demo_scene.blend" -- \
    --prompt "a cosy living room, wooden floor, plaster walls, fabric sofa" \
    --cameras selected --width 256 --height 192 --steps 10 --texture-size 1024 \
    --output "$OUT" --name demo_texture --save "$OUT/demo.blend" "${MODELS[@]}" "$@"

echo "== a 360 HDRI World for it"
"$PY" scripts/make_hdri.py "$OUT/demo.blend" -- \
    --prompt "a sunny garden seen through tall windows" --height 512 --view-size 128 --steps 10 \
    --output "$OUT" --name demo_world --save "$OUT/demo.blend" "${MODELS[@]}" "$@"

ls -l "$OUT/demo.blend" "$OUT/demo_texture.png" "$OUT/demo_world.exr"
