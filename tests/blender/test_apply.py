"""Applying results: texture file, MVDiffusion UV map, material, and the panorama World."""

import importlib

import numpy as np
import pytest

from backend.imaging.hdr import write_exr
from backend.pipelines.texturing_outputs import write_npz, write_texture

pytestmark = pytest.mark.blender


@pytest.fixture
def apply(addon):
    """The add-on's ``apply`` module (imported here: nothing else may have imported it yet)."""
    return importlib.import_module(f"{addon.__name__}.apply")


@pytest.fixture
def export(addon):
    return importlib.import_module(f"{addon.__name__}.export")


def _cube(bpy, name, location=(0, 0, 0)):
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=location)
    obj = bpy.context.object
    obj.name = name
    return obj


def _grid(bpy, scene, name):
    bpy.ops.mesh.primitive_grid_add(x_subdivisions=4, y_subdivisions=3, size=2.0)
    obj = bpy.context.object
    obj.name = name
    return obj


def _uv_bytes(obj, name):
    layer = obj.data.uv_layers[name]
    out = np.empty(len(obj.data.loops) * 2, np.float32)
    layer.uv.foreach_get("vector", out)
    return out.tobytes()


def _loops(obj):
    me = obj.data
    me.calc_loop_triangles()
    loops = np.empty(len(me.loop_triangles) * 3, np.int32)
    me.loop_triangles.foreach_get("loops", loops)
    return loops.reshape(-1, 3)


def _corner_uvs(obj, name):
    layer = obj.data.uv_layers[name]
    per_loop = np.empty(len(obj.data.loops) * 2, np.float32)
    layer.uv.foreach_get("vector", per_loop)
    return per_loop.reshape(-1, 2)[_loops(obj)]


def _fake_uvs(obj, seed):
    """UVs the backend could have made: one value per corner of the mesh, as (triangles, 3, 2) rows."""
    per_loop = np.random.default_rng(seed).uniform(0, 1, (len(obj.data.loops), 2)).astype(np.float32)
    return per_loop[_loops(obj)]


