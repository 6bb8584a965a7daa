import numpy as np
import pytest

from backend.eval.bake_roundtrip import bake_roundtrip
from backend.geometry.bake import BakeSettings, TexelChunks, View, bake, visible_texels
from backend.geometry.cameras import Camera, look_at
from backend.geometry.mesh import Mesh
from backend.geometry.raster import rasterize_uv
from backend.geometry.render import render_textured
from backend.validation import InputError

QUAD = np.array([[0, 1, 2], [0, 2, 3]])


def quad_mesh(corners, uv_low, uv_high) -> Mesh:
    """A quad whose UVs fill the rectangle uv_low..uv_high (corner 0 at uv_low)."""
    (u0, v0), (u1, v1) = uv_low, uv_high
    uv = np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], np.float32)
    return Mesh(np.asarray(corners, np.float32), QUAD, uv[QUAD])


def wall(x: float, half: float = 1.0, uv_low=(0.05, 0.05), uv_high=(0.95, 0.95)) -> Mesh:
    """A square wall in the plane x = const facing -X (towards the cameras at the origin)."""
    corners = [[x, half, -half], [x, -half, -half], [x, -half, half], [x, half, half]]
    return quad_mesh(corners, uv_low, uv_high)


def smooth_texture(size: int) -> np.ndarray:
    v, u = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * u), 0.5 + 0.4 * np.cos(5 * v), 0.3 + 0.3 * u * v], -1)
    return (rgb * 255).round().astype(np.uint8)


def view_of(mesh: Mesh, texture: np.ndarray, camera: Camera) -> View:
    rendered = render_textured(mesh, texture, camera)
    return View(rendered.image, camera, rendered.depth)


def frontal_camera(size=96) -> Camera:
    return Camera.from_fov(70.0, size, size, look_at([0, 0, 0], [1, 0, 0]))


def test_frontal_view_bakes_back_the_texture():
    mesh, texture = wall(2.0), smooth_texture(64)
    surface = rasterize_uv(mesh, 64)
    result = bake(surface, [view_of(mesh, texture, frontal_camera())])
    assert result.seen.sum() > 0.9 * surface.covered.sum()
    error = np.abs(result.texture_uint8().astype(int) - texture)[result.seen]
    assert error.mean() < 2.0 and error.max() <= 12


def test_occluder_hides_texels_and_never_bleeds_its_colour():
    back = wall(3.0, uv_low=(0.0, 0.0), uv_high=(0.5, 1.0))
    occluder = wall(1.5, half=0.25, uv_low=(0.6, 0.6), uv_high=(0.9, 0.9))
    mesh = Mesh.concatenate([back, occluder])
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[..., 1] = 200  # the wall is green...
    texture[:, 38:, :] = [255, 0, 0]  # ...the occluder's part of the atlas red
    surface = rasterize_uv(mesh, 64)
    result = bake(surface, [view_of(mesh, texture, frontal_camera(128))], BakeSettings(fill_unseen=False))
    behind = surface.covered & (surface.position[..., 0] > 2.9) & (np.abs(surface.position[..., 1]) < 0.4)
    behind &= np.abs(surface.position[..., 2]) < 0.4
    assert behind.sum() > 10 and not result.seen[behind].any()
    wall_texels = result.seen & (surface.position[..., 0] > 2.9)
    assert wall_texels.sum() > 100
    assert result.texture_uint8()[wall_texels][:, 0].max() == 0, "red bled from the occluder onto the wall"


def two_views_of_one_texel():
    """A wall seen squarely (all blue) and obliquely (all red): uniform images, known weights."""
    mesh = wall(2.0)
    frontal = frontal_camera(64)
    oblique = Camera.from_fov(70.0, 64, 64, look_at([0.5, -1.5, 0.0], [2.0, 0.0, 0.0]))
    views = []
    for camera, colour in ((frontal, (0, 0, 255)), (oblique, (255, 0, 0))):
        depth = render_textured(mesh, np.zeros((4, 4, 3), np.uint8), camera).depth
        views.append(View(np.full((64, 64, 3), colour, np.uint8), camera, depth))
    return mesh, views


