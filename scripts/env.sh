# Sourced by the other scripts: makes sure .venv exists with the pinned dependencies.
# Re-installs when requirements/dev.txt changes (a stamp file holds its hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/requirements/dev.txt"
STAMP="$VENV/.requirements.sha256"
PYTHON_BIN="${PYTHON:-python3}"

want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "Setting up $VENV (pinned dependencies, CPU build of torch)..." >&2
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # One pip command for everything, so torch==2.13.0 (the CPU build) is resolved together
    # with the packages that depend on it.
    "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
    echo "$want" > "$STAMP"
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="$VENV/bin/python"
