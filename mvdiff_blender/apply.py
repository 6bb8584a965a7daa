"""A finished job's files into the scene: the texture, its UV map and material on each object; the World.

Nothing the user made is modified or lost: result files are copied under a new name rather than
over a different existing file; only the add-on's own UV map (``MVDiffusion``) is ever written; the
user's materials stay in the object's list (the new one is added, or replaces the add-on's own
from an earlier run, and the faces are pointed at it); and a user's World keeps its nodes.

Each function makes every change in one call and checks every input before the first change, so
an error leaves the scene untouched and the calling operator (``bl_options`` UNDO) records one
undo step for a successful apply.
"""

from __future__ import annotations

import filecmp
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import numpy as np

from . import compat
from .export import corner_order

UV_MAP_NAME = "MVDiffusion"
# Custom property marking the materials the add-on made, so a later run replaces its own slot.
MATERIAL_TAG = "mvdiff_texture"
ENV_NODE_NAME = "MVDiffusion Environment"
BACKGROUND_NODE_NAME = "MVDiffusion Background"
MAX_UV_MAPS = 8  # Blender's limit per mesh
# Integer face attribute holding each face's material index from before the first texture was
# applied, so that *Restore Materials* can put the user's assignment back.
MATERIAL_INDEX_ATTRIBUTE = "mvdiff_material_index"
MAPPING_NODE_NAME = "MVDiffusion Mapping"
TEXCOORD_NODE_NAME = "MVDiffusion Texture Coordinate"


class ApplyError(RuntimeError):
    """A result cannot be applied; the message names the object or file and what to change."""


@dataclass
class AppliedTexture:
    """What :func:`apply_texture` made: the image (shared), one material and UV map name per object.

    ``split_triangles``: per object, the triangles whose UVs could not be stored as given, because
    the backend gave one mesh corner (shared by two triangles of a quad or n-gon) two different
    UVs, i.e. an unwrap seam runs inside a face. Blender keeps one UV per face corner, so those
    triangles show the texture distorted; worth a warning when not 0.
    """

    image: bpy.types.Image
    materials: list[bpy.types.Material]
    uv_maps: list[str]
    path: Path
    split_triangles: list[int] = field(default_factory=list)


def apply_texture(
    objects: list[bpy.types.Object],
    result_dir: str | Path,
    *,
    object_names: list[str],
    output_dir: str | Path,
    basename: str,
    uv_map: str | None = None,
    make_active: bool = True,
    make_single_user: bool = False,
) -> AppliedTexture:
    """Put a texture job's result on ``objects`` (in the job's order; ``object_names`` are the names it was sent).

    With ``uvs.npz`` in ``result_dir`` (the backend unwrapped), each object's array goes into its
    ``MVDiffusion`` UV map; otherwise the texture was baked into ``uv_map`` (None: the active map).

    One material per object, named "<basename> <object>", all sharing the one image: the UV Map
    node names a map of that object's mesh, and a per-object material lets one object be
    re-textured later without changing the others.

    ``make_active``: the UV map the texture uses becomes each mesh's active and active-render map,
    so exporters and bakes that read the active map see the texture's UVs. ``make_single_user``:
    an object whose mesh other objects share gets its own copy first (otherwise such a mesh is
    refused, because the new UVs and material would reach the other objects too).
    """
    result_dir = Path(bpy.path.abspath(str(result_dir)))
    objects = list(objects)
    if len(object_names) != len(objects):
        raise ApplyError(f"{len(objects)} objects but {len(object_names)} object names from the job")
    texture = result_dir / "texture.png"
    if not texture.is_file():
        raise ApplyError(f"the result has no texture: {texture} does not exist")
    uvs_path = result_dir / "uvs.npz"
    unwrapped = uvs_path.is_file()
    check_targets(objects, unwrap=unwrapped, make_single_user=make_single_user)
    if unwrapped:
        uv_arrays = _read_uvs(uvs_path, objects, object_names)
        map_names = None
    else:
        uv_arrays = None
        map_names = [_existing_uv_map(obj, uv_map) for obj in objects]

    path = _copy_unique(texture, _output_folder(output_dir), _safe_stem(basename), ".png")
    image = _load_image(path, "sRGB")

    materials, used_maps, split = [], [], []
    if make_single_user:
        for obj in objects:
            if len(mesh_users(obj.data)) > 1:
                obj.data = obj.data.copy()
    for k, obj in enumerate(objects):
        if uv_arrays is not None:
            name, count = _write_uvs(obj, uv_arrays[k])
        else:
            name, count = map_names[k], 0
        split.append(count)
        material = _texture_material(f"{basename} {obj.name}", image, name)
        material[MATERIAL_TAG] = basename
        _assign(obj, material)
        if make_active:
            layer = obj.data.uv_layers[name]
            obj.data.uv_layers.active = layer
            layer.active_render = True
        materials.append(material)
        used_maps.append(name)
    return AppliedTexture(image=image, materials=materials, uv_maps=used_maps, path=path, split_triangles=split)


