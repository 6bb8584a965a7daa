"""A mesh that crashes xatlas fails its job with a clear error; the backend keeps answering."""

from __future__ import annotations

import threading

import pytest
from server_helpers import BackendProcess

from backend.geometry.cameras import Camera, look_at
from backend.geometry.mesh import Mesh
from backend.geometry.render import render_depth
from backend.protocol import GenerationSettings, TextureJob
from backend.scenes.shapes import icosphere

# 20 * 4**6 = 81,920 triangles: xatlas 0.0.11 segfaults unwrapping this icosphere at any texture size.
CRASHING_SUBDIVISIONS = 6


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    process = BackendProcess(tmp_path_factory.mktemp("backend") / "store")
    yield process
    process.stop()


def sphere_job(subdivisions: int) -> TextureJob:
    vertices, triangles = icosphere([0.0, 0.0, 0.0], 1.0, subdivisions)
    mesh = Mesh(vertices, triangles)  # no UVs: the job asks for an unwrap
    cameras = [Camera.from_fov(60.0, 64, 64, look_at(eye, [0.0, 0.0, 0.0])) for eye in ([3, 0, 0.5], [0, 3, 0.5])]
    depths = [render_depth(mesh, camera) for camera in cameras]
    return TextureJob(GenerationSettings(["marble"], steps=1), cameras, depths, mesh, 128)


def test_a_mesh_that_crashes_the_unwrap_fails_its_job_while_health_answers(backend):
    status = backend.client.submit(sphere_job(CRASHING_SUBDIVISIONS).to_bytes())
    answered, stop = [], threading.Event()

    def ask_health() -> None:
        while not stop.is_set():
            answered.append(backend.client.health()["status"])
            stop.wait(0.05)

    prober = threading.Thread(target=ask_health)
    prober.start()
    try:
        final = backend.client.wait(status["id"], poll=0.05, timeout=240)
    finally:
        stop.set()
        prober.join(30)
    assert backend.process.poll() is None  # the server process survived the crash
    assert backend.client.health()["status"] == "ok" and answered and set(answered) == {"ok"}
    # A crash is reported as such; should xatlas ever unwrap this mesh, the job simply completes.
    if final["state"] == "failed":
        assert "xatlas unwrapping 81,920 triangles crashed" in final["error"]
        assert final["stage"] == "unwrap"
    else:
        assert final["state"] == "done", final["error"]
    # The next job runs normally.
    other = backend.client.submit(sphere_job(2).to_bytes())
    assert backend.client.wait(other["id"], poll=0.05, timeout=240)["state"] == "done"
