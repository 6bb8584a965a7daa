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


# ---------------------------------------------------------------------- depth rendering (render_depth.py)
# The compositor that writes the Depth pass to a single-layer 32-bit EXR. ``state`` is the caller's
# restorer: ``state.set(owner, attribute, value)`` changes a setting only when it differs and
# remembers the old value; ``state.defer(fn)`` runs ``fn`` on restore (in reverse order).
DEPTH_OUTPUT_ITEM = "Depth"


def _single_channel(image_format) -> None:
    """One channel where the node allows it: 5.0's File Output offers BW for EXR, 4.2's only RGB/RGBA.

    The enum's items depend on the node and the format at run time, so the value is tried rather
    than looked up. Depth is read from the first channel either way; RGB only makes the file larger.
    """
    try:
        image_format.color_mode = "BW"
    except TypeError:
        image_format.color_mode = "RGB"


def compositor_tree(scene):
    """The node tree the scene's compositor runs: 5.0's node-group datablock, or 4.x's ``scene.node_tree``
    (None until nodes are used)."""
    if COMPOSITOR_IS_NODE_GROUP:
        return scene.compositing_node_group
    return scene.node_tree


def _configure_exr_format(image_format) -> None:
    # 5.0 defaults File Output to multi-layer EXR and only allows OPEN_EXR once media_type is IMAGE.
    if hasattr(image_format, "media_type"):
        image_format.media_type = "IMAGE"
    image_format.file_format = "OPEN_EXR"
    image_format.color_depth = "32"
    _single_channel(image_format)
    if hasattr(image_format, "exr_codec"):
        image_format.exr_codec = "ZIP"


def setup_depth_compositor(scene, view_layer, directory: str, file_prefix: str, state) -> None:
    """Route ``view_layer``'s Depth pass to ``<directory>/<file_prefix>*.exr`` on every render.

    5.0: a new compositor node group (Render Layers -> File Output with ``directory``/``file_name``/
    ``file_output_items``) replaces the scene's group for the duration; the file has no frame number.
    4.x: nodes are added to ``scene.node_tree`` (``use_nodes``), which needs a Composite node; the
    File Output's ``base_path``/``file_slots`` add a frame number. The user's own File Output nodes
    are muted meanwhile so the depth renders write nothing into the user's folders.
    """
    if COMPOSITOR_IS_NODE_GROUP:
        tree = bpy.data.node_groups.new("MVDiffusion Depth", "CompositorNodeTree")
        state.defer(lambda: bpy.data.node_groups.remove(tree))
        state.set(scene, "compositing_node_group", tree)
        layers = tree.nodes.new("CompositorNodeRLayers")
        layers.scene = scene
        layers.layer = view_layer.name
        output = tree.nodes.new("CompositorNodeOutputFile")
        output.directory = directory.rstrip("/\\") + "/"
        output.file_name = file_prefix
        _configure_exr_format(output.format)
        output.file_output_items.new("FLOAT", DEPTH_OUTPUT_ITEM)
        tree.links.new(layers.outputs["Depth"], output.inputs[DEPTH_OUTPUT_ITEM])
        return
    # A scene that never used nodes gets Blender's default tree (Render Layers -> Composite) here.
    # 4.x has no way to delete a scene's embedded tree, so that default stays, unused once
    # use_nodes is off again: what the user's own first "Use Nodes" would have created.
    state.set(scene, "use_nodes", True)
    tree = scene.node_tree
    for node in tree.nodes:
        if node.bl_idname == "CompositorNodeOutputFile":
            state.set(node, "mute", True)
    added: list[str] = []

    def remove_added() -> None:
        # By name: a Python reference to a node that something else removed meanwhile is dangling.
        for name in added:
            node = tree.nodes.get(name)
            if node is not None:
                tree.nodes.remove(node)

    state.defer(remove_added)
    layers = tree.nodes.new("CompositorNodeRLayers")
    added.append(layers.name)
    layers.scene = scene
    layers.layer = view_layer.name
    if not any(node.bl_idname == "CompositorNodeComposite" for node in tree.nodes):
        composite = tree.nodes.new("CompositorNodeComposite")  # 4.x refuses to render without one
        added.append(composite.name)
        if "Image" in layers.outputs:
            tree.links.new(layers.outputs["Image"], composite.inputs["Image"])
    output = tree.nodes.new("CompositorNodeOutputFile")
    added.append(output.name)
    output.base_path = directory
    _configure_exr_format(output.format)
    output.file_slots[0].path = file_prefix + DEPTH_OUTPUT_ITEM
    tree.links.new(layers.outputs["Depth"], output.inputs[0])
