"""The user's data stays theirs: shared meshes, UV-map limits, overlapping UVs, material assignments,
the World, the results folder and the active UV map. Every refusal comes before a camera is placed
or a depth rendered."""

import numpy as np
import pytest

from backend.imaging.hdr import write_exr
from backend.pipelines.texturing_outputs import write_npz, write_texture

pytestmark = pytest.mark.blender


def _cube(bpy, name, location=(0.0, 0.0, 0.0)):
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=location)
    obj = bpy.context.object
    obj.name = name
    return obj


def _select(bpy, *objects):
    bpy.ops.object.select_all(action="DESELECT")
    for obj in objects:
        obj.select_set(True)
    bpy.context.view_layer.objects.active = objects[0]


def _orbit(settings, tmp_path):
    settings.prompt, settings.camera_source, settings.orbit_views, settings.orbit_rings = "stone", "ORBIT", 2, 1
    settings.width = settings.height = 64
    settings.output_dir = str(tmp_path / "out")


def _loops(obj):
    me = obj.data
    me.calc_loop_triangles()
    loops = np.empty(len(me.loop_triangles) * 3, np.int32)
    me.loop_triangles.foreach_get("loops", loops)
    return loops.reshape(-1, 3)


def _result(folder, obj_uvs: dict):
    folder.mkdir(parents=True, exist_ok=True)
    write_texture(folder / "texture.png", np.full((16, 16, 3), 0.5), 8)
    write_npz(folder / "uvs.npz", obj_uvs)
    return folder


def _unwrap_rows(obj):
    return np.random.default_rng(0).uniform(0, 1, (len(obj.data.loops), 2)).astype(np.float32)[_loops(obj)]


def _nothing_prepared(bpy, addon, scene, tmp_path):
    assert addon.cameras.camera_collection(scene) is None, "no camera may be placed for a refused job"
    assert not (tmp_path / "out").exists(), "no job folder (and no depth render) for a refused job"
    assert "MVDiffusion Depth Camera" not in bpy.data.objects


def test_a_linked_duplicate_is_refused_before_the_job_unless_make_single_user(addon, scene, tmp_path):
    import bpy

    a = _cube(bpy, "A")
    b = bpy.data.objects.new("B", a.data)  # Alt+D: the same mesh
    scene.collection.objects.link(b)
    _select(bpy, a)
    _orbit(scene.mvdiff, tmp_path)
    with pytest.raises(addon.job.JobError, match="shares its mesh .* 'B'.*Make Single User"):
        addon.job.prepare_texture_job(bpy.context)
    _nothing_prepared(bpy, addon, scene, tmp_path)

    # With Make Single User, only the selected object's (new) mesh gets the UV map and the material.
    result = _result(tmp_path / "job", {"A": _unwrap_rows(a)})
    addon.apply.apply_texture([a], result, object_names=["A"], output_dir=tmp_path / "o", basename="T",
                              make_single_user=True)
    assert a.data is not b.data
    assert "MVDiffusion" in a.data.uv_layers and "MVDiffusion" not in b.data.uv_layers
    assert len(b.material_slots) == 0 and len(a.material_slots) == 1


