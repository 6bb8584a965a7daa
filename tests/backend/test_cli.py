import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
from server_helpers import texture_job

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_bench_bake_prints_one_json_object_on_its_last_line():
    done = run(sys.executable, "-m", "backend", "bench", "bake", "--size", "256", "--views", "8", "--heldout", "4",
               "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("psnr_db", "coverage", "bake_seconds", "texture_size", "views", "machine"):
        assert key in result
    assert result["texture_size"] == 256 and result["views"] == 8
    assert 0.0 < result["coverage"] <= 1.0 and result["psnr_db"] > 20


def test_bake_demo_writes_texture_contact_sheet_and_report(tmp_path):
    out = tmp_path / "out"
    done = run(sys.executable, "-m", "backend", "demo", "--size", "256", "--views", "8", "--heldout", "3",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    texture = iio.imread(out / "demo_texture.png")
    assert texture.shape == (256, 256, 3)
    sheet = iio.imread(out / "contact_sheet.png")
    assert sheet.shape[0] > 3 * 192 and sheet.shape[1] >= 3 * 256
    report = json.loads((out / "demo_report.json").read_text())
    assert report["views"] == 8 and report["coverage"] > 0.5
    assert (out / "demo_room.obj").read_text().count("\nf ") > 1000


def test_bad_arguments_give_a_clear_error_not_a_traceback():
    done = run(sys.executable, "-m", "backend", "bench", "bake", "--size", "0")
    assert done.returncode == 2
    assert "texture_size" in done.stderr and "Traceback" not in done.stderr


def test_panorama_command_writes_the_hdri(tmp_path):
    done = run(sys.executable, "-m", "backend", "panorama", "--prompt", "a sunny beach", "--steps", "1",
               "--height", "64", "--view-size", "64", "--models", "tiny", "--mode", "training_free",
               "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert {"panorama.exr", "panorama.hdr", "panorama_preview.png", "report.json"} <= {
        p.name for p in tmp_path.iterdir()}
    assert "views" in done.stderr  # the progress bar of the views stage
    assert json.loads((tmp_path / "report.json").read_text())["mode"] == "training_free"


def test_texture_command_runs_a_job_file(tmp_path):
    job = tmp_path / "job.npz"
    job.write_bytes(texture_job(steps=1, frames=3, texture_size=64).to_bytes())
    done = run(sys.executable, "-m", "backend", "texture", str(job), "--models", "tiny", "--out", str(tmp_path / "out"),
               "--mode", "independent")
    assert done.returncode == 0, done.stderr
    assert iio.imread(tmp_path / "out" / "texture.png").shape == (64, 64, 3)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["mode"] == "independent"
    missing = run(sys.executable, "-m", "backend", "texture", str(tmp_path / "nope.npz"), "--models", "tiny",
                  "--out", str(tmp_path / "out2"))
    assert missing.returncode == 2 and "job: no such file" in missing.stderr


def test_serve_refuses_an_open_address_without_a_token():
    done = run(sys.executable, "-m", "backend", "serve", "--host", "0.0.0.0", "--models", "tiny")
    assert done.returncode == 2 and "token" in done.stderr


HELP_CODE = """
import sys
from backend.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    assert done.code == 0, done.code
heavy = sorted({'torch', 'diffusers', 'transformers', 'xatlas'} & set(sys.modules))
print('HEAVY', heavy)
"""


def test_help_of_every_command_loads_no_model_library():
    """``--help`` must answer at once: torch and diffusers are imported only by the commands that run."""
    from backend.__main__ import COMMANDS

    for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
        done = run(sys.executable, "-c", HELP_CODE, *argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert "usage:" in done.stdout and done.stdout.strip().endswith("HEAVY []"), (argv, done.stdout[-300:])