def test_blend_weights_square_views_more_and_best_takes_the_squarest():
    mesh, views = two_views_of_one_texel()
    surface = rasterize_uv(mesh, 32)
    blend = bake(surface, views, BakeSettings(mode="blend", power=4.0)).texture
    best = bake(surface, views, BakeSettings(mode="best")).texture
    centre = surface.covered & (np.abs(surface.position[..., 1]) < 0.2) & (np.abs(surface.position[..., 2]) < 0.2)
    assert centre.any()
    # Both views see the centre; the frontal one (blue) dominates the blend and wins "best".
    assert np.all(blend[centre][:, 2] > blend[centre][:, 0]) and np.all(blend[centre][:, 0] > 0.01)
    np.testing.assert_allclose(best[centre], np.tile([0.0, 0.0, 1.0], (centre.sum(), 1)), atol=1e-6)


def test_grazing_views_are_cut_off():
    mesh, views = two_views_of_one_texel()
    surface = rasterize_uv(mesh, 32)
    oblique_only = [views[1]]
    loose = bake(surface, oblique_only, BakeSettings(min_cos=0.1, fill_unseen=False))
    strict = bake(surface, oblique_only, BakeSettings(min_cos=0.99, fill_unseen=False))
    assert loose.seen.sum() > 100 and strict.seen.sum() == 0


def test_unseen_texels_are_filled_from_the_same_object_and_islands_padded():
    seen_wall = wall(2.0, uv_low=(0.0, 0.0), uv_high=(0.45, 1.0))
    hidden_wall = wall(2.0, uv_low=(0.55, 0.0), uv_high=(1.0, 1.0))
    hidden_wall = Mesh(hidden_wall.vertices + [0, 0, 5.0], hidden_wall.triangles, hidden_wall.uvs)  # out of view
    mesh = Mesh.concatenate([seen_wall, hidden_wall])
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[:, :32] = [0, 0, 255]
    surface = rasterize_uv(mesh, 64)
    view = view_of(mesh, texture, frontal_camera())
    gutter = ~surface.covered
    result = bake(surface, [view], BakeSettings(padding=2), object_ids=mesh.object_ids)
    hidden = surface.covered & (surface.position[..., 2] > 3.0)
    assert hidden.any() and not result.seen[hidden].any()
    assert result.filled[hidden].all() and not result.filled[result.seen].any()
    # The hidden object was never seen, so it borrows the nearest seen surface (the blue wall).
    assert np.all(result.texture[hidden][:, 2] > 0.9)
    assert result.padded.any() and not result.padded[surface.covered].any()
    assert gutter[result.padded].all()
    # Padding reaches 2 texels into the gutter and no further.
    far_gutter = gutter & ~result.padded
    assert far_gutter.any() and np.all(result.texture[far_gutter] == 0)


def test_padding_none_fills_the_whole_atlas():
    mesh = wall(2.0, uv_low=(0.2, 0.2), uv_high=(0.6, 0.6))
    surface = rasterize_uv(mesh, 32)
    view = view_of(mesh, np.full((8, 8, 3), 90, np.uint8), frontal_camera(64))
    result = bake(surface, [view], BakeSettings(padding=None))
    assert np.all(np.abs(result.texture - 90 / 255) < 1e-3)


def test_visible_texels_match_what_a_bake_of_the_same_views_sees():
    mesh, views = two_views_of_one_texel()
    chunks = TexelChunks(rasterize_uv(mesh, 32))
    np.testing.assert_array_equal(visible_texels(chunks, views), bake(chunks, views).seen)


@pytest.mark.slow
def test_demo_room_round_trip_meets_quality_targets():
    trip = bake_roundtrip(texture_size=1024, views=24, heldout=8)
    assert trip.psnr_db >= 35.0, trip.psnr_per_view
    assert trip.coverage >= 0.99


def test_bad_input_names_the_field():
    mesh = wall(2.0)
    surface = rasterize_uv(mesh, 16)
    camera = frontal_camera(32)
    depth = np.ones((32, 32), np.float32)
    image = np.zeros((32, 32, 3), np.uint8)
    cases = [
        ([View(image.astype(np.float32), camera, depth)], BakeSettings(), "views[0].image"),
        ([View(image[:, :10], camera, depth)], BakeSettings(), "views[0].image"),
        ([View(image, camera, np.full((32, 32), np.nan, np.float32))], BakeSettings(), "views[0].depth"),
        ([View(image, camera, -depth)], BakeSettings(), "views[0].depth"),
        ([], BakeSettings(), "views"),
        ([View(image, camera, depth)], BakeSettings(mode="median"), "mode"),
        ([View(image, camera, depth)], BakeSettings(padding=-1), "padding"),
    ]
    for views, settings, field in cases:
        with pytest.raises(InputError) as err:
            bake(surface, views, settings)
        assert err.value.field == field
    with pytest.raises(InputError, match="surface"):
        bake("not a surface", [View(image, camera, depth)])