def apply_world(
    scene: bpy.types.Scene,
    image_path: str | Path,
    *,
    output_dir: str | Path,
    basename: str,
    use_current: bool = False,
    strength: float = 1.0,
) -> bpy.types.World:
    """Make a panorama (EXR or HDR, linear, Cycles' equirectangular layout) the scene's World background.

    A new World named ``basename``, or with ``use_current`` the scene's World, in which the add-on's
    own Environment and Background nodes are added (or reused from an earlier run) and connected to
    the active World Output; the user's other nodes stay, unlinked from the output at most.
    """
    source = Path(bpy.path.abspath(str(image_path)))
    if not source.is_file():
        raise ApplyError(f"the panorama {source} does not exist")
    if not math.isfinite(strength) or strength < 0:
        raise ApplyError(f"World strength must be a number >= 0, got {strength!r}")
    path = _copy_unique(source, _output_folder(output_dir), _safe_stem(basename), source.suffix.lower())
    # EXR and HDR hold scene-linear radiance: an sRGB tag would decode it a second time.
    image = _load_image(path, compat.linear_colorspace_name())

    ours = not (use_current and scene.world is not None)
    previous = scene.world
    world = bpy.data.worlds.new(basename) if ours else scene.world
    compat.enable_nodes(world)
    tree = world.node_tree
    nodes = tree.nodes
    output = _world_output(tree)
    background = nodes.get(BACKGROUND_NODE_NAME)
    if background is None and ours:
        background = next((n for n in nodes if n.type == "BACKGROUND"), None)
    if background is None or background.type != "BACKGROUND":
        background = nodes.new("ShaderNodeBackground")
        background.location = (output.location.x - 220, output.location.y)
    background.name = BACKGROUND_NODE_NAME
    environment = nodes.get(ENV_NODE_NAME)
    if environment is None or environment.type != "TEX_ENVIRONMENT":
        environment = nodes.new("ShaderNodeTexEnvironment")
        environment.location = (background.location.x - 320, background.location.y)
        environment.name = ENV_NODE_NAME
    environment.image = image
    environment.projection = "EQUIRECTANGULAR"
    environment.interpolation = "Linear"
    _rotation_nodes(tree, environment)
    tree.links.new(environment.outputs["Color"], background.inputs["Color"])
    tree.links.new(background.outputs["Background"], output.inputs["Surface"])
    background.inputs["Strength"].default_value = strength
    if previous is not None and previous is not world and not previous.use_fake_user:
        # Otherwise the user's World has no user left and is dropped when the file is saved.
        previous.use_fake_user = True
    scene.world = world
    return world


