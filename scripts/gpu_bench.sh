#!/usr/bin/env bash
# The GPU benchmark: one prepared run on a machine with an NVIDIA GPU, random SD 2-sized weights.
#
#   scripts/gpu_bench.sh [--quick] [OUT_DIR]
#
# Runs, each printing one JSON line (all collected in OUT_DIR/gpu_bench.jsonl):
#   1. bench unet --channels sd2, both tasks (depth: 8 views at 24x32 latents; panorama: 8 views at
#      64x64), float16 and bfloat16, each timing the plain and the CAA step interleaved;
#   2. bench caa on the GPU in float16 (every SD 2 level of both designs against the literal form);
#   3. bench precision on the GPU (float32, float16, bfloat16 against float64);
#   4. a panorama-to-HDRI job of 8 + 2 views at 512 x 512 and a texture job of the demo room at
#      192 x 256 (12 frames around the room, all of them keyframes), each with 50 DDIM steps and
#      with the fast scheduler at its recommended steps, through the same commands a user runs.
# --quick runs everything on the tiny models with 2 steps, to check the script itself on any machine.
#
# The GPU machine may lack diffusers, xatlas and OpenEXR: wheels in .whl/ (see docs/benchmarks.md)
# are installed into /tmp/site first when an import fails. Budget: under 8 minutes on an H100/H200.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out_dir="${1:-${OUT:-out/gpu_bench}}"
mkdir -p "$out_dir"
log="$out_dir/gpu_bench.jsonl"
: > "$log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import diffusers, xatlas, OpenEXR" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "== installing the carried wheels into /tmp/site" >&2
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
fi
"$PY" -c "import diffusers, xatlas, OpenEXR, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2

started=$(date +%s)
record() {  # record LABEL COMMAND...: run a command, keep its last line (JSON) with the label
    local label="$1"; shift
    local begin; begin=$(date +%s)
    echo "== $label: $*" >&2
    local line
    if line=$("$@" 2> >(tail -n 5 >&2) | tail -n 1); then
        printf '{"label": "%s", "wall_s": %s, "result": %s}\n' "$label" "$(( $(date +%s) - begin ))" "$line" | tee -a "$log"
    else
        printf '{"label": "%s", "wall_s": %s, "error": "exit %s"}\n' "$label" "$(( $(date +%s) - begin ))" "$?" | tee -a "$log"
    fi
}

if [ "$quick" = 1 ]; then
    channels=64,128,256,256; steps=2; fast_steps=2; models=tiny; views=3; repeats=1; size=(--width 128 --height 128)
else
    channels=sd2; steps=50; fast_steps=""; models="$out_dir/sd2_models"; views=8; repeats=5; size=()
fi
device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

for dtype in float16 bfloat16; do
    for task in depth panorama; do
        record "unet-$task-$dtype" "$PY" -m backend bench unet --json --channels "$channels" --task "$task" \
            --views "$views" --dtype "$dtype" --device "$device" --repeats "$repeats" "${size[@]}"
    done
done
if [ "$quick" = 0 ]; then
    record "caa-float16" "$PY" -m backend bench caa --json --device "$device" --dtype float16 --repeats "$repeats"
    record "precision" "$PY" -m backend bench precision --json --device "$device"
    echo "== writing random SD 2 models to $models" >&2
    "$PY" -c "import sys; from backend.models.sd2_configs import write_sd2_models; write_sd2_models(sys.argv[1])" "$models"
fi

fast=$("$PY" -c "from backend.sampling_options import FAST_SCHEDULER as f, SCHEDULERS as s; print(f, s[f].steps)")
fast_name=${fast% *}
fast_steps=${fast_steps:-${fast#* }}
"$PY" - "$out_dir/texture_job.npz" "$steps" <<'EOF'
import sys
from pathlib import Path
from backend.server.bench_job import demo_room_job
# 12 frames around the demo room at 256 x 192: every one is a keyframe, generated jointly.
Path(sys.argv[1]).write_bytes(demo_room_job(12, 256, 192, int(sys.argv[2]), 1024, loop_share=1.0).to_bytes())
EOF
job_report() {  # the report of a finished job, on one line
    "$PY" -c "import json, sys
r = json.load(open(sys.argv[1]))
keys = ('kind', 'seconds', 'scheduler', 'steps', 'keyframes', 'views', 'overlap_psnr_ratio', 'multiview_weights')
print(json.dumps({k: r[k] for k in keys if k in r}))" "$1/report.json"
}
hdri_job() {  # hdri_job SCHEDULER STEPS OUT
    "$PY" -m backend panorama --prompt "a sunlit alpine meadow" --models "$models" --scheduler "$1" --steps "$2" \
        --view-size 512 --height 1024 --out "$3" >&2
    job_report "$3"
}
texture_job() {  # texture_job SCHEDULER STEPS OUT
    "$PY" -m backend texture "$out_dir/texture_job.npz" --models "$models" --scheduler "$1" --steps "$2" --out "$3" >&2
    job_report "$3"
}
for run in "ddim $steps" "$fast_name $fast_steps"; do
    name=${run% *}; count=${run#* }
    record "hdri-$name-$count" hdri_job "$name" "$count" "$out_dir/hdri_$name"
    record "texture-$name-$count" texture_job "$name" "$count" "$out_dir/texture_$name"
done
rm -rf "$out_dir/sd2_models"
echo "== done in $(( $(date +%s) - started )) s; results in $log" >&2
