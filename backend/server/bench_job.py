"""``bench job``: a whole texturing job over HTTP on the tiny models, timed stage by stage.

The backend runs in this process (uvicorn in a thread, the job store in a temporary folder) and
is driven through the same client Blender uses, so the figures include upload, polling and the
download of the results.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from ..client import BackendClient
from ..geometry.render import render_depth
from ..models.serving import ModelConfig
from ..protocol import GenerationSettings, TextureJob
from ..scenes.demo_room import build_demo_room, trajectory
from .config import ServerConfig
from .serve import build


def demo_room_job(
    frames: int, width: int, height: int, steps: int, texture_size: int, loop_share: float = 1 / 3
) -> TextureJob:
    """The demo room along ``loop_share`` of its camera loop (frames evenly spaced), with depths, to be textured.

    On a third of the loop consecutive frames overlap so much that about half become keyframes;
    on the whole loop every frame of twelve is one.
    """
    room = build_demo_room()
    cameras = trajectory(max(frames, round(frames / loop_share)), width=width, height=height)[:frames]
    depths = [render_depth(room.mesh, camera) for camera in cameras]
    settings = GenerationSettings(["a cosy living room, wooden floor, white walls"], steps=steps, seed=0)
    return TextureJob(settings, cameras, depths, room.mesh, texture_size)


def run_job_benchmark(frames: int = 12, width: int = 256, height: int = 192, steps: int = 10,
                      texture_size: int = 1024) -> dict:
    job = demo_room_job(frames, width, height, steps, texture_size)
    with tempfile.TemporaryDirectory() as folder:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = ServerConfig(port=port, store=Path(folder) / "store", models=ModelConfig.tiny())
        _, worker, app = build(config)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        client = BackendClient(f"http://127.0.0.1:{port}")
        try:
            while not server.started:
                time.sleep(0.05)
            start = time.perf_counter()
            body = job.to_bytes()
            packed = time.perf_counter()
            status = client.submit(body)
            submitted = time.perf_counter()
            final = client.wait(status["id"], poll=0.1)
            finished = time.perf_counter()
            out = Path(folder) / "result"
            if final["state"] == "done":
                client.result(status["id"], out)
            downloaded = time.perf_counter()
            report = json.loads((out / "report.json").read_text()) if final["state"] == "done" else {}
        finally:
            server.should_exit = True
            thread.join(10)
            worker.stop()
    return {
        "benchmark": "job",
        "state": final["state"],
        "error": final["error"],
        "stage_seconds": report.get("seconds", {}),
        "seconds": {
            "pack": round(packed - start, 3), "upload": round(submitted - packed, 3),
            "job": round(finished - submitted, 3), "download": round(downloaded - finished, 3),
            "total": round(downloaded - start, 3),
        },
        "frames": frames, "keyframes": report.get("keyframes"), "view_size": [width, height],
        "steps": steps, "texture_size": texture_size, "body_mb": round(len(body) / 2**20, 2),
        "overlap_psnr_ratio": report.get("overlap_psnr_ratio"), "models": "tiny",
    }
