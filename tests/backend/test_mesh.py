import numpy as np
import pytest

from backend.geometry.mesh import Mesh
from backend.validation import InputError

VERTS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
TRIS = np.array([[0, 1, 2], [1, 3, 2]])


def test_normals_follow_counter_clockwise_winding_and_ids_default_to_zero():
    mesh = Mesh(VERTS, TRIS)
    np.testing.assert_allclose(mesh.face_normals(), [[0, 0, 1], [0, 0, 1]])
    assert mesh.num_objects == 1 and mesh.object_ids.dtype == np.int32


def test_concatenate_offsets_indices_and_object_ids():
    merged = Mesh.concatenate([Mesh(VERTS, TRIS), Mesh(VERTS + 2, TRIS)])
    assert merged.num_objects == 2
    np.testing.assert_array_equal(merged.triangles[2:], TRIS + 4)
    np.testing.assert_array_equal(merged.object_ids, [0, 0, 1, 1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(vertices=np.zeros((0, 3)), triangles=TRIS), "vertices"),
        (dict(vertices=VERTS, triangles=np.zeros((0, 3), int)), "triangles"),
        (dict(vertices=VERTS, triangles=[[0, 1, 7]]), "triangles"),
        (dict(vertices=VERTS, triangles=[[0, 1, 1]]), "triangles"),
        (dict(vertices=VERTS[:, :2], triangles=TRIS), "vertices"),
        (dict(vertices=np.where(VERTS == 1, np.nan, VERTS), triangles=TRIS), "vertices"),
        (dict(vertices=VERTS, triangles=TRIS, uvs=np.full((2, 3, 2), 1.5)), "uvs"),
        (dict(vertices=VERTS, triangles=TRIS, uvs=np.zeros((3, 3, 2))), "uvs"),
        (dict(vertices=VERTS, triangles=np.array([[0.5, 1, 2]])), "triangles"),
        (dict(vertices=VERTS, triangles=TRIS, object_ids=[0]), "object_ids"),
    ],
)
def test_bad_meshes_name_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        Mesh(**kwargs)
    assert err.value.field == field
