"""Render-back: what the add-on puts into the scene, rendered by Cycles, matches the backend's own render.

The textured demo room (unwrapped by the backend, its UVs written by the add-on into the
``MVDiffusion`` map, the texture loaded as the add-on loads it) seen through a demo camera must look
like the backend's reference renderer's view of the same mesh and texture; the HDRI World must look
like the backend's perspective view of the equirect it came from. A flipped or shifted UV map, an
upside-down image or a wrong colour space each costs far more than the PSNR margin.

Renders are tiny (64 x 48, one sample, a pixel filter narrower than a pixel so Cycles samples pixel
centres as the reference does) and unlit: the texture drives an Emission shader, the view transform
is Standard, so a pixel's sRGB value is the texture's.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from backend.geometry.cameras import Camera
from backend.geometry.equirect import equirect_to_perspective
from backend.geometry.mesh import Mesh
from backend.geometry.render import render_textured
from backend.geometry.uv_atlas import ensure_uvs
from backend.imaging.hdr import linear_to_srgb, write_exr
from backend.pipelines.texturing_outputs import object_uvs, write_npz, write_texture

pytestmark = pytest.mark.blender

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import blender_demo_room  # noqa: E402

WIDTH, HEIGHT = 64, 48
MIN_PSNR = 30.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _unlit_render(bpy, scene, camera_object, path: Path) -> np.ndarray:
    """uint8 (H, W, 3) sRGB, row 0 at the top: Cycles, one centred sample per pixel, no lights, no denoise."""
    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x, render.resolution_y, render.resolution_percentage = WIDTH, HEIGHT, 100
    render.filter_size = 0.01
    render.use_compositing = False
    render.image_settings.file_format = "PNG"
    render.image_settings.color_mode = "RGB"
    render.image_settings.color_depth = "8"
    render.filepath = str(path)
    cycles = scene.cycles
    cycles.device, cycles.samples, cycles.use_denoising = "CPU", 1, False
    cycles.use_adaptive_sampling, cycles.max_bounces = False, 0
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure, scene.view_settings.gamma = 0.0, 1.0
    scene.display_settings.display_device = "sRGB"
    scene.camera = camera_object
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(str(path))
    try:
        pixels = np.empty(WIDTH * HEIGHT * image.channels, np.float32)
        image.pixels.foreach_get(pixels)  # byte images give the stored sRGB values
    finally:
        bpy.data.images.remove(image)
    rgb = pixels.reshape(HEIGHT, WIDTH, -1)[::-1, :, :3]
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _backend_camera(pose) -> Camera:
    """The pose as this test's backend sees it (the add-on imports its own copy of the backend's classes)."""
    camera = pose.to_camera(WIDTH, HEIGHT)
    return Camera(camera.K, camera.cam_to_world, camera.width, camera.height)


def _camera(bpy, scene, pose):
    data = bpy.data.cameras.new("Render Back")
    obj = bpy.data.objects.new("Render Back", data)
    scene.collection.objects.link(obj)
    pose.apply_to(obj)
    return obj


def _emission_only(material):
    """The add-on's material, unlit: its image texture straight into an Emission shader."""
    tree = material.node_tree
    texture = next(n for n in tree.nodes if n.type == "TEX_IMAGE")
    output = next(n for n in tree.nodes if n.type == "OUTPUT_MATERIAL")
    emission = tree.nodes.new("ShaderNodeEmission")
    tree.links.new(texture.outputs["Color"], emission.inputs["Color"])
    tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])


