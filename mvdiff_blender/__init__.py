"""MVDiffusion for Blender: texture scenes and make 360 HDRI worlds with a multi-view diffusion backend.

Registration only. The modules each own one job: ``cameras`` (poses), ``render_depth`` (Cycles
depth), ``export`` (meshes), ``uv_overlap`` (overlapping UVs), ``job`` (building jobs),
``backend_process`` (a local backend), ``session`` (talking to a backend off the UI thread),
``apply`` (images, UVs, materials, World), ``operators``, ``result_operators`` (Apply Result,
Restore Materials), ``ui``, ``preferences``, ``installer`` (the *Install Backend* button) and
``multiview_weights`` (whether views agree, and the download of the weights that make them).
"""

from __future__ import annotations

import importlib

# The extension's package (``bl_ext.<repo>.mvdiff_blender``): preferences and user folders are
# registered under it, not under this sub-package.
ADDON_ID = __package__.rpartition(".")[0] or __package__

_MODULE_NAMES = ("properties", "preferences", "installer", "multiview_weights", "operators", "result_operators",
                 "ui")


def _modules():
    return [importlib.import_module(f".{name}", __package__) for name in _MODULE_NAMES]


def register() -> None:
    import bpy

    for module in _modules():
        for cls in getattr(module, "classes", ()):
            bpy.utils.register_class(cls)
        if hasattr(module, "register_extra"):
            module.register_extra()
    from . import properties

    properties.register_pointers()


def unregister() -> None:
    import bpy

    from . import properties

    properties.unregister_pointers()
    for module in reversed(_modules()):
        if hasattr(module, "unregister_extra"):
            module.unregister_extra()
        for cls in reversed(getattr(module, "classes", ())):
            bpy.utils.unregister_class(cls)
