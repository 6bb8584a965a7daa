"""Mesh export: evaluated triangles in world space, per-corner UVs, object ids, occluders, the errors."""

import importlib
import time

import numpy as np
import pytest

pytestmark = pytest.mark.blender


@pytest.fixture
def export(addon):
    """The add-on's ``export`` module (imported here: nothing else may have imported it yet)."""
    return importlib.import_module(f"{addon.__name__}.export")


def _link(bpy, scene, obj, collection=None):
    (collection or scene.collection).objects.link(obj)
    return obj


def _grid_mesh(bpy, name, n, uv=True):
    """An n x n grid of quads as 2 n^2 triangles in the XY plane, built from numpy (fast)."""
    ys, xs = np.mgrid[0 : n + 1, 0 : n + 1]
    V = np.stack([xs.ravel() / n, ys.ravel() / n, np.zeros(xs.size)], axis=1).astype(np.float32)
    i = (np.arange(n)[:, None] * (n + 1) + np.arange(n)[None, :]).ravel()
    T = np.concatenate([np.stack([i, i + 1, i + n + 2], 1), np.stack([i, i + n + 2, i + n + 1], 1)]).astype(np.int32)
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(V))
    me.vertices.foreach_set("co", V.ravel())
    me.loops.add(T.size)
    me.loops.foreach_set("vertex_index", T.ravel())
    me.polygons.add(len(T))
    me.polygons.foreach_set("loop_start", np.arange(0, T.size, 3, dtype=np.int32))
    if uv:
        me.uv_layers.new(name="UVMap").uv.foreach_set("vector", V[T.ravel(), :2].ravel())
    me.update(calc_edges=True)
    me.validate()
    return me


def _cube(bpy, scene, name="Cube", location=(0, 0, 0)):
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=location)
    obj = bpy.context.object
    obj.name = name
    return obj


def _manual_corners(bpy, obj, depsgraph):
    """Per-triangle corner positions (world) and loop indices of the evaluated mesh, the slow way."""
    from mathutils import Vector  # noqa: F401  (matrix @ vector below)

    evaluated = obj.evaluated_get(depsgraph)
    me = bpy.data.meshes.new_from_object(evaluated)
    me.calc_loop_triangles()
    world = evaluated.matrix_world
    corners = np.array([[list(world @ me.vertices[v].co) for v in tri.vertices] for tri in me.loop_triangles])
    loops = np.array([list(tri.loops) for tri in me.loop_triangles])
    uv = None
    if me.uv_layers.active is not None:
        uv = np.array([[list(me.uv_layers.active.data[k].uv) for k in tri] for tri in loops])
    bpy.data.meshes.remove(me)
    return corners, uv


def test_evaluated_world_space_triangles(export, scene):
    import bpy

    obj = _cube(bpy, scene)
    bevel = obj.modifiers.new("Bevel", "BEVEL")
    bevel.width, bevel.segments = 0.2, 2
    array = obj.modifiers.new("Array", "ARRAY")
    array.count = 3
    obj.location = (1.0, -2.0, 0.5)
    obj.rotation_euler = (0.3, -0.7, 1.1)
    obj.scale = (1.5, 0.5, 2.0)
    depsgraph = bpy.context.evaluated_depsgraph_get()

    # (UNWRAP would refuse: Bevel and Array change the topology, see below)
    exported = export.export_meshes(depsgraph, [obj], "ACTIVE")
    mesh = exported.mesh
    want, want_uv = _manual_corners(bpy, obj, depsgraph)
    assert len(mesh.triangles) == len(want) > 12 * 3  # the modifiers are applied
    assert mesh.vertices.dtype == np.float32 and mesh.triangles.dtype == np.int32
    np.testing.assert_allclose(mesh.vertices[mesh.triangles], want, atol=1e-5)
    np.testing.assert_array_equal(mesh.uvs, want_uv.astype(np.float32))
    assert exported.uv_maps == ["UVMap"]
    assert exported.object_names == ["Cube"] and exported.occluders is None
    assert np.all(mesh.object_ids == 0)
    # the original mesh's own data is untouched
    assert len(obj.data.vertices) == 8


