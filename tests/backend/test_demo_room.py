import numpy as np

from backend.geometry.correspondence import overlap_matrix
from backend.geometry.keyframes import select_keyframes
from backend.geometry.render import render_depth
from backend.scenes.demo_room import ROOM_SIZE, build_demo_room, ground_truth_colours, trajectory


def test_room_is_closed_and_every_camera_sees_geometry_in_every_pixel():
    room = build_demo_room()
    assert {"walls", "floor", "ceiling", "table", "column", "ball"} <= set(room.object_names)
    for camera in trajectory(6, width=64, height=48):
        depth = render_depth(room.mesh, camera)
        assert np.all(depth > 0), "a hole in the room lets a camera see the void"
        assert depth.max() < np.linalg.norm(ROOM_SIZE)


def test_room_surfaces_face_the_cameras_inside():
    room = build_demo_room()
    normals = room.mesh.face_normals()
    centroids = room.mesh.corners.mean(axis=1)
    shell = np.isin(room.mesh.object_ids, [room.object_names.index(n) for n in ("walls", "floor", "ceiling")])
    inward = np.einsum("ij,ij->i", normals[shell], np.array([0, 0, ROOM_SIZE[2] / 2]) - centroids[shell])
    assert np.all(inward > 0)


def test_ground_truth_texture_varies_within_and_between_objects():
    room = build_demo_room()
    names = room.object_names
    points = np.random.default_rng(0).uniform([-3, -2.5, 0], [3, 2.5, 2.8], size=(500, 3))
    walls = ground_truth_colours(points, np.full(500, names.index("walls")), names)
    floor = ground_truth_colours(points, np.full(500, names.index("floor")), names)
    assert walls.min() >= 0 and walls.max() <= 1
    assert walls.std(axis=0).min() > 0.02
    assert np.abs(walls.mean(axis=0) - floor.mean(axis=0)).max() > 0.1


def test_keyframes_on_the_demo_loop_overlap_within_the_default_range():
    room = build_demo_room()
    cameras = trajectory(24, width=64, height=48)
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    plan = select_keyframes(overlap_matrix(cameras, depths, stride=4))
    assert 3 <= len(plan.keyframes) < 24
    assert not plan.weak_links
    assert all(0.3 <= overlap <= 0.6 for overlap in plan.pair_overlap[:-1]), plan.pair_overlap
