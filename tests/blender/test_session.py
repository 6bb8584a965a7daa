"""JobSession: the thread between Blender and the backend, against a scripted client."""

import importlib
import threading
import time

import pytest

pytestmark = pytest.mark.blender


class ScriptedClient:
    """Answers status with the given states in turn; records cancel calls."""

    def __init__(self, states, error=None, slow_download=0.0):
        self.states, self.error, self.slow_download = list(states), error, slow_download
        self.cancelled = threading.Event()

    def health(self):
        return {"status": "ok"}

    def version(self):
        return {"api_version": 1, "backend_version": "test"}

    def submit(self, data):
        return {"id": "a" * 32, "state": "queued"}

    def status(self, job_id):
        state = "cancelled" if self.cancelled.is_set() else (self.states.pop(0) if len(self.states) > 1
                                                             else self.states[0])
        return {"id": job_id, "state": state, "stage": "keyframes", "step": 1, "total": 2, "error": self.error}

    def preview(self, job_id):
        return None

    def cancel(self, job_id):
        self.cancelled.set()
        return {}

    def result(self, job_id, out_dir):
        time.sleep(self.slow_download)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "texture.png").write_bytes(b"png")
        return [out_dir / "texture.png"]


@pytest.fixture
def session_module(addon, monkeypatch):
    module = importlib.import_module(f"{addon.__name__}.session")
    monkeypatch.setattr(module, "POLL_SECONDS", 0.01)
    return module


def make(session_module, addon, client, tmp_path):
    connection = importlib.import_module(f"{addon.__name__}.connection").Connection("http://127.0.0.1:1")
    return session_module.JobSession(connection, b"job", tmp_path, client_factory=lambda _c: client)


def test_done_is_never_seen_before_the_results_are_on_disk(session_module, addon, tmp_path):
    client = ScriptedClient(["queued", "running", "running", "done"], slow_download=0.3)
    session = make(session_module, addon, client, tmp_path).start()
    seen = []
    while not session.finished:
        seen.append(session.snapshot)
    final = session.snapshot
    assert final.state == "done" and (final.result_dir / "texture.png").is_file()
    assert all(s.result_dir is not None for s in seen if s.state == "done")


def test_cancel_reaches_the_backend_and_ends_cancelled(session_module, addon, tmp_path):
    session = make(session_module, addon, ScriptedClient(["running"]), tmp_path).start()
    time.sleep(0.05)
    session.cancel()
    final = session.wait(poll=0.01)
    assert final.state == "cancelled" and final.result_dir is None


def test_a_failed_job_carries_the_backends_error(session_module, addon, tmp_path):
    client = ScriptedClient(["running", "failed"], error="bake: texture_size too small")
    final = make(session_module, addon, client, tmp_path).start().wait(poll=0.01)
    assert final.state == "failed" and "texture_size too small" in final.error