def test_active_uvs_per_corner(export, scene):
    import bpy

    obj = _cube(bpy, scene)
    obj.rotation_euler = (0.2, 0.4, 0.6)
    me = obj.data
    first = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers["UVMap"].uv.foreach_get("vector", first)
    second = me.uv_layers.new(name="Second")
    second.uv.foreach_set("vector", first * 0.5 + np.tile([0.25, 0.1], len(me.loops)).astype(np.float32))
    me.uv_layers.active = second
    depsgraph = bpy.context.evaluated_depsgraph_get()

    exported = export.export_meshes(depsgraph, [obj], "ACTIVE")
    corners, uv = _manual_corners(bpy, obj, depsgraph)
    np.testing.assert_allclose(exported.mesh.vertices[exported.mesh.triangles], corners, atol=1e-5)
    np.testing.assert_array_equal(exported.mesh.uvs, uv.astype(np.float32))
    assert exported.uv_maps == ["Second"]


def test_mirrored_object_keeps_outward_winding_and_matching_uvs(export, scene):
    import bpy

    obj = _cube(bpy, scene)
    obj.scale = (-1.0, 1.0, 1.0)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    assert export.mirrored(obj)

    exported = export.export_meshes(depsgraph, [obj], "ACTIVE")
    mesh = exported.mesh
    centroids = mesh.corners.mean(axis=1)
    assert np.all(np.einsum("ij,ij->i", mesh.face_normals(), centroids) > 0)  # normals point out of the cube
    corners, uv = _manual_corners(bpy, obj, depsgraph)
    order = export.corner_order(obj)
    np.testing.assert_allclose(mesh.vertices[mesh.triangles], corners[:, order], atol=1e-5)
    np.testing.assert_array_equal(mesh.uvs, uv[:, order].astype(np.float32))


def test_two_objects_get_ids_and_names(export, scene):
    import bpy

    a = _cube(bpy, scene, "A")
    b = _link(bpy, scene, bpy.data.objects.new("B", _grid_mesh(bpy, "grid", 3)))
    b.location = (5, 0, 0)
    depsgraph = bpy.context.evaluated_depsgraph_get()

    exported = export.export_meshes(depsgraph, [b, a], "UNWRAP")
    assert exported.object_names == ["B", "A"]
    np.testing.assert_array_equal(exported.mesh.object_ids, [0] * 18 + [1] * 12)
    assert len(exported.mesh.vertices) == 16 + 8
    np.testing.assert_allclose(exported.mesh.vertices[exported.mesh.triangles[:18]].min(axis=(0, 1)), [5, 0, 0])


def test_active_refuses_several_objects(export, scene):
    import bpy

    a, b = _cube(bpy, scene, "A"), _cube(bpy, scene, "B", (3, 0, 0))
    depsgraph = bpy.context.evaluated_depsgraph_get()
    with pytest.raises(export.ExportError, match="Active UV Map"):
        export.export_meshes(depsgraph, [a, b], "ACTIVE")


def test_active_needs_a_uv_map(export, scene):
    import bpy

    obj = _link(bpy, scene, bpy.data.objects.new("NoUV", _grid_mesh(bpy, "plain", 2, uv=False)))
    depsgraph = bpy.context.evaluated_depsgraph_get()
    with pytest.raises(export.ExportError, match="'NoUV' has no UV map.*Unwrap"):
        export.export_meshes(depsgraph, [obj], "ACTIVE")


def test_active_refuses_uvs_outside_the_unit_square(export, scene):
    import bpy

    obj = _cube(bpy, scene, "Tiled")
    layer = obj.data.uv_layers.active
    uv = np.empty(len(obj.data.loops) * 2, np.float32)
    layer.uv.foreach_get("vector", uv)
    layer.uv.foreach_set("vector", uv * 3.0)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    with pytest.raises(export.ExportError, match="'Tiled'.*outside the 0-1"):
        export.export_meshes(depsgraph, [obj], "ACTIVE")


