"""The extension as users get it: the manifest validates, the zip builds lean, installs, enables, disables."""

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.blender


def blender_ext() -> Path:
    import importlib.util

    base = Path(importlib.util.find_spec("bpy").submodule_search_locations[0])
    found = sorted(base.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    assert found, "blender_ext.py not found inside the bpy module"
    return found[0]


def run_ext(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(blender_ext()), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory) -> Path:
    """The zip as scripts/build_extension.sh builds and validates it (with this Python's bpy)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_extension.sh"), str(out)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success parsing TOML" in result.stderr, "the script must validate the zip it built"
    zips = list(out.glob("*.zip"))
    assert len(zips) == 1 and result.stdout.strip().splitlines()[-1] == str(zips[0]), (zips, result.stdout)
    return zips[0]


def test_manifest_validates():
    result = run_ext("validate", str(REPO_ROOT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_zip_holds_the_addon_and_backend_but_no_development_files(built_zip):
    assert built_zip.name == "mvdiff_blender-0.1.0.zip"
    names = zipfile.ZipFile(built_zip).namelist()
    for needed in ("blender_manifest.toml", "__init__.py", "LICENSE", "mvdiff_blender/operators.py",
                   "mvdiff_blender/installer.py", "mvdiff_blender/install_backend.py", "backend/__main__.py",
                   "backend/protocol.py", "backend/server/app.py", "backend/engine.py", "requirements/backend.lock",
                   "requirements/torch.txt"):
        assert needed in names, f"{needed} missing from the zip"
    for banned in ("tests/", "scripts/", "docs/", "backend/train/", ".venv/", "out/", ".git/", "__pycache__/"):
        assert not [n for n in names if n.startswith(banned) or f"/{banned}" in n], f"{banned} is in the zip"
    assert "requirements/dev.txt" not in names and "pyproject.toml" not in names
    assert built_zip.stat().st_size < 2 * 2**20
    assert run_ext("validate", str(built_zip)).returncode == 0


def test_addon_imports_only_blender_numpy_stdlib_and_the_wire_modules():
    """Blender's Python has none of the backend's packages: the add-on must not need them."""
    allowed_backend = {"protocol", "client", "validation", "sampling_options", "atomic", "geometry.cameras",
                       "geometry.mesh", "models.catalog"}
    stdlib = set(sys.stdlib_module_names)
    for path in sorted((REPO_ROOT / "mvdiff_blender").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom) and node.level == 2:
                parts = (node.module or "").split(".")
                assert parts[0] == "backend", f"{path.name}: {node.module}"
                lights = [".".join(parts[1:])] if len(parts) > 1 else [alias.name for alias in node.names]
                assert all(light in allowed_backend for light in lights), f"{path.name}: {node.module} {lights}"
                continue
            else:
                continue
            for root in roots:
                assert root in stdlib or root in ("bpy", "mathutils", "bpy_extras", "numpy", "addon_utils"), \
                    f"{path.name} imports {root}"


BLOCKED_IMPORT_SCRIPT = r"""
import importlib, importlib.abc, os, pkgutil, sys, tempfile
from pathlib import Path

BLOCKED = {"torch", "diffusers", "transformers", "xatlas", "safetensors", "huggingface_hub", "fastapi",
           "imageio", "scipy"}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not in Blender's Python")
        return None


sys.meta_path.insert(0, Refuse())
import bpy  # noqa
import addon_utils

repo_root = Path(sys.argv[-1])
repo_dir = Path(tempfile.mkdtemp(prefix="mvdiff-ext-repo-"))
(repo_dir / "mvdiff_blender").symlink_to(repo_root, target_is_directory=True)
bpy.context.preferences.extensions.repos.new(name="guard", module="guard", custom_directory=str(repo_dir))
module = addon_utils.enable("bl_ext.guard.mvdiff_blender", default_set=True, handle_error=None)
assert module is not None
package = importlib.import_module("bl_ext.guard.mvdiff_blender.mvdiff_blender")
names = [info.name for info in pkgutil.iter_modules(package.__path__)]
for name in names:
    importlib.import_module(f"{package.__name__}.{name}")
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
assert not loaded, loaded
print("IMPORTED", len(names))
"""


def test_every_addon_module_imports_where_the_backend_packages_are_missing(tmp_path):
    """Transitively: a backend module the add-on imports must not pull in torch and the like either."""
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "resources")}
    done = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT_SCRIPT, str(REPO_ROOT)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    count = len([p for p in (REPO_ROOT / "mvdiff_blender").glob("*.py") if p.name != "__init__.py"])
    assert f"IMPORTED {count}" in done.stdout


INSTALL_SCRIPT = r"""
import json, sys
import bpy, addon_utils
zip_path = sys.argv[-1]
bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
module = "bl_ext.user_default.mvdiff_blender"
report = {"enabled": module in bpy.context.preferences.addons}
report["operators"] = [name for name in ("texture", "make_world", "cancel", "place_cameras", "backend_start")
                       if hasattr(bpy.types, "MVDIFF_OT_" + name)]
report["scene_props"] = hasattr(bpy.context.scene, "mvdiff")
report["panels"] = [p for p in ("MVDIFF_PT_texture", "MVDIFF_PT_environment") if hasattr(bpy.types, p)]
prefs = bpy.context.preferences.addons[module].preferences
report["prefs"] = prefs.bl_rna.identifier if prefs else None
report["user_folder"] = bpy.utils.extension_path_user(module, path="logs", create=True)
addon_utils.disable(module, default_set=True)
report["disabled"] = module not in bpy.context.preferences.addons
report["props_after_disable"] = hasattr(bpy.types.Scene, "mvdiff")
report["panels_after_disable"] = [p for p in ("MVDIFF_PT_texture",) if hasattr(bpy.types, p)]
print("REPORT " + json.dumps(report))
"""


def test_built_zip_installs_enables_and_disables_cleanly(built_zip, tmp_path):
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "user")}
    result = subprocess.run([sys.executable, "-c", INSTALL_SCRIPT, str(built_zip)], capture_output=True, text=True,
                            timeout=120, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["enabled"] and report["scene_props"] and report["prefs"]
    assert len(report["operators"]) == 5 and len(report["panels"]) == 2
    assert report["user_folder"].startswith(str(tmp_path / "user"))
    assert report["disabled"] and not report["props_after_disable"] and not report["panels_after_disable"]
    installed = tmp_path / "user" / "extensions" / "user_default" / "mvdiff_blender"
    assert (installed / "backend" / "protocol.py").is_file()


@pytest.mark.slow
def test_backend_runs_from_the_zip_without_training_code(built_zip, tmp_path):
    """The zip leaves backend/train out: the server and jobs still import, and train says why it is missing."""
    zipfile.ZipFile(built_zip).extractall(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    imports = subprocess.run([sys.executable, "-c", "import backend.engine, backend.server.app, backend.cli_jobs, "
                              "backend.demo, backend.bench; import backend.__main__"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp_path)
    assert imports.returncode == 0, imports.stderr
    train = subprocess.run([sys.executable, "-m", "backend", "train", "--config", "x.json"], capture_output=True,
                           text=True, timeout=60, env=env, cwd=tmp_path)
    assert train.returncode == 2 and "not part of the extension build" in train.stderr, train.stderr
    assert "serve" in subprocess.run([sys.executable, "-m", "backend", "--help"], capture_output=True, text=True,
                                     timeout=60, env=env, cwd=tmp_path).stdout
