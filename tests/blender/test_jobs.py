"""Whole jobs from Blender against a real backend process on the tiny model, and every way one can fail."""

import http.server
import json
import socket
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.blender


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefs(addon):
    import sys

    import bpy

    prefs = addon.preferences.get(bpy.context)
    prefs.mode, prefs.python, prefs.model_source, prefs.device = "LOCAL", sys.executable, "TINY", "CPU"
    prefs.port, prefs.start_automatically = free_port(), True
    yield prefs
    addon.backend_process.stop()


def scene_state(bpy) -> dict:
    """Everything a job may change, to check that a failed one changed nothing."""
    return {
        "objects": sorted(o.name for o in bpy.data.objects),
        "materials": sorted(m.name for m in bpy.data.materials),
        "images": sorted(i.name for i in bpy.data.images if i.name != "MVDiffusion Preview"),
        "worlds": sorted(w.name for w in bpy.data.worlds),
        "world": bpy.context.scene.world.name if bpy.context.scene.world else None,
        "uv_maps": {o.name: [uv.name for uv in o.data.uv_layers] for o in bpy.data.objects if o.type == "MESH"},
        "slots": {o.name: [s.material.name if s.material else None for s in o.material_slots]
                  for o in bpy.data.objects},
        "collections": sorted(c.name for c in bpy.data.collections),
    }


def small_scene(bpy, tmp_path):
    """A box room corner with a cube, unsaved, results going to tmp_path."""
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    floor = bpy.context.object
    floor.name = "Floor"
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.0, 0.0, 0.5))
    cube = bpy.context.object
    cube.name = "Cube"
    settings = bpy.context.scene.mvdiff
    settings.prompt, settings.steps, settings.seed = "a wooden floor and a painted box", 2, 3
    settings.camera_source, settings.orbit_views, settings.orbit_rings = "ORBIT", 4, 1
    settings.width = settings.height = 64
    settings.texture_size, settings.uv_source = "256", "UNWRAP"
    settings.output_dir = str(tmp_path)
    for obj in (floor, cube):
        obj.select_set(True)
    return floor, cube


def test_texture_job_applies_material_image_and_uv_map(scene, prefs, tmp_path):
    import bpy

    floor, cube = small_scene(bpy, tmp_path)
    user_uvs = {o.name: [uv.name for uv in o.data.uv_layers] for o in (floor, cube)}
    assert bpy.ops.mvdiff.texture() == {"FINISHED"}, bpy.context.window_manager.mvdiff.message
    state = bpy.context.window_manager.mvdiff
    assert not state.running and state.result_path
    for obj in (floor, cube):
        names = [uv.name for uv in obj.data.uv_layers]
        assert names == user_uvs[obj.name] + ["MVDiffusion"], names
        material = obj.material_slots[-1].material
        images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE"]
        assert images and tuple(images[0].size) == (256, 256)
        assert any(link.to_socket.name == "Base Color" for link in material.node_tree.links)
    assert (tmp_path / "mvdiff_jobs").is_dir()
    jobs = list((tmp_path / "mvdiff_jobs").iterdir())
    assert len(jobs) == 1 and (jobs[0] / "job.npz").is_file()


def test_the_backends_warnings_reach_the_jobs_message(scene, prefs, tmp_path):
    """A camera looking at the empty sky adds nothing: the backend's report says so, and so does Blender."""
    import math

    import bpy

    floor, cube = small_scene(bpy, tmp_path)
    bpy.ops.object.camera_add(location=(0.0, 0.0, 6.0))  # looks down at the floor and the box
    above = bpy.context.object
    bpy.ops.object.camera_add(location=(0.0, 0.0, 6.0), rotation=(math.pi, 0.0, 0.0))  # looks up at nothing
    sky = bpy.context.object
    bpy.context.scene.mvdiff.camera_source = "SELECTED"
    for obj in (floor, cube, above, sky):
        obj.select_set(True)
    assert bpy.ops.mvdiff.texture() == {"FINISHED"}, bpy.context.window_manager.mvdiff.message
    report = json.loads(next((tmp_path / "mvdiff_jobs").rglob("report.json")).read_text())
    assert report["empty_depth"][1] == 1.0 and report["warnings"], report
    message = bpy.context.window_manager.mvdiff.message
    assert "Warning" in message and "camera 1 hit no surface" in message, message


def test_a_job_without_multiview_weights_runs_training_free_and_says_so(scene, prefs, addon, tmp_path):
    """A tiny model folder without its trained blocks: the job runs training-free, report.json says so,
    and the add-on says it in the job's message and in what the panels draw, and offers the download."""
    import bpy

    from backend.models.tiny import CAA_WEIGHTS, write_tiny_models

    folders = write_tiny_models(tmp_path / "models")
    (folders["depth"] / CAA_WEIGHTS).unlink()
    prefs.model_source, prefs.model_folder = "FOLDER", str(tmp_path / "models")
    try:
        addon.multiview_weights.forget()
        small_scene(bpy, tmp_path)
        assert bpy.ops.mvdiff.texture() == {"FINISHED"}, bpy.context.window_manager.mvdiff.message
        report = json.loads(next((tmp_path / "mvdiff_jobs").rglob("report.json")).read_text())
        assert report["multiview_weights"] == "none"
        assert report["mode"] == "training_free"  # the best a backend without multi-view weights has
        message = bpy.context.window_manager.mvdiff.message
        assert "training-free" in message, message
        assert addon.multiview_weights.independent("depth")
        assert "Texturing" in addon.multiview_weights.warning("depth")
        ok, _text, _fix = addon.preferences.check(bpy.context)
        assert ok and addon.multiview_weights.independent("depth") and not addon.multiview_weights.independent(
            "panorama"), "the status check reads the same from /v1/version; the panorama folder has its weights"
    finally:
        prefs.model_source = "TINY"
        addon.multiview_weights.forget()


