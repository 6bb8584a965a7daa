"""Make the backend's Python environment: a virtual environment with the tested package set and
the torch build that suits this machine.

Standard library only, because it runs before any of the backend's packages exist: under
Blender's bundled Python (the add-on's *Install Backend* button runs it with ``sys.executable``)
or a system Python 3.10+ (``python3 scripts/install_backend.py``). It lives in the add-on package
so that it ships in the extension zip together with ``requirements/``.

- The package set is ``requirements/backend.lock``; the torch version is ``requirements/torch.txt``.
  Both go to ONE pip command, so pip never resolves a second torch for a package that needs it.
- The torch build: a CUDA build from the PyTorch index when ``nvidia-smi`` reports a driver (the
  newest build the driver supports), otherwise pip's default (PyPI: Apple's build on macOS).
  ``--cpu`` and ``--torch-index`` override.
- The backend package itself is not copied: whoever starts the backend puts the extension (or
  checkout) folder on ``PYTHONPATH``.
- Re-running on a finished environment only re-checks it (a stamp file records what was installed).

Output, one line each on stdout, for the add-on to read: ``PROGRESS <fraction> <message>``, then
``DONE <python path>`` or ``ERROR <message>``. Every other line is for people.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "backend.lock"
TORCH_PIN = ROOT / "requirements" / "torch.txt"
TORCH_INDEX = "https://download.pytorch.org/whl"
# The CUDA builds the PyTorch index publishes for the tested torch version, newest first. A driver
# runs a build whose CUDA version is at most the one nvidia-smi reports.
CUDA_BUILDS = ((13, 0), (12, 8), (12, 6))
MIN_PYTHON = (3, 10)
STAMP_NAME = "mvdiff-install.json"
SMOKE_CHECK = ("import torch, diffusers, transformers, xatlas, fastapi, uvicorn, scipy, OpenEXR; "
               "import backend.engine; "
               "print('torch', torch.__version__, 'CUDA' if torch.cuda.is_available() else 'no CUDA')")
# Interpreter variables that would make a child Python read the wrong packages (Blender may set them).
PYTHON_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__", "VIRTUAL_ENV")


class InstallError(Exception):
    """A step failed; the message says what to do."""


def progress(fraction: float, message: str) -> None:
    print(f"PROGRESS {max(0.0, min(1.0, fraction)):.3f} {message}", flush=True)


def say(text: str) -> None:
    print(text, flush=True)


def default_prefix(platform: str = sys.platform, env: dict | None = None, home: Path | None = None) -> Path:
    """A per-user folder outside the extension, so that updating or removing the add-on keeps it."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    if platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "mvdiff-blender" / "backend-env"


def venv_python(prefix: Path, windows: bool = os.name == "nt") -> Path:
    return prefix / "Scripts" / "python.exe" if windows else prefix / "bin" / "python"


def torch_requirement(path: Path = TORCH_PIN) -> str:
    """The tested torch pin, e.g. ``torch==2.13.0`` (the one line of requirements/torch.txt that is not a comment)."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1 or not re.fullmatch(r"torch==[\w.]+", lines[0]):
        raise InstallError(f"{path} should hold one line 'torch==VERSION', found {lines}")
    return lines[0]


def driver_cuda_version(run=subprocess.run) -> tuple[int, int] | None:
    """The newest CUDA version the NVIDIA driver supports, from nvidia-smi's header; None without a driver."""
    try:
        result = run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", result.stdout or "")
    return (int(found[1]), int(found[2])) if result.returncode == 0 and found else None


