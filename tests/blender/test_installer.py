"""The *Install Backend* button in the real Blender: it follows the installer's progress lines
without blocking, fills in Backend Python on success, reports failures and can cancel.

A fake installer script stands in for the real one (which downloads GBs); it speaks the same
protocol. bpy as a module runs no event loop, so the tests call the timer function themselves,
as Blender's loop would.
"""

import sys
import time

import pytest

pytestmark = pytest.mark.blender

FAKE_INSTALLER = """
import time
for i in range(1, 5):
    print(f"PROGRESS {i / 5:.2f} step {i}", flush=True)
    print("some pip output for the log", flush=True)
    time.sleep(0.05)
print("DONE " + PYTHON, flush=True)
"""

SLOW_INSTALLER = """
import time
print("PROGRESS 0.10 downloading torch", flush=True)
time.sleep(60)
print("DONE /never", flush=True)
"""


def follow(installer, timeout=30.0):
    """Call the timer as Blender would until it stops; returns the (fraction, message) pairs it showed."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        again = installer.poll()
        install = installer.current()
        if not seen or seen[-1] != (install.fraction, install.message):
            seen.append((install.fraction, install.message))
        if again is None:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the installer did not finish: {seen}")


@pytest.fixture
def installer(addon, tmp_path, monkeypatch):
    prefs = addon.preferences.get()
    before = prefs.python
    yield addon.installer
    addon.installer.cancel()
    prefs.python = before


def fake(tmp_path, text):
    script = tmp_path / "fake_install.py"
    script.write_text(text)
    return script


def test_install_reports_progress_and_fills_in_backend_python(installer, addon, tmp_path, monkeypatch):
    python = str(tmp_path / "env" / "bin" / "python")
    monkeypatch.setattr(installer, "INSTALLER", fake(tmp_path, FAKE_INSTALLER.replace("PYTHON", repr(python))))
    import bpy

    assert bpy.ops.mvdiff.backend_install() == {"FINISHED"}
    assert installer.running()
    assert not bpy.ops.mvdiff.backend_install.poll(), "a second install must wait for the first"
    seen = follow(installer)
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and 0.2 <= fractions[1] < 1.0, seen
    assert any(message.startswith("step") for _, message in seen), seen
    install = installer.current()
    assert install.state == "done" and install.python == python
    assert addon.preferences.get().python == python
    assert "some pip output for the log" in install.log.read_text()


def test_failure_is_shown_and_backend_python_kept(installer, addon, tmp_path):
    addon.preferences.get().python = "/kept/python"
    script = fake(tmp_path, 'print("PROGRESS 0.5 half", flush=True)\nprint("ERROR pip failed: no network", flush=True)')
    installer.start(script=script, log=tmp_path / "install.log")
    follow(installer)
    assert installer.current().state == "failed"
    assert installer.current().message == "pip failed: no network"
    assert addon.preferences.get().python == "/kept/python"


def test_cancel_ends_the_installer_at_once(installer, addon, tmp_path):
    import bpy

    install = installer.start(script=fake(tmp_path, SLOW_INSTALLER), log=tmp_path / "install.log")
    while install.fraction == 0.0:
        installer.poll()
        time.sleep(0.02)
    assert bpy.ops.mvdiff.backend_install_cancel() == {"FINISHED"}
    started = time.monotonic()
    follow(installer, timeout=10)
    assert time.monotonic() - started < 5
    assert install.state == "cancelled" and install.process.returncode != 0
    assert not installer.running()


def test_the_real_installer_runs_under_blenders_python(addon, tmp_path):
    """The shipped script, with the Python Blender runs it with, in --dry-run: the plan, nothing installed."""
    import subprocess

    result = subprocess.run([sys.executable, str(addon.installer.INSTALLER), "--dry-run", "--prefix",
                             str(tmp_path / "env"), "--cpu"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(tmp_path / "env") in result.stdout and "torch==" in result.stdout
    assert not (tmp_path / "env").exists()