def test_eight_uv_maps_are_refused_before_cameras_and_depth(addon, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Full")
    while len(obj.data.uv_layers) < addon.apply.MAX_UV_MAPS:
        obj.data.uv_layers.new()
    _select(bpy, obj)
    _orbit(scene.mvdiff, tmp_path)
    with pytest.raises(addon.job.JobError, match="already has 8 UV maps"):
        addon.job.prepare_texture_job(bpy.context)
    _nothing_prepared(bpy, addon, scene, tmp_path)


def test_overlap_measure(addon):
    measure = addon.uv_overlap.overlap_fraction
    square = np.array([[[0.1, 0.1], [0.9, 0.1], [0.9, 0.9]], [[0.1, 0.1], [0.9, 0.9], [0.1, 0.9]]])
    assert measure(square) == 0.0  # two triangles sharing a diagonal do not overlap
    assert measure(np.concatenate([square, square])) == 1.0
    mirrored = square.copy()
    mirrored[..., 0] = 1.0 - mirrored[..., 0]  # clockwise triangles count too
    assert measure(np.concatenate([square, mirrored])) > 0.95  # all but the texels on a diagonal
    half = square * np.array([0.5, 1.0])  # the left half of the square placed a second time
    assert 0.3 < measure(np.concatenate([square, half])) < 0.7


def test_overlapping_active_uvs_are_refused_and_a_clean_map_passes(addon, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Stacked")
    assert addon.uv_overlap.overlap_fraction(addon.uv_overlap.uv_triangles(obj)) == 0.0  # the cube's own cross
    layer = obj.data.uv_layers.active
    corners = np.tile(np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32), (len(obj.data.polygons), 1))
    layer.uv.foreach_set("vector", corners.ravel())  # every face on the whole square: 6 faces, one texel each
    bpy.ops.object.camera_add(location=(6, 0, 0), rotation=(1.5708, 0, 1.5708))
    _select(bpy, obj, bpy.context.object)
    settings = scene.mvdiff
    settings.prompt, settings.camera_source, settings.uv_source = "stone", "SELECTED", "ACTIVE"
    settings.width = settings.height = 64
    settings.output_dir = str(tmp_path / "out")
    with pytest.raises(addon.job.JobError, match="100% of the UV map 'UVMap' of 'Stacked'.*'Unwrap'"):
        addon.job.prepare_texture_job(bpy.context)
    assert not (tmp_path / "out").exists()


def test_restore_materials_gives_back_the_users_assignment(addon, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Painted")
    red, blue = bpy.data.materials.new("Red"), bpy.data.materials.new("Blue")
    obj.data.materials.append(red)
    obj.data.materials.append(blue)
    own = np.array([0, 1, 0, 1, 1, 0], np.int32)
    obj.data.polygons.foreach_set("material_index", own)
    for seed in (0, 1):  # a second texture keeps the first record
        result = _result(tmp_path / f"job{seed}", {"Painted": _unwrap_rows(obj)})
        addon.apply.apply_texture([obj], result, object_names=["Painted"], output_dir=tmp_path / "o", basename="T")
    indices = np.empty(6, np.int32)
    obj.data.polygons.foreach_get("material_index", indices)
    assert set(indices.tolist()) == {2} and len(obj.material_slots) == 3
    stored = np.empty(6, np.int32)
    obj.data.attributes[addon.apply.MATERIAL_INDEX_ATTRIBUTE].data.foreach_get("value", stored)
    np.testing.assert_array_equal(stored, own)

    _select(bpy, obj)
    assert bpy.ops.mvdiff.restore_materials() == {"FINISHED"}
    obj.data.polygons.foreach_get("material_index", indices)
    np.testing.assert_array_equal(indices, own)
    assert [m.name for m in obj.data.materials] == ["Red", "Blue"]
    assert addon.apply.MATERIAL_INDEX_ATTRIBUTE not in obj.data.attributes
    assert "MVDiffusion" in obj.data.uv_layers  # the texture's UVs stay for a later apply


def test_the_texture_uv_map_becomes_active_and_active_render(addon, scene, tmp_path):
    import bpy

    obj = _cube(bpy, "Exported")
    result = _result(tmp_path / "job", {"Exported": _unwrap_rows(obj)})
    addon.apply.apply_texture([obj], result, object_names=["Exported"], output_dir=tmp_path / "o", basename="T")
    layers = obj.data.uv_layers
    assert layers.active.name == "MVDiffusion"
    assert [layer.name for layer in layers if layer.active_render] == ["MVDiffusion"]
    assert scene.mvdiff.make_uv_active, "on by default"


def test_a_new_world_keeps_the_users_world_in_the_saved_file(addon, scene, tmp_path):
    import bpy

    mine = bpy.data.worlds.new("Mine")
    scene.world = mine
    write_exr(tmp_path / "p.exr", np.ones((8, 16, 3), np.float32))
    world = addon.apply.apply_world(scene, tmp_path / "p.exr", output_dir=tmp_path, basename="Sky")
    assert scene.world == world and world.name == "Sky"
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "saved.blend"))
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "saved.blend"))
    assert "Mine" in bpy.data.worlds, "the user's World must survive the save"
    mapping = bpy.data.worlds["Sky"].node_tree.nodes[addon.apply.MAPPING_NODE_NAME]
    assert tuple(mapping.inputs["Rotation"].default_value) == (0.0, 0.0, 0.0)


def test_an_unsaved_file_saves_results_in_a_folder_that_outlives_the_extension(addon, scene, tmp_path,
                                                                                monkeypatch):
    import bpy

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))
    settings = scene.mvdiff
    assert not bpy.data.filepath and not settings.output_dir
    folder = addon.job.output_dir(settings)
    assert folder == tmp_path / "home" / "MVDiffusion"
    extension_folder = addon.preferences.user_folder("results").parent
    assert extension_folder not in folder.parents
    settings.world_prompt, settings.world_height, settings.world_view_size = "sky", 64, 64
    prepared = addon.job.prepare_world_job(bpy.context)
    assert prepared.folder.parent == tmp_path / "home" / "MVDiffusion" / "mvdiff_jobs"
    assert "MVDiffusion" in settings.bl_rna.properties["output_dir"].description
