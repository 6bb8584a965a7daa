"""The headless scripts as a pipeline calls them: help without ``--``, and every refusal ends with the
JSON line ``{"ok": false, "error": ...}`` and exit code 1 (never a bare traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.blender

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(script: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(SCRIPTS.parent), COLUMNS="400")
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=str(SCRIPTS.parent))


def _refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["ok"] is False, last
    return last["error"]


def test_help_works_without_the_separator_and_names_the_defaults(tmp_path):
    proc = _run("texture_scene.py", "--help", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from backend.sampling_options import DEFAULT_STEPS

    assert "--prompt" in proc.stdout
    assert f"denoising steps (default: the file's setting; {DEFAULT_STEPS} in a new file)" in proc.stdout


def test_refusals_end_with_the_json_line_and_exit_code_1(tmp_path, addon):
    import bpy

    assert "Nope" in _refusal(_run("texture_scene.py", "--", "--prompt", "x", "--objects", "Nope", home=tmp_path))
    assert "Write a prompt first" in _refusal(_run("make_hdri.py", "--prompt", "", home=tmp_path))
    assert "no .blend file" in _refusal(_run("texture_scene.py", str(tmp_path / "missing.blend"), "--prompt", "x",
                                             home=tmp_path))

    # A refusal inside the operator (before any backend is needed): a mesh already at 8 UV maps.
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.object
    while len(cube.data.uv_layers) < 8:
        cube.data.uv_layers.new()
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "full.blend"))
    error = _refusal(_run("texture_scene.py", str(tmp_path / "full.blend"), "--", "--prompt", "x", "--cameras", "orbit",
                          home=tmp_path))
    assert "already has 8 UV maps" in error and not error.startswith("Error:")
