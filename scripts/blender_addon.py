"""Enable this checkout's add-on inside the bpy module (or a real Blender) for scripts and benchmarks.

Usage, before anything imports bpy::

    import blender_addon
    blender_addon.isolate_user_resources()
    addon = blender_addon.enable_addon()      # the mvdiff_blender sub-package: addon.cameras, ...

The add-on is loaded the way Blender loads an installed extension (a local extension repository
whose folder holds a link to this checkout), so its modules see the same package layout as in a
user's Blender. An extension the user already installed and enabled is reused instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_REPO = "mvdiff_dev"
EXTENSION_ID = "mvdiff_blender"


def isolate_user_resources() -> None:
    """Keep the bpy module's preferences and caches out of the home directory (before ``import bpy``)."""
    if "bpy" not in sys.modules:
        os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="mvdiff-blender-"))


def script_args() -> list[str]:
    """The script's own arguments: after ``--`` inside a real Blender, else ``sys.argv[1:]``."""
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1:]
    return sys.argv[1:]


def _enabled_extension() -> str | None:
    import bpy

    for name in bpy.context.preferences.addons.keys():
        if name.startswith("bl_ext.") and name.rpartition(".")[2] == EXTENSION_ID:
            return name
    return None


def enable_addon() -> ModuleType:
    """The add-on's ``mvdiff_blender`` sub-package, enabled as an extension (reusing an enabled one)."""
    isolate_user_resources()
    import bpy  # noqa: I001  (bpy puts addon_utils on the path)
    import addon_utils

    name = _enabled_extension()
    if name is None:
        repos = bpy.context.preferences.extensions.repos
        repo = next((r for r in repos if r.module == DEV_REPO), None)
        if repo is None:
            repo_dir = Path(tempfile.mkdtemp(prefix="mvdiff-ext-repo-"))
            repos.new(name=DEV_REPO, module=DEV_REPO, custom_directory=str(repo_dir))
        else:
            repo_dir = Path(repo.directory)
        link = repo_dir / EXTENSION_ID
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        name = f"bl_ext.{DEV_REPO}.{EXTENSION_ID}"
        if addon_utils.enable(name, default_set=True, handle_error=None) is None:
            raise RuntimeError(f"could not enable the add-on {name} from {REPO_ROOT}")
    return importlib.import_module(f"{name}.{EXTENSION_ID}")