def _rotation_nodes(tree: bpy.types.NodeTree, environment: bpy.types.Node) -> None:
    """Texture Coordinate (Generated) -> Mapping -> the Environment's Vector: the Mapping node's
    Rotation turns the panorama (Z: around the vertical), identity by default."""
    nodes = tree.nodes
    coords = nodes.get(TEXCOORD_NODE_NAME)
    if coords is None or coords.type != "TEX_COORD":
        coords = nodes.new("ShaderNodeTexCoord")
        coords.name = TEXCOORD_NODE_NAME
        coords.location = (environment.location.x - 440, environment.location.y)
    mapping = nodes.get(MAPPING_NODE_NAME)
    if mapping is None or mapping.type != "MAPPING":
        mapping = nodes.new("ShaderNodeMapping")
        mapping.name = MAPPING_NODE_NAME
        mapping.vector_type = "POINT"
        mapping.location = (environment.location.x - 220, environment.location.y)
    tree.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    tree.links.new(mapping.outputs["Vector"], environment.inputs["Vector"])


# --- checks -----------------------------------------------------------------------------------


def mesh_users(mesh: bpy.types.Mesh) -> list[bpy.types.Object]:
    """The objects that use ``mesh`` (linked duplicates share one)."""
    return [o for o in bpy.data.objects if o.data is mesh]


def check_targets(objects: list[bpy.types.Object], *, unwrap: bool, make_single_user: bool = False) -> None:
    """Every reason the texture could not be applied to ``objects``, checked before a job starts and again
    before it is applied: the same rules in both places.

    ``unwrap``: the job writes a new ``MVDiffusion`` UV map (Blender allows 8 per mesh).
    """
    for obj in objects:
        _check_writable(obj)
        me = obj.data
        if unwrap and UV_MAP_NAME not in me.uv_layers and len(me.uv_layers) >= MAX_UV_MAPS:
            raise ApplyError(f"'{obj.name}' already has {MAX_UV_MAPS} UV maps, Blender's limit; remove one so "
                             f"the '{UV_MAP_NAME}' map can be added")
        if not make_single_user:
            others = sorted(o.name for o in mesh_users(me) if o != obj)
            if others:
                raise ApplyError(
                    f"'{obj.name}' shares its mesh '{me.name}' with {', '.join(repr(n) for n in others)} (linked "
                    "duplicates): the new UV map and material would change them too. Turn on 'Make Single User' "
                    "to give the textured objects their own mesh copy")


def _check_writable(obj: bpy.types.Object) -> None:
    if obj is None or obj.type != "MESH":
        name = getattr(obj, "name", obj)
        raise ApplyError(f"'{name}' is not a mesh object; a texture can only be applied to meshes")
    if obj.mode == "EDIT":
        raise ApplyError(f"'{obj.name}' is in Edit Mode, which would discard the new UV map and material; "
                         "switch to Object Mode and apply again")
    if obj.data.library is not None:
        raise ApplyError(f"'{obj.name}' uses the mesh '{obj.data.name}' linked from a library, which cannot be "
                         "changed; make it local first")


def _read_uvs(path: Path, objects: list[bpy.types.Object], names: list[str]) -> list[np.ndarray]:
    """Each object's (its triangles, 3, 2) UVs from the npz, in the object's own corner order."""
    arrays = []
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            for obj, name in zip(objects, names, strict=True):
                if name not in keys:
                    raise ApplyError(f"{path.name} has no UVs for '{obj.name}' (sent as '{name}')")
                arrays.append(npz[name])
    except ApplyError:
        raise
    except Exception as err:  # a truncated zip, a pickled member, a bad header
        raise ApplyError(f"{path} cannot be read: {err}") from None

    result = []
    for obj, array in zip(objects, arrays, strict=True):
        me = obj.data
        me.calc_loop_triangles()
        want = (len(me.loop_triangles), 3, 2)
        if array.shape != want or array.dtype.kind != "f":
            raise ApplyError(
                f"the UVs for '{obj.name}' do not fit its mesh: {array.dtype} {array.shape}, expected float {want} "
                "(was the mesh edited while the job ran?)"
            )
        if not np.isfinite(array).all():
            raise ApplyError(f"the UVs for '{obj.name}' hold NaN or infinite values")
        result.append(np.ascontiguousarray(array[:, corner_order(obj)], np.float32))
    return result


def _existing_uv_map(obj: bpy.types.Object, name: str | None) -> str:
    layers = obj.data.uv_layers
    if name is None:
        if layers.active is None:
            raise ApplyError(f"'{obj.name}' has no UV map for the texture; add one or texture with UVs 'Unwrap'")
        return layers.active.name
    if name not in layers:
        raise ApplyError(f"'{obj.name}' has no UV map named '{name}', which the texture was baked into")
    return name


