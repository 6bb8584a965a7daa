"""A real backend process on 127.0.0.1 with the tiny models, and small jobs to send it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from backend.client import BackendClient, BackendError
from backend.geometry.mesh import Mesh
from backend.geometry.render import render_depth
from backend.protocol import GenerationSettings, PanoramaJob, TextureJob
from backend.scenes.demo_room import build_demo_room, trajectory

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-123456"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BackendProcess:
    """``python -m backend serve`` in a subprocess; ``stop(kill=True)`` simulates a crash."""

    def __init__(self, store: Path, host: str = "127.0.0.1", token: str | None = None, max_body_mb: float = 64.0,
                 extra: tuple[str, ...] = ()):
        self.store, self.port, self.token = store, free_port(), token
        command = [sys.executable, "-m", "backend", "serve", "--models", "tiny", "--host", host,
                   "--port", str(self.port), "--store", str(store), "--max-body-mb", str(max_body_mb), *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        env.pop("MVDIFF_TOKEN", None)
        if token:
            env["MVDIFF_TOKEN"] = token
        self.log = store.parent / f"server-{self.port}.log"
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log.open("wb"),
                                        stderr=subprocess.STDOUT)
        self.client = BackendClient(f"http://127.0.0.1:{self.port}", token=token, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            try:
                self.client.health()
                return
            except BackendError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"backend did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(30)


_SCENE: dict = {}


def demo_scene(frames: int = 6, size: int = 64):
    key = (frames, size)
    if key not in _SCENE:
        room = build_demo_room()
        cameras = trajectory(24, width=size, height=size)[:frames]
        _SCENE[key] = (room, cameras, [render_depth(room.mesh, c) for c in cameras])
    return _SCENE[key]


def texture_job(steps: int = 2, frames: int = 6, texture_size: int = 128, with_uvs: bool = False) -> TextureJob:
    room, cameras, depths = demo_scene(frames)
    mesh = room.mesh if with_uvs else Mesh(room.mesh.vertices, room.mesh.triangles, None, room.mesh.object_ids)
    settings = GenerationSettings(["a cosy room"], steps=steps, seed=1)
    return TextureJob(settings, list(cameras), [d.copy() for d in depths], mesh, texture_size)


def panorama_job(steps: int = 2) -> PanoramaJob:
    return PanoramaJob(GenerationSettings(["a sunny beach"], steps=steps, seed=2), equirect_height=64, view_size=64)


def tree_listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def wait_for(predicate, timeout: float = 60.0, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("condition not reached in time")


def depth_with_nan(job: TextureJob) -> TextureJob:
    depths = [d.copy() for d in job.depths]
    depths[0][0, 0] = np.nan
    return TextureJob(job.settings, job.cameras, depths, job.mesh, job.texture_size)