def _uv_texture(size: int) -> np.ndarray:
    """A texture that differs under any flip or swap of u and v (row 0 = v 1, the atlas layout)."""
    v, u = np.meshgrid(1.0 - (np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    return np.stack([0.1 + 0.8 * u, 0.1 + 0.8 * v, 0.5 + 0.35 * np.sin(2 * np.pi * (u + 2 * v))], axis=-1)


def test_a_textured_object_renders_as_the_backend_renders_its_texture(addon, scene, tmp_path):
    import bpy

    objects = blender_demo_room.build_demo_room_objects(bpy)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    exported = addon.export.export_meshes(depsgraph, objects, "UNWRAP")
    size = 256
    sent = exported.mesh  # as the backend reads it, unwrapped by the backend's own unwrap
    atlas = ensure_uvs(Mesh(sent.vertices, sent.triangles, None, sent.object_ids), resolution=size, padding=2)
    texture = _uv_texture(size)
    result = tmp_path / "result"
    result.mkdir()
    write_texture(result / "texture.png", texture, 8)
    write_npz(result / "uvs.npz", object_uvs(atlas.mesh, exported.object_names))

    applied = addon.apply.apply_texture(objects, result, object_names=exported.object_names,
                                        output_dir=tmp_path / "out", basename="RenderBack")
    for material in applied.materials:
        _emission_only(material)
    scene.world = None
    stored = np.clip(np.rint(texture * 255), 0, 255).astype(np.uint8)  # what the PNG holds
    for index, pose in enumerate(blender_demo_room.demo_poses(6, WIDTH, HEIGHT, pose_class=addon.cameras.Pose)[:2]):
        blender = _unlit_render(bpy, scene, _camera(bpy, scene, pose), tmp_path / f"view{index}.png")
        reference = render_textured(atlas.mesh, stored, _backend_camera(pose)).image
        print(f"textured view {index}: {psnr(blender, reference):.1f} dB")
        assert psnr(blender, reference) >= MIN_PSNR, f"view {index}: {psnr(blender, reference):.1f} dB"
        flipped = render_textured(atlas.mesh.with_uvs(atlas.mesh.uvs * [1, -1] + [0, 1]), stored,
                                  _backend_camera(pose)).image
        assert psnr(blender, flipped) < MIN_PSNR, "the comparison must be able to tell a flipped texture"


def test_the_hdri_world_renders_as_the_equirect_it_came_from(addon, scene, tmp_path):
    import bpy

    height = 64
    rows, cols = np.meshgrid(np.arange(height), np.arange(2 * height), indexing="ij")
    u, v = (cols + 0.5) / (2 * height), 1.0 - (rows + 0.5) / height
    equirect = np.stack([0.05 + 0.6 * v, 0.3 + 0.25 * np.sin(2 * np.pi * u), 0.3 + 0.25 * np.cos(2 * np.pi * u)],
                        axis=-1).astype(np.float32)  # linear radiance, in [0, 1] so nothing clips
    write_exr(tmp_path / "panorama.exr", equirect)
    world = addon.apply.apply_world(scene, tmp_path / "panorama.exr", output_dir=tmp_path / "out", basename="Sky")
    assert scene.world == world
    lens = blender_demo_room.horizontal_fov_lens(90.0)
    for index, (location, rotation) in enumerate((((0, 0, 0), (1.3, 0.0, 0.4)), ((0, 0, 0), (2.0, 0.0, -2.5)))):
        data = bpy.data.cameras.new(f"Sky View {index}")
        data.lens, data.sensor_width, data.sensor_fit = lens, blender_demo_room.SENSOR_WIDTH, "HORIZONTAL"
        cam = bpy.data.objects.new(f"Sky View {index}", data)
        cam.location, cam.rotation_euler = location, rotation
        scene.collection.objects.link(cam)
        bpy.context.view_layer.update()
        pose = addon.cameras.pose_of(cam)
        blender = _unlit_render(bpy, scene, cam, tmp_path / f"sky{index}.png")
        view = equirect_to_perspective(equirect, _backend_camera(pose))
        reference = np.clip(np.rint(linear_to_srgb(view) * 255), 0, 255).astype(np.uint8)
        print(f"world view {index}: {psnr(blender, reference):.1f} dB")
        assert psnr(blender, reference) >= MIN_PSNR, f"view {index}: {psnr(blender, reference):.1f} dB"
        mirrored = np.clip(np.rint(linear_to_srgb(equirect_to_perspective(
            np.ascontiguousarray(equirect[:, ::-1]), _backend_camera(pose))) * 255), 0, 255).astype(np.uint8)
        assert psnr(blender, mirrored) < MIN_PSNR, "the comparison must be able to tell a mirrored panorama"