# --- changes ----------------------------------------------------------------------------------


def _write_uvs(obj: bpy.types.Object, uvs: np.ndarray) -> tuple[str, int]:
    """Write per-triangle-corner UVs into the object's MVDiffusion map (made if missing).

    Returns the map's name and how many triangles did not get their UVs exactly (see AppliedTexture).
    """
    me = obj.data
    layer = me.uv_layers.get(UV_MAP_NAME)
    if layer is None:
        layer = me.uv_layers.new(name=UV_MAP_NAME, do_init=False)
        if layer is None:
            raise ApplyError(f"could not add a UV map to '{obj.name}'")
    name = layer.name  # differs from UV_MAP_NAME if another attribute already holds that name
    loops = np.empty(len(me.loop_triangles) * 3, np.int32)
    me.loop_triangles.foreach_get("loops", loops)
    corner_uvs = np.empty(len(me.loops) * 2, np.float32)
    layer = me.uv_layers[name]
    layer.uv.foreach_get("vector", corner_uvs)
    corner_uvs = corner_uvs.reshape(-1, 2)
    rows = uvs.reshape(-1, 2)
    corner_uvs[loops] = rows
    layer.uv.foreach_set("vector", corner_uvs.ravel())
    me.update()
    mismatch = np.abs(corner_uvs[loops] - rows).max(axis=1) > 1e-6
    return name, int(np.count_nonzero(mismatch.reshape(-1, 3).any(axis=1)))


def _texture_material(name: str, image: bpy.types.Image, uv_map: str) -> bpy.types.Material:
    """Image Texture (UVs from the named map) into a Principled BSDF's Base Color."""
    material = bpy.data.materials.new(name)
    compat.enable_nodes(material)
    tree = material.node_tree
    nodes = tree.nodes
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    output = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None)
    if bsdf is None:
        bsdf = nodes.new("ShaderNodeBsdfPrincipled")
    if output is None:
        output = nodes.new("ShaderNodeOutputMaterial")
        output.location = (bsdf.location.x + 300, bsdf.location.y)
    if not output.inputs["Surface"].is_linked:
        tree.links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    texture = nodes.new("ShaderNodeTexImage")
    texture.image = image
    texture.extension = "EXTEND"  # no wrap-around bleeding at the atlas border
    texture.interpolation = "Linear"
    texture.location = (bsdf.location.x - 340, bsdf.location.y)
    uv_node = nodes.new("ShaderNodeUVMap")
    uv_node.uv_map = uv_map
    uv_node.location = (texture.location.x - 220, texture.location.y - 100)
    tree.links.new(uv_node.outputs["UV"], texture.inputs["Vector"])
    tree.links.new(texture.outputs["Color"], bsdf.inputs["Base Color"])
    return material


def _assign(obj: bpy.types.Object, material: bpy.types.Material) -> None:
    """Point every face at ``material``: in the slot of the add-on's earlier material, or a new slot.

    The user's materials stay in the list, and before the first texture each face's material index
    is stored in the face attribute ``mvdiff_material_index``, which *Restore Materials*
    (:func:`restore_materials`) puts back; undo restores the indices too.
    """
    me = obj.data
    if MATERIAL_INDEX_ATTRIBUTE not in me.attributes:
        own = np.zeros(len(me.polygons), np.int32)
        me.polygons.foreach_get("material_index", own)
        stored = me.attributes.new(MATERIAL_INDEX_ATTRIBUTE, "INT", "FACE")
        stored.data.foreach_set("value", own)
    index = next((k for k, m in enumerate(me.materials) if m is not None and MATERIAL_TAG in m), None)
    if index is None:
        me.materials.append(material)
        index = len(me.materials) - 1
    else:
        me.materials[index] = material
    slot = obj.material_slots[index]
    if slot.link == "OBJECT":  # an object-linked slot would show its own material instead
        slot.material = material
    me.polygons.foreach_set("material_index", np.full(len(me.polygons), index, np.int32))
    me.update()