def test_unwrap_refuses_topology_changing_modifiers(export, scene):
    import bpy

    obj = _cube(bpy, scene, "Smooth")
    obj.modifiers.new("Subdivision", "SUBSURF")
    depsgraph = bpy.context.evaluated_depsgraph_get()
    with pytest.raises(export.ExportError, match="'Smooth'.*apply the modifier"):
        export.export_meshes(depsgraph, [obj], "UNWRAP")
    # the same object can be textured through its own UV map
    assert len(export.export_meshes(depsgraph, [obj], "ACTIVE").mesh.triangles) == 6 * 4 * 2


def test_unwrap_accepts_deforming_modifiers(export, scene):
    import bpy

    obj = _cube(bpy, scene, "Bent")
    deform = obj.modifiers.new("Deform", "SIMPLE_DEFORM")
    deform.angle = 0.5
    depsgraph = bpy.context.evaluated_depsgraph_get()
    exported = export.export_meshes(depsgraph, [obj], "UNWRAP")
    want, _ = _manual_corners(bpy, obj, depsgraph)
    np.testing.assert_allclose(exported.mesh.vertices[exported.mesh.triangles], want, atol=1e-5)


def test_refuses_non_meshes_empty_meshes_and_shared_data(export, scene):
    import bpy

    ExportError = export.ExportError
    depsgraph = bpy.context.evaluated_depsgraph_get()
    text = _link(bpy, scene, bpy.data.objects.new("Label", bpy.data.curves.new("label", "FONT")))
    with pytest.raises(ExportError, match="'Label' is a font object"):
        export.export_meshes(depsgraph, [text], "UNWRAP")
    empty = _link(bpy, scene, bpy.data.objects.new("Hollow", bpy.data.meshes.new("hollow")))
    depsgraph = bpy.context.evaluated_depsgraph_get()
    with pytest.raises(ExportError, match="'Hollow' has no faces"):
        export.export_meshes(depsgraph, [empty], "UNWRAP")
    a = _cube(bpy, scene, "Original")
    b = _link(bpy, scene, bpy.data.objects.new("Instance", a.data))
    depsgraph = bpy.context.evaluated_depsgraph_get()
    with pytest.raises(ExportError, match="'Original' and 'Instance' share the mesh"):
        export.export_meshes(depsgraph, [a, b], "UNWRAP")
    with pytest.raises(ExportError, match="no objects"):
        export.export_meshes(depsgraph, [], "UNWRAP")


def test_occluders_and_scene_occluders(export, scene):
    import bpy

    textured = _cube(bpy, scene, "Textured")
    wall = _link(bpy, scene, bpy.data.objects.new("Wall", _grid_mesh(bpy, "wall", 2)))
    wall.location = (0, 0, 3)
    word = bpy.data.curves.new("word", "FONT")
    word.body = "Hi"
    label = _link(bpy, scene, bpy.data.objects.new("Label", word))
    no_render = _link(bpy, scene, bpy.data.objects.new("NoRender", _grid_mesh(bpy, "g1", 1)))
    no_render.hide_render = True
    no_camera = _link(bpy, scene, bpy.data.objects.new("NoCamera", _grid_mesh(bpy, "g2", 1)))
    no_camera.visible_camera = False
    _link(bpy, scene, bpy.data.objects.new("Lamp", bpy.data.lights.new("lamp", "POINT")))
    _link(bpy, scene, bpy.data.objects.new("Path", bpy.data.curves.new("path", "CURVE")))  # no faces
    hidden_parent = bpy.data.collections.new("HiddenParent")
    scene.collection.children.link(hidden_parent)
    hidden_parent.hide_render = True
    child = bpy.data.collections.new("Child")
    hidden_parent.children.link(child)
    _link(bpy, scene, bpy.data.objects.new("InHidden", _grid_mesh(bpy, "g3", 1)), child)
    excluded = bpy.data.collections.new("Excluded")
    scene.collection.children.link(excluded)
    _link(bpy, scene, bpy.data.objects.new("InExcluded", _grid_mesh(bpy, "g4", 1)), excluded)
    bpy.context.view_layer.layer_collection.children["Excluded"].exclude = True
    shown = bpy.data.collections.new("Shown")
    scene.collection.children.link(shown)
    extra = _link(bpy, scene, bpy.data.objects.new("InShown", _grid_mesh(bpy, "g5", 1)), shown)
    depsgraph = bpy.context.evaluated_depsgraph_get()

    occluders = export.scene_occluders(scene, depsgraph, [textured])
    assert sorted(o.name for o in occluders) == ["InShown", "Label", "Path", "Wall"]

    exported = export.export_meshes(depsgraph, [textured], "UNWRAP", occluders=occluders)
    assert exported.object_names == ["Textured"] and len(exported.mesh.triangles) == 12
    occ = exported.occluders
    assert occ is not None and occ.uvs is None and np.all(occ.object_ids == 0)
    label_tris = len(label.evaluated_get(depsgraph).to_mesh().loop_triangles)
    label.evaluated_get(depsgraph).to_mesh_clear()
    assert label_tris > 0
    assert len(occ.triangles) == 8 + label_tris + 2  # the wall, the text, the shown grid; the path has no faces
    assert occ.vertices[:, 2].max() == pytest.approx(3.0)  # the wall, in world space
    del extra