def torch_source(cpu: bool, index: str | None, platform: str, cuda: tuple[int, int] | None) -> tuple[str | None, str]:
    """(extra index URL or None for pip's own index, why) for the torch build of this machine."""
    if index is not None:
        return (None, "pip's configured index (--torch-index none)") if index == "none" else (index, "--torch-index")
    if platform == "darwin":
        return None, "PyPI's build for macOS (CPU and Apple GPUs)"
    if cpu:
        return f"{TORCH_INDEX}/cpu", "CPU-only build (--cpu)"
    if cuda is None:
        linux = platform not in ("win32", "darwin")
        note = " (on Linux it carries CUDA libraries; --cpu picks the smaller CPU-only build)" if linux else ""
        return None, f"pip's default build: no NVIDIA driver found{note}"
    for build in CUDA_BUILDS:
        if build <= cuda:
            why = f"CUDA {build[0]}.{build[1]} build (the driver supports CUDA {cuda[0]}.{cuda[1]})"
            return f"{TORCH_INDEX}/cu{build[0]}{build[1]}", why
    oldest = CUDA_BUILDS[-1]
    return f"{TORCH_INDEX}/cpu", (f"CPU-only build: the NVIDIA driver supports CUDA {cuda[0]}.{cuda[1]}, older than "
                                  f"{oldest[0]}.{oldest[1]}; update the driver and run this again to use the GPU")


def torch_spec(pin: str, index: str | None) -> str:
    """The pin with the index's build label (``torch==2.13.0+cu128``), so that an installed other build is replaced."""
    label = (index or "").rstrip("/").rpartition("/")[2]
    return f"{pin}+{label}" if re.fullmatch(r"cu\d+|cpu|rocm[\d.]+|xpu", label) else pin


def pip_command(python: Path, spec: str, index: str | None, compile_bytecode: bool = True) -> list[str]:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar",
               "off", spec, "-r", str(LOCK)]
    if index:
        command += ["--extra-index-url", index]
    if not compile_bytecode:
        command.append("--no-compile")
    return command


def child_env(backend_path: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PYTHON_VARIABLES}
    if backend_path:
        env["PYTHONPATH"] = str(ROOT)
    return env


