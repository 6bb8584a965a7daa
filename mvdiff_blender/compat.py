"""Every difference between the Blender versions the add-on supports (4.2 LTS to 5.x), in one place.

Callers never test ``bpy.app.version`` themselves; they ask this module. Each shim names the
version where the API changed.
"""

from __future__ import annotations

import bpy

VERSION = bpy.app.version

# 5.0 replaced scene.node_tree with a compositor node-group datablock and File Output's
# base_path/file_slots with directory/file_name/file_output_items.
COMPOSITOR_IS_NODE_GROUP = VERSION >= (5, 0, 0)


def needs_use_nodes() -> bool:
    """Materials and Worlds need ``use_nodes = True`` before 5.0; from 5.0 the flag is deprecated."""
    return VERSION < (5, 0, 0)


def enable_nodes(id_block) -> None:
    """Make sure a Material or World has its node tree (created by default from 5.0)."""
    if needs_use_nodes():
        id_block.use_nodes = True


def eevee_engine_id() -> str:
    """EEVEE was ``BLENDER_EEVEE_NEXT`` in 4.2 - 4.5 and is ``BLENDER_EEVEE`` again from 5.0."""
    return "BLENDER_EEVEE" if VERSION >= (5, 0, 0) else "BLENDER_EEVEE_NEXT"


def linear_colorspace_name() -> str:
    """The scene-linear colour space for HDR images: 'Linear Rec.709' from 4.0, 'Linear' before."""
    items = bpy.types.ColorManagedInputColorspaceSettings.bl_rna.properties["name"].enum_items.keys()
    for name in ("Linear Rec.709", "Linear", "Linear CIE-XYZ D65"):
        if name in items:
            return name
    return "Non-Color"


def online_access_allowed() -> bool:
    """``bpy.app.online_access`` exists from 4.2; older builds have no such switch."""
    return bool(getattr(bpy.app, "online_access", True))
