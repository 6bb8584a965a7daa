"""The backend installer: the torch build it picks, its plan, and (slow) a real install here.

The real install uses pip's configured index (``--torch-index none``), where ``torch==2.13.0``
resolves to the local CPU wheel, and the warm pip cache.
"""

import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from mvdiff_blender import install_backend as ib

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "install_backend.py"

NVIDIA_SMI = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
"""


def pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("==") for line in lines)


def test_the_lock_is_what_the_tests_run_with():
    """Users get the set CI tests: every pin equals the version installed in the test environment."""
    locked = pins(ib.LOCK)
    assert "torch" not in locked, "torch's build is chosen per machine; its pin is requirements/torch.txt"
    for name in ("diffusers", "transformers", "huggingface-hub", "tokenizers", "fastapi", "xatlas", "numpy"):
        assert name in locked
    wrong = {name: (version, metadata.version(name)) for name, version in locked.items()
             if metadata.version(name) != version}
    assert not wrong, f"lock and environment differ (lock, installed): {wrong}; run scripts/lock_backend.py"
    assert metadata.version("torch").split("+")[0] == ib.torch_requirement().split("==")[1]
    dev = (REPO_ROOT / "requirements" / "dev.txt").read_text().splitlines()
    assert "-r torch.txt" in dev and "-r backend.lock" in dev


def test_cuda_build_follows_the_driver():
    assert ib.driver_cuda_version(lambda *a, **k: subprocess.CompletedProcess(a, 0, NVIDIA_SMI, "")) == (12, 8)
    assert ib.driver_cuda_version(lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError())) is None
    assert ib.torch_source(False, None, "linux", (12, 8))[0] == f"{ib.TORCH_INDEX}/cu128"
    assert ib.torch_source(False, None, "win32", (13, 2))[0] == f"{ib.TORCH_INDEX}/cu130"
    assert ib.torch_source(False, None, "linux", (12, 7))[0] == f"{ib.TORCH_INDEX}/cu126"
    index, why = ib.torch_source(False, None, "linux", (11, 8))
    assert index == f"{ib.TORCH_INDEX}/cpu" and "update the driver" in why


def test_overrides_and_platform_defaults():
    assert ib.torch_source(True, None, "linux", (12, 8))[0] == f"{ib.TORCH_INDEX}/cpu"
    assert ib.torch_source(False, "https://example.org/whl/cu126", "linux", None)[0] == "https://example.org/whl/cu126"
    assert ib.torch_source(False, "none", "linux", (12, 8))[0] is None
    assert ib.torch_source(False, None, "darwin", None)[0] is None
    assert ib.torch_source(False, None, "linux", None)[0] is None
    assert ib.torch_spec("torch==2.13.0", f"{ib.TORCH_INDEX}/cu128") == "torch==2.13.0+cu128"
    assert ib.torch_spec("torch==2.13.0", None) == "torch==2.13.0"


def test_default_prefix_is_a_user_folder_outside_the_extension():
    home = Path("/home/u")
    assert ib.default_prefix("linux", {}, home) == home / ".local/share/mvdiff-blender/backend-env"
    assert ib.default_prefix("linux", {"XDG_DATA_HOME": "/x"}, home) == Path("/x/mvdiff-blender/backend-env")
    assert ib.default_prefix("darwin", {}, home) == home / "Library/Application Support/mvdiff-blender/backend-env"
    assert ib.default_prefix("win32", {"LOCALAPPDATA": "C:/L"}, home) == Path("C:/L/mvdiff-blender/backend-env")
    assert ib.venv_python(Path("E"), windows=True) == Path("E/Scripts/python.exe")
    assert ib.venv_python(Path("E"), windows=False) == Path("E/bin/python")


def test_dry_run_prints_the_plan_and_installs_nothing(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--prefix", str(tmp_path / "env"),
                             "--torch-index", "https://example.org/whl/cu126"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"Environment: {tmp_path / 'env'}" in out and "torch==2.13.0+cu126" in out
    assert "--extra-index-url https://example.org/whl/cu126" in out and str(ib.LOCK) in out
    assert not (tmp_path / "env").exists()


def test_a_python_that_cannot_make_venvs_gives_a_clear_error(tmp_path):
    broken = tmp_path / "python3"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    result = subprocess.run([sys.executable, str(SCRIPT), "--prefix", str(tmp_path / "env"), "--python", str(broken)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    error = result.stdout.strip().splitlines()[-1]
    assert error.startswith("ERROR No Python 3.10+") and "--python" in error and str(broken) in error


@pytest.mark.slow
def test_real_install_then_the_tiny_models_verify(tmp_path):
    prefix = tmp_path / "backend-env"
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), "--prefix", str(prefix), "--torch-index", "none"],
                            capture_output=True, text=True, timeout=900)
    took = time.monotonic() - started
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1] == f"DONE {prefix / 'bin' / 'python'}", result.stdout[-3000:]
    fractions = [float(line.split()[1]) for line in lines if line.startswith("PROGRESS ")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    print(f"install took {took:.0f} s")

    again = subprocess.run([sys.executable, str(SCRIPT), "--prefix", str(prefix), "--torch-index", "none"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already installed" in again.stdout, again.stdout[-2000:]

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    verify = subprocess.run([str(prefix / "bin" / "python"), "-m", "backend", "models", "verify", "--tiny"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