def test_hdri_job_sets_the_world(scene, prefs, tmp_path):
    """In training-free mode, chosen in the panel: the tiny models come with multi-view weights."""
    import bpy

    settings = bpy.context.scene.mvdiff
    settings.world_prompt, settings.steps = "a sunny meadow", 2
    settings.consistency_mode = "training_free"
    settings.world_height, settings.world_view_size = 64, 64
    settings.output_dir = str(tmp_path)
    assert bpy.ops.mvdiff.make_world() == {"FINISHED"}, bpy.context.window_manager.mvdiff.message
    world = bpy.context.scene.world
    nodes = {n.type: n for n in world.node_tree.nodes}
    image = nodes["TEX_ENVIRONMENT"].image
    assert tuple(image.size) == (128, 64) and image.colorspace_settings.name != "sRGB"
    pixels = np.empty(128 * 64 * 4, np.float32)
    image.pixels.foreach_get(pixels)
    assert pixels.max() > 1.0, "the World image should be HDR"
    assert any(link.to_node.type == "OUTPUT_WORLD" for link in world.node_tree.links)
    report = json.loads(next(tmp_path.rglob("report.json")).read_text())
    assert report["mode"] == "training_free"


def world_front_view(tmp_path) -> np.ndarray:
    import imageio.v3 as iio

    found = sorted(tmp_path.rglob("view_00.png"))
    assert found, "the job's views were not downloaded"
    return iio.imread(found[0])


def test_a_world_from_a_photo_keeps_the_photo_as_its_front_view(scene, prefs, tmp_path):
    import bpy

    settings = bpy.context.scene.mvdiff
    settings.world_prompt, settings.steps = "a beach around this photo", 1
    settings.world_height, settings.world_view_size = 64, 64
    settings.output_dir = str(tmp_path)
    photo = bpy.data.images.new("photo", 64, 64)
    rows = np.random.default_rng(3).integers(0, 256, (64, 64, 3)).astype(np.float32) / 255.0
    rgba = np.concatenate([rows[::-1], np.ones((64, 64, 1), np.float32)], axis=-1)  # Blender: bottom row first
    photo.pixels.foreach_set(rgba.ravel())
    settings.world_source, settings.world_image = "IMAGE", photo
    try:
        assert bpy.ops.mvdiff.make_world() == {"FINISHED"}, bpy.context.window_manager.mvdiff.message
    finally:
        settings.world_source = "TEXT"
    report = json.loads(next(tmp_path.rglob("report.json")).read_text())
    assert report["from_image"] is True
    np.testing.assert_array_equal(world_front_view(tmp_path), np.rint(rows * 255).astype(np.uint8))
    nodes = {n.type: n for n in bpy.context.scene.world.node_tree.nodes}
    assert tuple(nodes["TEX_ENVIRONMENT"].image.size) == (128, 64)


def test_a_world_from_the_current_render(scene, prefs, addon, tmp_path):
    import bpy

    settings = bpy.context.scene.mvdiff
    settings.world_prompt, settings.steps = "a meadow", 1
    settings.world_height, settings.world_view_size = 64, 64
    settings.output_dir = str(tmp_path)
    render = bpy.context.scene.render
    render.engine, render.resolution_x, render.resolution_y = "CYCLES", 96, 64
    bpy.context.scene.cycles.samples = 1
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    bpy.context.scene.collection.objects.link(camera)
    bpy.context.scene.camera = camera
    world = bpy.data.worlds.new("red")
    addon.compat.enable_nodes(world)
    background = next(n for n in world.node_tree.nodes if n.type == "BACKGROUND")
    background.inputs["Color"].default_value = (1.0, 0.0, 0.0, 1.0)
    bpy.context.scene.world = world
    bpy.context.scene.view_settings.view_transform = "Standard"
    render.filepath = "//keep_me"
    settings.world_source = "RENDER"
    try:
        assert bpy.ops.mvdiff.make_world() == {"FINISHED"}, bpy.context.window_manager.mvdiff.message
    finally:
        settings.world_source = "TEXT"
    assert render.filepath == "//keep_me" and render.image_settings.file_format == "PNG"
    front = world_front_view(tmp_path).astype(int)
    # The camera sees only the red background: the front view is the render, red.
    assert front[..., 0].min() > 200 and front[..., 1:].max() < 60