def restore_materials(obj: bpy.types.Object) -> bool:
    """Undo the add-on's material assignment on ``obj``: faces back to their stored material indices,
    the add-on's slots removed, the stored attribute dropped. False when there is nothing to restore."""
    me = obj.data
    stored = me.attributes.get(MATERIAL_INDEX_ATTRIBUTE)
    ours = [k for k, m in enumerate(me.materials) if m is not None and MATERIAL_TAG in m]
    if stored is None and not ours:
        return False
    _check_writable(obj)
    if stored is not None:
        if stored.domain != "FACE" or stored.data_type != "INT":
            raise ApplyError(f"'{obj.name}': the attribute '{MATERIAL_INDEX_ATTRIBUTE}' is not an integer face "
                             "attribute, so it does not hold the material assignment")
        indices = np.zeros(len(me.polygons), np.int32)
        stored.data.foreach_get("value", indices)
    else:
        indices = np.zeros(len(me.polygons), np.int32)
        me.polygons.foreach_get("material_index", indices)
    for k in reversed(ours):  # slots after a removed one move down by one
        me.materials.pop(index=k)
        indices[indices > k] -= 1
    me.polygons.foreach_set("material_index", np.clip(indices, 0, max(len(me.materials) - 1, 0)))
    if stored is not None:
        me.attributes.remove(me.attributes[MATERIAL_INDEX_ATTRIBUTE])
    me.update()
    return True


# --- files ------------------------------------------------------------------------------------


def _output_folder(output_dir: str | Path) -> Path:
    text = str(output_dir)
    if not text:
        if not bpy.data.filepath:
            raise ApplyError("no output folder: set one, or save the .blend file so results go next to it")
        text = "//"
    folder = Path(bpy.path.abspath(text))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ApplyError(f"cannot create the output folder {folder}: {err}") from None
    return folder


def _safe_stem(basename: str) -> str:
    """``basename`` without characters that are path separators or invalid in Windows file names."""
    stem = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", basename).strip(" .")
    return stem or "mvdiffusion"


def _copy_unique(source: Path, folder: Path, stem: str, suffix: str) -> Path:
    """Copy ``source`` to ``folder/stem suffix``, or ``stem_1``... if that holds different bytes.

    A file with the same bytes is reused, so applying one result twice keeps one file.
    """
    for n in range(10000):
        target = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}_{n}{suffix}")
        if target.exists():
            if target.is_file() and filecmp.cmp(source, target, shallow=False):
                return target
            continue
        try:
            with open(source, "rb") as src, open(target, "xb") as dst:
                try:
                    shutil.copyfileobj(src, dst)
                except BaseException:
                    dst.close()
                    target.unlink(missing_ok=True)
                    raise
        except FileExistsError:
            continue
        except OSError as err:
            raise ApplyError(f"cannot copy {source} to {target}: {err}") from None
        return target
    raise ApplyError(f"too many files named {stem}_N{suffix} in {folder}")


def _load_image(path: Path, colorspace: str) -> bpy.types.Image:
    try:
        image = bpy.data.images.load(str(path), check_existing=True)
    except RuntimeError as err:
        raise ApplyError(f"Blender cannot load {path}: {err}") from None
    if image.size[0] == 0 or image.size[1] == 0:  # reading .size loads the pixels
        bpy.data.images.remove(image)
        raise ApplyError(f"Blender cannot read the image {path}")
    image.colorspace_settings.name = colorspace
    if bpy.data.filepath:
        try:
            image.filepath = bpy.path.relpath(str(path))  # the .blend and its results can move together
        except ValueError:  # another drive on Windows
            pass
    return image


def _world_output(tree: bpy.types.NodeTree) -> bpy.types.Node:
    outputs = [n for n in tree.nodes if n.type == "OUTPUT_WORLD"]
    active = [n for n in outputs if n.is_active_output]
    if active or outputs:
        return (active or outputs)[0]
    return tree.nodes.new("ShaderNodeOutputWorld")
