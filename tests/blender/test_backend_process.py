"""The local backend's lifecycle: restart on changed settings, the process record, and a backend that
an earlier Blender session left running (found, stopped or used; never a process that is not ours).

The backend here is a small script given as the Backend Python: it answers /v1/health and
/v1/version on the port it is told, and reports its arguments and the token and instance id it
found in its environment, so the tests see what it was started with. A real backend would take
seconds to start; the lifecycle does not depend on it.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from backend.protocol import API_VERSION

pytestmark = pytest.mark.blender

FAKE_BACKEND = f"""#!{sys.executable}
import http.server, json, os, sys
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path not in ("/v1/health", "/v1/version"):
            self.send_error(404)
            return
        body = json.dumps({{"status": "ok", "api_version": {API_VERSION!r}, "backend_version": "fake",
                           "device": "cpu", "argv": argv, "instance_id": os.environ.get("MVDIFF_INSTANCE_ID"),
                           "token": os.environ.get("MVDIFF_TOKEN"),
                           "authorization": self.headers.get("Authorization")}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/version", timeout=5) as response:
        return json.loads(response.read())


def gone(pid: int, timeout: float = 10.0) -> bool:
    """The process has exited (a zombie child of this test process counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def local(addon, tmp_path):
    """Preferences set to start the fake backend; everything started is stopped afterwards."""
    import bpy

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_BACKEND)
    fake.chmod(0o755)
    prefs = addon.preferences.get(bpy.context)
    saved = {name: getattr(prefs, name) for name in ("mode", "python", "model_source", "device", "port",
                                                     "start_automatically")}
    prefs.mode, prefs.python, prefs.model_source, prefs.device = "LOCAL", str(fake), "TINY", "CPU"
    prefs.port, prefs.start_automatically = free_port(), True
    yield prefs
    process = addon.backend_process
    process.stop()
    process._orphan = None
    for name, value in saved.items():
        setattr(prefs, name, value)


def start(addon, prefs):
    """Start Backend, as the button does, and wait until it answers; returns its Popen."""
    import bpy

    assert bpy.ops.mvdiff.backend_start() == {"FINISHED"}
    process = addon.backend_process
    conn = addon.preferences.connection(bpy.context)
    process.wait_until_healthy(addon.session.BackendClient(conn.url), timeout=30)
    return process._started


class StatusBox:
    """Stands in for the preferences' layout: records every label text and operator button."""

    def __init__(self):
        self.labels, self.buttons = [], []

    def label(self, text="", **_kwargs):
        self.labels.append(text)

    def operator(self, idname, text=None, **_kwargs):
        self.buttons.append(text or idname)
        return self

    def __getattr__(self, _name):
        return lambda *args, **kwargs: self


def draw_status(addon, prefs) -> StatusBox:
    box = StatusBox()
    addon.preferences.draw_status(box, prefs)
    return box


def record_file(addon, port: int):
    return addon.process_record.record_file(addon.preferences.record_dir(), port)


def forget_session(addon) -> None:
    """What a new Blender session knows about the backend: nothing in memory, only the record file."""
    addon.backend_process._started = None
    addon.backend_process._started_launch = None
    addon.backend_process._adopted = None


def test_changed_settings_restart_the_backend_with_the_new_arguments(addon, local):
    import bpy

    first = start(addon, local)
    assert "--device" in version(local.port)["argv"]
    ok, text, _ = addon.preferences.check(bpy.context)
    assert ok and "ready" in text

    local.device = "AUTO"  # the update callback: the status box stops saying ready at once
    assert not addon.preferences._status["ok"] and "earlier settings" in addon.preferences._status["text"]
    ok, text, fix = addon.preferences.check(bpy.context)
    assert not ok and "earlier settings" in text and "Restart Backend" in fix
    box = draw_status(addon, local)
    assert "Restart Backend" in box.buttons and not any("ready" in label for label in box.labels)

    # The next job restarts it before talking to it (the session's first step).
    conn = addon.preferences.connection(bpy.context)
    session = addon.session.JobSession(conn, b"", local.python)
    session._ensure_backend(addon.session.BackendClient(conn.url))
    assert gone(first.pid), "the backend with the old settings is still running"
    second = addon.backend_process._started
    assert second.pid != first.pid and "--device" not in version(local.port)["argv"]
    assert addon.preferences.check(bpy.context)[0]

    # A new port: Restart Backend moves it, and nothing answers on the old port any more.
    old_port = local.port
    local.port = free_port()
    third = start(addon, local)
    assert gone(second.pid) and third.pid != second.pid
    assert version(local.port)["argv"][version(local.port)["argv"].index("--port") + 1] == str(local.port)
    with pytest.raises(OSError):
        version(old_port)


def test_the_process_record_is_written_on_start_and_removed_on_stop(addon, local):
    import bpy

    before = time.time()
    started = start(addon, local)
    path = record_file(addon, local.port)
    record = json.loads(path.read_text())
    launch = addon.preferences.connection(bpy.context).launch
    assert record["pid"] == started.pid and record["port"] == local.port
    assert record["command"] == addon.backend_process.command(launch)
    assert before - 1 <= record["started_at"] <= time.time()
    assert record["owner_pid"] == os.getpid()  # this Blender
    assert not list(path.parent.glob("*.tmp")), "the record is written through a temporary file"
    assert bpy.ops.mvdiff.backend_stop() == {"FINISHED"}
    assert gone(started.pid) and not path.exists()


def test_an_orphan_from_an_earlier_session_is_reported_and_stopped(addon, local):
    import bpy

    started = start(addon, local)
    forget_session(addon)
    addon.preferences.register_extra()  # what enabling the add-on in the next session does
    text = addon.preferences._status["text"]
    assert text == f"A backend from an earlier Blender session is running on port {local.port}"
    assert "Stop It" in addon.preferences._status["fix"]
    # Neither a Start nor a job goes ahead while it holds the port.
    launch = addon.preferences.connection(bpy.context).launch
    with pytest.raises(addon.connection.SetupError, match="earlier Blender session") as err:
        addon.backend_process.start(launch)
    assert "Stop It" in err.value.fix
    ok, text, fix = addon.preferences.check(bpy.context)
    assert not ok and "earlier Blender session" in text and "Use It" in fix
    box = draw_status(addon, local)
    assert f"A backend from an earlier Blender session is running on port {local.port}" in box.labels
    assert {"mvdiff.backend_orphan_stop", "mvdiff.backend_orphan_use"} <= set(box.buttons)
    assert "mvdiff.backend_start" in box.buttons  # nothing of this session's runs

    assert bpy.ops.mvdiff.backend_orphan_stop() == {"FINISHED"}
    assert gone(started.pid)
    assert not record_file(addon, local.port).exists()
    assert addon.backend_process.orphan() is None


def test_an_orphan_can_be_used_and_then_stops_with_blender(addon, local):
    import bpy

    started = start(addon, local)
    forget_session(addon)
    addon.preferences.register_extra()
    assert bpy.ops.mvdiff.backend_orphan_use() == {"FINISHED"}
    assert addon.backend_process.is_running()
    ok, text, _ = addon.preferences.check(bpy.context)
    assert ok and "ready" in text
    addon.backend_process.stop()
    assert gone(started.pid) and not record_file(addon, local.port).exists()


def test_a_record_of_a_dead_process_is_removed_silently(addon, local):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = record_file(addon, local.port)
    record = addon.process_record.Record(dead.pid, local.port, time.time(), (local.python, "-m", "backend", "serve"))
    addon.process_record.write(path, record)
    addon.preferences._remember(True, "unchanged", "")
    addon.preferences.register_extra()
    assert addon.backend_process.orphan() is None and not path.exists()
    assert addon.preferences._status["text"] == "unchanged"


def test_a_live_process_that_is_not_our_backend_is_never_killed(addon, local, tmp_path):
    process_record = addon.process_record
    folder = addon.preferences.record_dir()
    # A pid reused by an unrelated program.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # And our backend's very command line, but a process started later than the record says
    # (the pid was reused by a new backend that some other program started).
    port = free_port()
    lookalike_command = [local.python, "-m", "backend", "serve", "--port", str(port)]
    lookalike = subprocess.Popen(lookalike_command)
    try:
        for pid, record_port, command, proc_start in (
                (other.pid, local.port, (local.python, "-m", "backend", "serve", "--port", str(local.port)), ""),
                (lookalike.pid, port, tuple(lookalike_command), "1")):
            record = process_record.Record(pid, record_port, time.time(), command, proc_start)
            path = process_record.record_file(folder, record_port)
            process_record.write(path, record)
            assert addon.backend_process.scan(folder) is None
            assert not path.exists(), "a record about someone else's process is stale and goes"
            assert process_record.terminate(record, timeout=1) is False
        time.sleep(0.3)
        assert other.poll() is None and lookalike.poll() is None, "a process that is not ours was killed"
    finally:
        for p in (other, lookalike):
            p.kill()
            p.wait()


def test_a_backend_whose_blender_still_runs_is_that_sessions_not_an_orphan(addon, local):
    """Two Blender sessions at once: the second one neither offers to stop the first one's backend
    nor forgets its record."""
    process_record = addon.process_record
    folder = addon.preferences.record_dir()
    other_blender = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    command = [local.python, "-m", "backend", "serve", "--port", str(local.port)]
    backend = subprocess.Popen(command)
    try:
        record = process_record.Record(backend.pid, local.port, time.time(), tuple(command),
                                       process_record.process_start_token(backend.pid), other_blender.pid,
                                       process_record.process_start_token(other_blender.pid))
        path = process_record.record_file(folder, local.port)
        process_record.write(path, record)
        assert process_record.is_our_backend(record)
        assert addon.backend_process.scan(folder) is None and path.exists()
        # Once that Blender has gone, its backend is an orphan.
        other_blender.kill()
        other_blender.wait()
        assert addon.backend_process.scan(folder) == record
    finally:
        for p in (other_blender, backend):
            p.kill()
            p.wait()
        addon.backend_process._orphan = None
        process_record.remove(process_record.record_file(folder, local.port))


def test_no_python_keeps_its_fix_wherever_it_is_shown(addon, local, tmp_path, monkeypatch):
    import bpy

    local.python = ""
    monkeypatch.setattr(addon.preferences, "bundled_venv_python", lambda: "")
    with pytest.raises(RuntimeError, match="No Python is set.*Backend Python"):
        bpy.ops.mvdiff.backend_start()
    assert "Backend Python" in addon.preferences._status["fix"]
    ok, text, fix = addon.preferences.check(bpy.context)
    assert not ok and text == "No Python is set for the backend" and "Backend Python" in fix
    # A job: the panel's message and the operator's report both carry it.
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.mesh.primitive_cube_add()
    settings = bpy.context.scene.mvdiff
    settings.prompt, settings.steps, settings.output_dir = "a box", 1, str(tmp_path)
    settings.camera_source, settings.orbit_views, settings.width, settings.height = "ORBIT", 2, 64, 64
    with pytest.raises(RuntimeError, match="No Python is set.*Backend Python"):
        bpy.ops.mvdiff.texture()
    assert "Edit > Preferences > Add-ons" in bpy.context.window_manager.mvdiff.message
    assert os.environ.get("BLENDER_USER_RESOURCES")


def test_each_start_gets_a_fresh_token_through_the_environment_only(addon, local):
    import bpy

    started = start(addon, local)
    info = version(local.port)
    token = addon.backend_process.token()
    assert token and len(token) >= 32 and info["token"] == token
    assert info["instance_id"] and info["instance_id"] == json.loads(record_file(addon, local.port).read_text())[
        "instance_id"]
    with open(f"/proc/{started.pid}/cmdline", "rb") as cmdline:
        assert token.encode() not in cmdline.read()
    log = addon.preferences.local_launch(bpy.context).log
    assert token not in log.read_text()
    assert record_file(addon, local.port).stat().st_mode & 0o077 == 0, "the record holds the token: owner only"
    # The add-on's own calls carry it.
    conn = addon.preferences.connection(bpy.context)
    assert conn.token == token
    assert addon.backend_process.identify(addon.session.BackendClient(conn.url))["authorization"] == f"Bearer {token}"
    # A restart is a new backend with a new token.
    assert bpy.ops.mvdiff.backend_stop() == {"FINISHED"}
    start(addon, local)
    assert addon.backend_process.token() not in (None, token)


def test_another_program_on_the_port_is_refused_with_a_clear_message(addon, local, tmp_path):
    import bpy

    # Some other backend the user (or another program) runs on the configured port.
    foreign = subprocess.Popen([local.python, "-m", "backend", "serve", "--port", str(local.port)],
                               env={k: v for k, v in os.environ.items() if not k.startswith("MVDIFF_")})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                version(local.port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the foreign program did not start"
                time.sleep(0.05)
        ok, text, fix = addon.preferences.check(bpy.context)
        assert not ok and f"Another program is listening on port {local.port}" in text and "Port" in fix
        conn = addon.preferences.connection(bpy.context)
        final = addon.session.JobSession(conn, b"job", tmp_path).start().wait(poll=0.01)
        assert final.state == "error" and f"Another program is listening on port {local.port}" in final.error
        assert not addon.backend_process.is_running(), "nothing of ours was started on a taken port"
        assert foreign.poll() is None, "the other program is left alone"
    finally:
        foreign.kill()
        foreign.wait()