# ------------------------------------------------------------------ failures leave the scene as it was
def test_no_mesh_selected_is_refused_with_the_reason(scene, prefs, tmp_path):
    import bpy

    small_scene(bpy, tmp_path)
    bpy.ops.object.select_all(action="DESELECT")
    before = scene_state(bpy)
    with pytest.raises(RuntimeError, match="Select one or more mesh objects"):
        bpy.ops.mvdiff.texture()
    assert scene_state(bpy) == before


def test_no_cameras_ends_with_a_message(scene, prefs, tmp_path):
    import bpy

    small_scene(bpy, tmp_path)
    bpy.context.scene.mvdiff.camera_source = "SELECTED"
    before = scene_state(bpy)
    with pytest.raises(RuntimeError, match="camera"):
        bpy.ops.mvdiff.texture()
    assert scene_state(bpy) == before


class FakeBackend(http.server.BaseHTTPRequestHandler):
    """A backend that speaks another API version, or fails every job."""

    api_version = 1
    fail_jobs = False

    def _send(self, payload, code=200):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/v1/health", "/v1/version"):
            self._send({"status": "ok", "api_version": self.api_version, "backend_version": "9.9"})
        elif self.path.startswith("/v1/jobs/"):
            self._send({"id": "0" * 32, "state": "failed", "stage": "bake", "step": 0, "total": 0,
                        "error": "CUDA out of memory at every memory level; reduce the texture size"})
        else:
            self._send({"detail": "not found"}, 404)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send({"id": "0" * 32, "state": "queued"}, 201)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_backend(prefs):
    servers = []

    def start(**attrs):
        handler = type("Handler", (FakeBackend,), attrs)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        prefs.mode, prefs.url = "REMOTE", f"http://127.0.0.1:{server.server_address[1]}"
        return server

    yield start
    for server in servers:
        server.shutdown()
    prefs.mode = "LOCAL"


@pytest.mark.parametrize("case, expected", [
    ("unreachable", "cannot reach the backend"),
    ("version", "API version 99"),
    ("failed", "CUDA out of memory"),
    ("offline", "Online access is off"),
])
def test_backend_problems_end_the_job_cleanly(scene, prefs, fake_backend, tmp_path, case, expected):
    import bpy

    if case == "unreachable":
        prefs.mode, prefs.url = "REMOTE", f"http://127.0.0.1:{free_port()}"
    elif case == "version":
        fake_backend(api_version=99)
    elif case == "failed":
        fake_backend(fail_jobs=True)
    else:
        prefs.mode, prefs.url = "REMOTE", "http://192.0.2.10:8765"
    try:
        small_scene(bpy, tmp_path)
        before = scene_state(bpy)
        with pytest.raises(RuntimeError, match=expected):
            bpy.ops.mvdiff.texture()
        assert scene_state(bpy) == before
        assert not bpy.context.window_manager.mvdiff.running
        if case != "offline":
            jobs = list((tmp_path / "mvdiff_jobs").iterdir())
            assert (jobs[0] / "job.npz").is_file(), "the job's inputs must stay on disk"
    finally:
        prefs.mode = "LOCAL"


LIFECYCLE_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import blender_addon
addon = blender_addon.enable_addon()
import bpy, addon_utils
from importlib import import_module
prefs = import_module(addon.__name__ + ".preferences").get(bpy.context)
prefs.python, prefs.model_source, prefs.port = sys.executable, "TINY", int(sys.argv[2])
process = import_module(addon.__name__ + ".backend_process")
client = import_module(addon.__name__.rpartition(".")[0] + ".backend.client").BackendClient(
    f"http://127.0.0.1:{prefs.port}")
assert bpy.ops.mvdiff.backend_start() == {"FINISHED"}
process.wait_until_healthy(client, timeout=60)
first = process._started.pid
addon_utils.disable(addon.__name__.rpartition(".")[0], default_set=True)
stopped_on_disable = process._started is None
addon = blender_addon.enable_addon()
prefs = import_module(addon.__name__ + ".preferences").get(bpy.context)  # fresh preferences after re-enabling
prefs.python, prefs.model_source, prefs.port = sys.executable, "TINY", int(sys.argv[2])
process = import_module(addon.__name__ + ".backend_process")
assert bpy.ops.mvdiff.backend_start() == {"FINISHED"}
process.wait_until_healthy(client, timeout=60)
print("PIDS " + json.dumps({"disabled": first, "stopped_on_disable": stopped_on_disable,
                            "left_at_exit": process._started.pid}))
"""


def test_a_backend_the_addon_started_ends_with_the_addon_and_with_blender(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "user")}
    result = subprocess.run([sys.executable, "-c", LIFECYCLE_SCRIPT, str(scripts), str(free_port())],
                            capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PIDS ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    pids = json.loads(lines[-1][len("PIDS "):])
    assert pids["stopped_on_disable"]

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; only its parent has not reaped it
            return stat.read().split()[2] != "Z"

    deadline = time.monotonic() + 10
    while any(alive(pids[k]) for k in ("disabled", "left_at_exit")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids["disabled"]), "disabling the add-on left its backend running"
    assert not alive(pids["left_at_exit"]), "quitting Blender left the add-on's backend running"
