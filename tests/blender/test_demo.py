"""scripts/demo.sh: the demo room textured through the add-on and given an HDRI World, headless."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.blender, pytest.mark.slow]

CHECK_BLEND = r"""
import json, sys
import bpy
bpy.ops.wm.open_mainfile(filepath=sys.argv[1])
meshes = [o for o in bpy.data.objects if o.type == "MESH"]
world = bpy.context.scene.world
env = [n for n in world.node_tree.nodes if n.type == "TEX_ENVIRONMENT"]
print("CHECK " + json.dumps({
    "meshes": len(meshes),
    "uv_maps": sorted({uv.name for o in meshes for uv in o.data.uv_layers}),
    "textured": sum(any(n.type == "TEX_IMAGE" and n.image for n in o.active_material.node_tree.nodes)
                    for o in meshes if o.active_material),
    "world_image": bpy.path.abspath(env[0].image.filepath) if env and env[0].image else None,
}))
"""


def test_demo_writes_the_textured_blend_texture_and_world(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), HF_HUB_OFFLINE="1")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import imageio.v3 as iio

    from backend.imaging.hdr import read_exr

    assert iio.imread(out / "demo_texture.png").shape == (1024, 1024, 3)
    world = read_exr(out / "demo_world.exr")
    assert world.shape[:2] == (512, 1024) and np.isfinite(world).all() and world.max() > 1.0
    check = subprocess.run([sys.executable, "-c", CHECK_BLEND, str(out / "demo.blend")], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "u")))
    line = [x for x in check.stdout.splitlines() if x.startswith("CHECK ")]
    assert line, check.stdout + check.stderr
    report = json.loads(line[-1][len("CHECK "):])
    assert report["meshes"] == 9 and report["textured"] == 9 and "MVDiffusion" in report["uv_maps"]
    assert Path(report["world_image"]).resolve() == (out / "demo_world.exr").resolve()