def _result(folder, *, size=(48, 32), uvs=None, bits=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    texture = np.random.default_rng(seed).uniform(0, 1, (height, width, 3))
    write_texture(folder / "texture.png", texture, bits)
    if uvs is not None:
        write_npz(folder / "uvs.npz", uvs)
    return folder


def _link(tree, to_node, to_socket):
    """The (node, socket name) feeding ``to_node``'s input ``to_socket``."""
    links = [lk for lk in tree.links if lk.to_node == to_node and lk.to_socket.name == to_socket]
    assert len(links) == 1, f"{to_node.name}.{to_socket} is not linked"
    return links[0].from_node, links[0].from_socket.name


def _check_material(material, image, uv_map):
    tree = material.node_tree
    bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
    texture, socket = _link(tree, bsdf, "Base Color")
    assert texture.type == "TEX_IMAGE" and socket == "Color" and texture.image == image
    assert texture.extension == "EXTEND" and texture.interpolation == "Linear"
    uv_node, socket = _link(tree, texture, "Vector")
    assert uv_node.type == "UVMAP" and socket == "UV" and uv_node.uv_map == uv_map
    output = next(n for n in tree.nodes if n.type == "OUTPUT_MATERIAL")
    assert _link(tree, output, "Surface")[0] == bsdf


def _shown_material(obj):
    indices = np.empty(len(obj.data.polygons), np.int32)
    obj.data.polygons.foreach_get("material_index", indices)
    assert len(set(indices.tolist())) == 1
    return obj.material_slots[int(indices[0])].material


def test_apply_unwrapped_texture_to_two_objects(apply, scene, tmp_path):
    import bpy

    a = _cube(bpy, "A")
    user_material = bpy.data.materials.new("Painted")
    a.data.materials.append(user_material)
    b = _grid(bpy, scene, "B")
    b.data.uv_layers.new(name="Extra")
    before = {o.name: (_uv_bytes(o, "UVMap"), o.data.uv_layers.active_index,
                       [layer.active_render for layer in o.data.uv_layers]) for o in (a, b)}
    uvs = {"A": _fake_uvs(a, 1), "B": _fake_uvs(b, 2)}
    result = _result(tmp_path / "job1", uvs=uvs)
    out = tmp_path / "out"

    applied = apply.apply_texture([a, b], result, object_names=["A", "B"], output_dir=out, basename="Tex",
                                  make_active=False)

    assert applied.path == out / "Tex.png" and applied.path.read_bytes() == (result / "texture.png").read_bytes()
    assert tuple(applied.image.size) == (32, 48)  # width, height
    pixels = np.empty(32 * 48 * 4, np.float32)
    applied.image.pixels.foreach_get(pixels)  # bottom row first; byte images give the stored sRGB values
    written = np.random.default_rng(0).uniform(0, 1, (48, 32, 3))
    np.testing.assert_allclose(np.flipud(pixels.reshape(48, 32, 4))[..., :3], written, atol=0.6 / 255)
    assert applied.image.colorspace_settings.name == "sRGB"
    assert applied.uv_maps == ["MVDiffusion", "MVDiffusion"] and applied.split_triangles == [0, 0]
    for obj, material in zip((a, b), applied.materials, strict=True):
        np.testing.assert_array_equal(_corner_uvs(obj, "MVDiffusion"), uvs[obj.name])
        user_bytes, active_index, render = before[obj.name]
        assert _uv_bytes(obj, "UVMap") == user_bytes  # the user's map is untouched
        assert obj.data.uv_layers.active_index == active_index
        assert [layer.active_render for layer in obj.data.uv_layers][: len(render)] == render
        assert material.name == f"Tex {obj.name}"
        _check_material(material, applied.image, "MVDiffusion")
        assert _shown_material(obj) == material
    assert user_material.name in a.data.materials  # the user's material stays in the list

    # A second run with a different result: the same UV map and slot, a new file beside the first.
    first_bytes = applied.path.read_bytes()
    uvs2 = {"A": _fake_uvs(a, 3), "B": _fake_uvs(b, 4)}
    result2 = _result(tmp_path / "job2", size=(16, 64), uvs=uvs2, bits=16, seed=5)
    layer_counts = [len(o.data.uv_layers) for o in (a, b)]
    slot_counts = [len(o.material_slots) for o in (a, b)]
    again = apply.apply_texture([a, b], result2, object_names=["A", "B"], output_dir=out, basename="Tex")
    assert again.path == out / "Tex_1.png" and (out / "Tex.png").read_bytes() == first_bytes
    assert tuple(again.image.size) == (64, 16)
    assert [len(o.data.uv_layers) for o in (a, b)] == layer_counts
    assert [len(o.material_slots) for o in (a, b)] == slot_counts
    for obj, material in zip((a, b), again.materials, strict=True):
        np.testing.assert_array_equal(_corner_uvs(obj, "MVDiffusion"), uvs2[obj.name])
        assert _uv_bytes(obj, "UVMap") == before[obj.name][0]
        assert _shown_material(obj) == material
    # The very same result again reuses its file rather than making a copy.
    assert apply.apply_texture([a, b], result2, object_names=["A", "B"], output_dir=out,
                               basename="Tex").path == out / "Tex_1.png"


def test_object_names_map_renamed_objects_and_mirrored_objects(apply, export, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Mirror")
    obj.scale = (1.0, -1.0, 1.0)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    exported = export.export_meshes(depsgraph, [obj], "UNWRAP")
    # the backend's UVs follow the exported corners, which are swapped for a mirrored object
    per_loop = np.random.default_rng(0).uniform(0, 1, (len(obj.data.loops), 2)).astype(np.float32)
    rows = per_loop[_loops(obj)][:, export.corner_order(obj)]
    assert len(rows) == len(exported.mesh.triangles)
    result = _result(tmp_path / "job", uvs={"Mirror": rows})
    obj.name = "Renamed while the job ran"
    apply.apply_texture([obj], result, object_names=["Mirror"], output_dir=tmp_path / "out", basename="M")
    np.testing.assert_array_equal(_corner_uvs(obj, "MVDiffusion"), per_loop[_loops(obj)])


def test_without_uvs_npz_the_users_map_is_used(apply, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Baked")
    obj.data.uv_layers.new(name="Second")
    before = _uv_bytes(obj, "UVMap")
    result = _result(tmp_path / "job")
    applied = apply.apply_texture([obj], result, object_names=["Baked"], output_dir=tmp_path / "out", basename="B")
    assert "MVDiffusion" not in obj.data.uv_layers and applied.uv_maps == ["UVMap"]  # the active one
    _check_material(applied.materials[0], applied.image, "UVMap")
    assert _uv_bytes(obj, "UVMap") == before

    applied = apply.apply_texture([obj], result, object_names=["Baked"], output_dir=tmp_path / "out", basename="B",
                                  uv_map="Second")
    _check_material(applied.materials[0], applied.image, "Second")
    with pytest.raises(apply.ApplyError, match="'Baked' has no UV map named 'Nope'"):
        apply.apply_texture([obj], result, object_names=["Baked"], output_dir=tmp_path / "out", basename="B",
                            uv_map="Nope")


def test_bad_results_raise_and_change_nothing(apply, scene, tmp_path):
    import bpy

    a, b = _cube(bpy, "A"), _cube(bpy, "B", (3, 0, 0))
    ApplyError = apply.ApplyError
    out = tmp_path / "out"
    wrong = {"A": _fake_uvs(a, 0), "B": _fake_uvs(b, 0)[:-1]}
    with pytest.raises(ApplyError, match="'B' do not fit its mesh"):
        apply.apply_texture([a, b], _result(tmp_path / "j1", uvs=wrong), object_names=["A", "B"], output_dir=out,
                            basename="T")
    with pytest.raises(ApplyError, match="no UVs for 'B'"):
        apply.apply_texture([a, b], _result(tmp_path / "j2", uvs={"A": _fake_uvs(a, 0)}), object_names=["A", "B"],
                            output_dir=out, basename="T")
    nan = {"A": _fake_uvs(a, 0), "B": np.full_like(_fake_uvs(b, 0), np.nan)}
    with pytest.raises(ApplyError, match="'B' hold NaN"):
        apply.apply_texture([a, b], _result(tmp_path / "j3", uvs=nan), object_names=["A", "B"], output_dir=out,
                            basename="T")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ApplyError, match="texture.png does not exist"):
        apply.apply_texture([a], tmp_path / "empty", object_names=["A"], output_dir=out, basename="T")
    broken = _result(tmp_path / "j4")
    (broken / "uvs.npz").write_bytes(b"not a zip")
    with pytest.raises(ApplyError, match="uvs.npz cannot be read"):
        apply.apply_texture([a], broken, object_names=["A"], output_dir=out, basename="T")
    for obj in (a, b):
        assert "MVDiffusion" not in obj.data.uv_layers and len(obj.material_slots) == 0
    assert not out.exists() or not any(out.iterdir())


def test_apply_world_new_and_current(apply, scene, tmp_path):
    import bpy

    panorama = np.random.default_rng(0).uniform(0, 4, (16, 32, 3)).astype(np.float32)
    write_exr(tmp_path / "panorama.exr", panorama)
    out = tmp_path / "out"
    assert scene.world is None

    world = apply.apply_world(scene, tmp_path / "panorama.exr", output_dir=out, basename="Sky", strength=2.5)
    assert scene.world == world and world.name == "Sky"
    assert (out / "Sky.exr").read_bytes() == (tmp_path / "panorama.exr").read_bytes()
    _check_world(apply, world, strength=2.5)

    # The user's own World: their nodes stay, the add-on's nodes are added once and reused.
    user = bpy.data.worlds.new("Mine")
    apply.compat.enable_nodes(user)  # 4.x: a new World has no node tree until use_nodes is set
    sky = user.node_tree.nodes.new("ShaderNodeTexSky")
    user_background = next(n for n in user.node_tree.nodes if n.type == "BACKGROUND")
    user.node_tree.links.new(sky.outputs["Color"], user_background.inputs["Color"])
    scene.world = user
    user_nodes = {n.name for n in user.node_tree.nodes}
    for strength in (0.5, 0.75):
        world = apply.apply_world(scene, tmp_path / "panorama.exr", output_dir=out, basename="Sky", use_current=True,
                                  strength=strength)
        assert world == user and scene.world == user
        assert user_nodes <= {n.name for n in user.node_tree.nodes}
        assert len(user.node_tree.nodes) == len(user_nodes) + 4  # Coordinates, Mapping, Environment, Background
        _check_world(apply, world, strength=strength)
    assert _link(user.node_tree, user_background, "Color")[0] == sky  # the user's chain is intact
    assert sorted(p.name for p in out.iterdir()) == ["Sky.exr"]  # same bytes: one file

    with pytest.raises(apply.ApplyError, match="does not exist"):
        apply.apply_world(scene, tmp_path / "missing.exr", output_dir=out, basename="Sky")


def test_apply_world_use_current_without_a_world(apply, scene, tmp_path):
    write_exr(tmp_path / "p.exr", np.ones((8, 16, 3), np.float32))
    world = apply.apply_world(scene, tmp_path / "p.exr", output_dir=tmp_path, basename="Env", use_current=True)
    assert scene.world == world
    _check_world(apply, world, strength=1.0)


def _check_world(apply, world, strength):
    tree = world.node_tree
    output = next(n for n in tree.nodes if n.type == "OUTPUT_WORLD" and n.is_active_output)
    background, socket = _link(tree, output, "Surface")
    assert background.type == "BACKGROUND" and socket == "Background"
    assert background.inputs["Strength"].default_value == pytest.approx(strength)
    environment, socket = _link(tree, background, "Color")
    assert environment.type == "TEX_ENVIRONMENT" and socket == "Color"
    assert environment.projection == "EQUIRECTANGULAR"
    mapping, socket = _link(tree, environment, "Vector")
    assert mapping.type == "MAPPING" and socket == "Vector"
    coords, socket = _link(tree, mapping, "Vector")
    assert coords.type == "TEX_COORD" and socket == "Generated"
    image = environment.image
    assert tuple(image.size) in ((32, 16), (16, 8))
    assert image.colorspace_settings.name == apply.compat.linear_colorspace_name() and image.is_float


def test_a_seam_inside_a_quad_is_counted(apply, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Seamed")
    rows = _fake_uvs(obj, 0)
    loops = _loops(obj)
    # the first quad's two triangles share two corners; give one of them another UV in one triangle
    shared = np.intersect1d(loops[0], loops[1])
    assert len(shared) == 2
    corner = int(np.flatnonzero(loops[0] == shared[0])[0])
    rows[0, corner] = (rows[0, corner] + 0.5) % 1.0
    result = _result(tmp_path / "job", uvs={"Seamed": rows})
    applied = apply.apply_texture([obj], result, object_names=["Seamed"], output_dir=tmp_path / "out",
                                  basename="S")
    assert applied.split_triangles == [1]


def test_saved_blend_gets_relative_paths_and_default_folder(apply, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Saved")
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    result = _result(tmp_path / "job")
    applied = apply.apply_texture([obj], result, object_names=["Saved"], output_dir="", basename="R")
    assert applied.path == tmp_path / "R.png"  # no output folder: next to the .blend
    assert applied.image.filepath == "//R.png" and tuple(applied.image.size) == (32, 48)


def test_an_unwrap_of_bumpy_quads_is_stored_without_split_triangles(apply, export, scene, tmp_path):
    # xatlas sees triangles; without the polygons it may cut a quad along its diagonal, and the
    # quad's shared corners then cannot hold both halves' UVs.
    import bpy

    from backend.geometry.mesh import Mesh
    from backend.geometry.uv_atlas import ensure_uvs
    from backend.pipelines.texturing_outputs import object_uvs

    bpy.ops.mesh.primitive_torus_add(major_segments=32, minor_segments=16)
    obj = bpy.context.object
    obj.name = "Bumpy"
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    co += np.random.default_rng(0).normal(0.0, 0.02, co.shape).astype(np.float32)
    obj.data.vertices.foreach_set("co", co)
    obj.data.update()
    exported = export.export_meshes(bpy.context.evaluated_depsgraph_get(), [obj], "UNWRAP").mesh
    assert exported.polygon_ids is not None
    # The add-on's copy of the backend modules is a different package: rebuild the mesh in this one.
    mesh = Mesh(exported.vertices, exported.triangles, None, exported.object_ids, exported.polygon_ids)

    split = {}
    for label, sent in (("triangles", Mesh(mesh.vertices, mesh.triangles)), ("polygons", mesh)):
        uvs = object_uvs(ensure_uvs(sent, 512, 4).mesh, ["Bumpy"])
        result = _result(tmp_path / label, uvs=uvs)
        applied = apply.apply_texture([obj], result, object_names=["Bumpy"], output_dir=tmp_path / "out",
                                      basename=label)
        split[label] = applied.split_triangles[0]
    assert split["triangles"] > 0 and split["polygons"] == 0
    np.testing.assert_array_equal(_corner_uvs(obj, "MVDiffusion"), uvs["Bumpy"])  # stored exactly as unwrapped
