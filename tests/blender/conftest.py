import importlib
import os
import tempfile
from pathlib import Path

import pytest

# Blender writes preferences and caches here instead of the home directory; it must be set
# before bpy is imported.
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="mvdiff-blender-"))

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_REPO = "mvdiff_dev"
EXTENSION_ID = "mvdiff_blender"
ADDON_MODULE = f"bl_ext.{DEV_REPO}.{EXTENSION_ID}"


@pytest.fixture
def bpy_empty():
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    return bpy


@pytest.fixture(scope="session")
def addon():
    """The add-on enabled as an extension from this checkout, exactly as Blender loads an installed one.

    Returns the ``mvdiff_blender`` sub-package, whose modules (``addon.cameras``...) the tests use.
    """
    import bpy  # noqa: I001  (bpy puts addon_utils on the path)
    import addon_utils

    repo_dir = Path(tempfile.mkdtemp(prefix="mvdiff-ext-repo-"))
    (repo_dir / EXTENSION_ID).symlink_to(REPO_ROOT, target_is_directory=True)
    repos = bpy.context.preferences.extensions.repos
    if DEV_REPO not in [r.module for r in repos]:
        repos.new(name=DEV_REPO, module=DEV_REPO, custom_directory=str(repo_dir))
    module = addon_utils.enable(ADDON_MODULE, default_set=True, handle_error=None)
    assert module is not None, f"could not enable {ADDON_MODULE}"
    yield importlib.import_module(f"{ADDON_MODULE}.mvdiff_blender")
    addon_utils.disable(ADDON_MODULE, default_set=True, handle_error=None)


@pytest.fixture
def scene(addon):
    """An empty scene with the add-on enabled (``read_homefile`` keeps add-ons registered)."""
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    return bpy.context.scene
