import numpy as np
import pytest

from backend.geometry.cameras import Camera, look_at
from backend.geometry.mesh import Mesh
from backend.geometry.raster import rasterize_view
from backend.geometry.render import render_depth, render_textured, sample_texture
from backend.validation import InputError

QUAD_TRIANGLES = np.array([[0, 1, 2], [0, 2, 3]])
QUAD_UVS = np.array([[[0, 0], [1, 0], [1, 1]], [[0, 0], [1, 1], [0, 1]]], np.float32)


def facing_quad(camera: Camera, half_x: float, half_y: float, z: float) -> Mesh:
    """A quad at planar depth z with UV (0, 0) at its bottom-left as the camera sees it (y down)."""
    local = np.array([[-half_x, half_y, z], [half_x, half_y, z], [half_x, -half_y, z], [-half_x, -half_y, z]])
    return Mesh((local @ camera.rotation.T + camera.center).astype(np.float32), QUAD_TRIANGLES, QUAD_UVS)


@pytest.mark.parametrize("as_float", [False, True])
def test_quad_filling_the_view_reproduces_the_texture(as_float):
    size, z = 48, 2.0
    cam = Camera.from_fov(70.0, size, size, look_at([0.5, -1.0, 1.0], [3.0, 2.0, 0.5]))
    # Image edges at pixel-centre +-0.5 map to the quad's edges, so pixel centres hit texel centres.
    half = 0.5 * size / cam.K[0, 0] * z
    texture = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    given = texture.astype(np.float32) / 255.0 if as_float else texture
    view = render_textured(facing_quad(cam, half, half, z), given, cam)
    assert view.image.dtype == np.uint8 and view.image.shape == (size, size, 3)
    assert np.abs(view.image.astype(int) - texture).max() <= 1
    np.testing.assert_allclose(view.depth, z, rtol=1e-6)


def test_near_textured_quad_hides_far_one_and_background_is_filled():
    cam = Camera.from_fov(60.0, 40, 30)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    green = np.zeros((4, 4, 3), np.uint8)
    green[..., 1] = 255
    near = facing_quad(cam, 0.2, 0.2, 1.5)
    far = facing_quad(cam, 1.0, 0.6, 3.0)
    # One texture for both: the near quad's UVs point at the red left half, the far one's at green.
    texture = np.concatenate([red, green], axis=1)
    near_uvs = QUAD_UVS * [0.25, 1.0]
    far_uvs = QUAD_UVS * [0.25, 1.0] + [0.75, 0.0]
    mesh = Mesh.concatenate(
        [Mesh(near.vertices, QUAD_TRIANGLES, near_uvs), Mesh(far.vertices, QUAD_TRIANGLES, far_uvs)]
    )
    view = render_textured(mesh, texture, cam, background=(10, 20, 30))
    near_mask = rasterize_view(near, cam).covered
    far_mask = rasterize_view(far, cam).covered & ~near_mask
    background = ~(near_mask | far_mask)
    assert near_mask.sum() > 20 and far_mask.sum() > 20 and background.sum() > 20
    assert np.all(view.image[near_mask] == [255, 0, 0])
    assert np.all(view.image[far_mask] == [0, 255, 0])
    assert np.all(view.image[background] == [10, 20, 30])
    np.testing.assert_allclose(view.depth[near_mask], 1.5, rtol=1e-6)
    assert np.all(view.depth[background] == 0) and np.all(view.triangle[background] == -1)
    np.testing.assert_array_equal(render_depth(mesh, cam), view.depth)


def test_top_texture_row_is_v_one():
    texture = np.zeros((2, 2, 3), np.uint8)
    texture[0] = 200  # top row
    assert sample_texture(texture.astype(np.float32), np.array([0.5, 0.9]))[0] == pytest.approx(200)
    assert sample_texture(texture.astype(np.float32), np.array([0.5, 0.1]))[0] == pytest.approx(0)


def test_bilinear_sampling_hits_texel_centres_blends_between_and_clamps():
    texture = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    centres = np.array([[(j + 0.5) / 4, 1 - (i + 0.5) / 4] for i in range(4) for j in range(4)])
    np.testing.assert_allclose(sample_texture(texture, centres), texture.reshape(-1, 3), atol=1e-5)
    halfway = sample_texture(texture, np.array([2.0 / 4, 1 - 0.5 / 4]))  # between (0, 1) and (0, 2)
    np.testing.assert_allclose(halfway, 0.5 * (texture[0, 1] + texture[0, 2]), atol=1e-5)
    np.testing.assert_allclose(sample_texture(texture, np.array([0.0, 1.0])), texture[0, 0], atol=1e-5)
    np.testing.assert_allclose(sample_texture(texture, np.array([1.0, 0.0])), texture[3, 3], atol=1e-5)


def test_invalid_inputs_name_the_field():
    cam = Camera.from_fov(60.0, 8, 8)
    textured = facing_quad(cam, 0.5, 0.5, 2.0)
    untextured = Mesh(textured.vertices, QUAD_TRIANGLES)
    texture = np.zeros((4, 4, 3), np.uint8)
    cases = [
        ((untextured, texture, cam), {}, "mesh"),
        ((textured, np.zeros((4, 4)), cam), {}, "texture"),
        ((textured, np.full((4, 4, 3), 1.5), cam), {}, "texture"),
        ((textured, np.zeros((4, 4, 3), np.int16), cam), {}, "texture"),
        ((textured, texture, cam), {"background": (0, 0, 300)}, "background"),
        ((textured, texture, "cam"), {}, "camera"),
    ]
    for args, kwargs, field in cases:
        with pytest.raises(InputError) as err:
            render_textured(*args, **kwargs)
        assert err.value.field == field
