# Sourced by the other scripts: makes sure .venv exists with the pinned dependencies.
# Re-installs when requirements/dev.txt or the files it includes (backend.lock, torch.txt) change
# (a stamp file holds their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/requirements/dev.txt"
STAMP="$VENV/.requirements.sha256"
PYTHON_BIN="${PYTHON:-python3}"

want="$(cat "$REQUIREMENTS" "$ROOT/requirements/backend.lock" "$ROOT/requirements/torch.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "Setting up $VENV (pinned dependencies, CPU build of torch)..." >&2
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # One pip command for everything (dev.txt includes torch.txt and backend.lock), so the torch
    # pin (here the CPU build) is resolved together with the packages that depend on it.
    "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
    echo "$want" > "$STAMP"
fi

# The bpy wheel links against X11/GL client libraries that a bare machine may lack.
bpy_lib="$(ls "$VENV"/lib/python3*/site-packages/bpy/__init__.so 2>/dev/null | head -n 1)"
if [ -n "$bpy_lib" ] && ldd "$bpy_lib" 2>/dev/null | grep -q "not found"; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "Installing the system libraries bpy needs..." >&2
        apt-get update -qq && apt-get install -y -qq libgl1 libx11-6 libxi6 libxkbcommon0 libxrender1 \
            libxfixes3 libxext6 libsm6 >/dev/null
    else
        echo "bpy is missing system libraries (see 'ldd $bpy_lib'); install them with your package manager." >&2
    fi
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="$VENV/bin/python"