def test_large_export_completes(export, scene):
    import bpy

    obj = _link(bpy, scene, bpy.data.objects.new("Big", _grid_mesh(bpy, "big", 317)))  # 201,178 triangles
    depsgraph = bpy.context.evaluated_depsgraph_get()
    for uv_source in ("ACTIVE", "UNWRAP"):
        start = time.perf_counter()
        exported = export.export_meshes(depsgraph, [obj], uv_source)
        print(f"export of {len(exported.mesh.triangles)} triangles ({uv_source}): {time.perf_counter() - start:.3f} s")
        assert len(exported.mesh.triangles) == 2 * 317 * 317


def test_unwrap_refuses_a_deformation_that_splits_a_quad_differently(export, scene):
    import bpy

    me = bpy.data.meshes.new("quad")
    me.from_pydata([(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)], [], [(0, 1, 2, 3)])
    obj = _link(bpy, scene, bpy.data.objects.new("Dented", me))
    obj.shape_key_add(name="Basis")
    dent = obj.shape_key_add(name="Dent")
    dent.data[1].co = (0.5, 0.6, 0.0)  # a reflex corner: only the diagonal 1-3 lies inside the quad
    dent.value = 1.0
    depsgraph = bpy.context.evaluated_depsgraph_get()
    with pytest.raises(export.ExportError, match="'Dented'.*split some quads"):
        export.export_meshes(depsgraph, [obj], "UNWRAP")
    dent.value = 0.0
    depsgraph = bpy.context.evaluated_depsgraph_get()
    assert len(export.export_meshes(depsgraph, [obj], "UNWRAP").mesh.triangles) == 2


def test_unwrap_sends_each_triangles_polygon_numbered_across_objects(export, scene):
    import bpy

    a = _cube(bpy, scene, "A")  # six quads, two triangles each
    b = _link(bpy, scene, bpy.data.objects.new("B", _grid_mesh(bpy, "grid", 3)))  # 18 triangles, 18 polygons
    depsgraph = bpy.context.evaluated_depsgraph_get()

    polygons = export.export_meshes(depsgraph, [b, a], "UNWRAP").mesh.polygon_ids
    np.testing.assert_array_equal(polygons[:18], np.arange(18))
    assert sorted(np.bincount(polygons[18:] - 18)) == [2] * 6  # each quad of the cube: two triangles
    # Each quad's two triangles share two vertices (the diagonal).
    cube_triangles = export.export_meshes(depsgraph, [a], "UNWRAP").mesh
    for quad in range(6):
        pair = cube_triangles.triangles[cube_triangles.polygon_ids == quad]
        assert len(set(pair[0]) & set(pair[1])) == 2
    assert export.export_meshes(depsgraph, [a], "ACTIVE").mesh.polygon_ids is None