def python_version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=60, env=child_env())
        return tuple(int(x) for x in out.stdout.split()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def can_make_venvs(python: str) -> bool:
    """Whether venv can install pip there (Debian's python3 needs python3-venv; some Blender builds lack ensurepip)."""
    try:
        return subprocess.run([python, "-c", "import venv, ensurepip"], capture_output=True, timeout=60,
                              env=child_env()).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def base_python(explicit: str | None) -> str:
    """The Python that makes the environment: --python, else this one, else a python3 on PATH."""
    candidates = [explicit] if explicit else [sys.executable, shutil.which("python3"), shutil.which("python")]
    tried = []
    for python in dict.fromkeys(c for c in candidates if c):
        version = python_version(python)
        if version and version >= MIN_PYTHON and can_make_venvs(python):
            return python
        tried.append(f"{python} ({'.'.join(map(str, version)) if version else 'does not run'}"
                     f"{'' if version and version >= MIN_PYTHON else ', too old'})")
    raise InstallError("No Python 3.10+ that can make virtual environments (modules venv and ensurepip) was found; "
                       f"tried {', '.join(tried)}. Install Python 3.11 (python.org, or e.g. 'sudo apt install "
                       "python3-venv' on Debian/Ubuntu) and run again, or pass --python /path/to/python3.")


def stamp_for(spec: str, index: str | None) -> dict:
    return {"lock_sha256": hashlib.sha256(LOCK.read_bytes()).hexdigest(), "torch": spec, "index": index}


def read_stamp(prefix: Path) -> dict | None:
    try:
        return json.loads((prefix / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def smoke_check(python: Path) -> str:
    """Import the backend with the new environment; returns its one-line report."""
    result = subprocess.run([str(python), "-c", SMOKE_CHECK], capture_output=True, text=True, timeout=600,
                            env=child_env(backend_path=True), cwd=str(ROOT))
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InstallError(f"The environment was made but the backend does not import: {tail[0]}. "
                           "Run again with --force to reinstall it.")
    return result.stdout.strip().splitlines()[-1]


def run_pip(command: list[str], expected: int) -> None:
    """Run pip, echoing its lines, with progress from 0.10 to 0.90 (packages seen, then installing)."""
    seen = 0
    last = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=child_env()) as pip:
        for line in pip.stdout:
            line = line.rstrip()
            if not line:
                continue
            say(f"  {line}")
            last = line
            if line.startswith(("Collecting ", "Processing ", "Requirement already satisfied")):
                seen += 1
                progress(0.10 + 0.55 * min(seen / expected, 1.0), f"Resolving packages ({seen})")
            elif line.startswith("Installing collected packages"):
                progress(0.70, "Installing packages")
            elif line.startswith("Successfully installed"):
                progress(0.90, "Packages installed")
    if pip.returncode != 0:
        raise InstallError(f"pip failed (exit {pip.returncode}): {last}. Check the internet connection and the lines "
                           "above; --torch-index URL or --cpu choose another torch build.")


def install(args: argparse.Namespace) -> Path:
    prefix = Path(args.prefix).expanduser().resolve()
    python = venv_python(prefix)
    pin = torch_requirement()
    index, why = torch_source(args.cpu, args.torch_index, sys.platform, None if args.cpu else driver_cuda_version())
    spec = torch_spec(pin, index)
    command = pip_command(python, spec, index, compile_bytecode=not args.no_compile)
    if args.dry_run:
        say(f"Environment: {prefix} ({'exists' if python.exists() else 'to be made'})")
        say(f"Torch: {spec} from {index or 'pip index'}: {why}")
        say("Pip command: " + subprocess.list2cmdline(command))
        return python

    progress(0.0, f"Checking {prefix}")
    stamp = stamp_for(spec, index)
    if python.exists() and not args.force and read_stamp(prefix) == stamp:
        try:
            say("The environment is already installed; checking it")
            report = smoke_check(python)
            say(report)
            progress(1.0, "Backend environment ready")
            return python
        except (InstallError, subprocess.SubprocessError) as err:
            say(f"The existing environment needs repair: {err}")
    if not python.exists():
        base = base_python(args.python)
        progress(0.02, f"Making a virtual environment with {base}")
        made = subprocess.run([base, "-m", "venv", str(prefix)], capture_output=True, text=True, env=child_env())
        if made.returncode != 0 or not python.exists():
            raise InstallError(f"Could not make a virtual environment in {prefix}: {made.stderr.strip()[-300:]}")
    old = read_stamp(prefix)
    if old and old.get("torch") != spec:  # another torch build: pip would keep the installed one
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torch"], capture_output=True, env=child_env())
    (prefix / STAMP_NAME).unlink(missing_ok=True)
    say(f"Torch: {spec} from {index or 'pip index'}: {why}")
    progress(0.10, "Installing the backend's packages (several GB with CUDA; this takes a while)")
    expected = sum(1 for line in LOCK.read_text().splitlines() if line and not line.startswith("#")) + 8
    run_pip(command, expected)
    progress(0.92, "Checking that the backend imports")
    say(smoke_check(python))
    (prefix / STAMP_NAME).write_text(json.dumps(stamp, indent=1))
    progress(1.0, "Backend environment ready")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="install_backend.py")
    parser.add_argument("--prefix", default=str(default_prefix()),
                        help="where the environment goes (default: %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="the CPU-only torch build, even with an NVIDIA GPU")
    parser.add_argument("--torch-index", metavar="URL", help="take torch from this index, e.g. "
                        f"{TORCH_INDEX}/cu126; 'none': pip's configured index only")
    parser.add_argument("--python", help="the Python that makes the environment (default: this one, else python3)")
    parser.add_argument("--force", action="store_true", help="reinstall even when the environment looks complete")
    parser.add_argument("--no-compile", action="store_true", help="do not byte-compile the packages (faster install)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (folder, torch build, pip command) only")
    args = parser.parse_args(argv)
    if sys.version_info < MIN_PYTHON:
        print(f"ERROR Python {sys.version_info[0]}.{sys.version_info[1]} is too old; run this with Python 3.10+",
              flush=True)
        return 1
    try:
        python = install(args)
    except (InstallError, OSError, subprocess.SubprocessError) as err:
        print(f"ERROR {err}".replace("\n", " "), flush=True)
        return 1
    except KeyboardInterrupt:
        print("ERROR Cancelled", flush=True)
        return 130
    if not args.dry_run:
        print(f"DONE {python}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
