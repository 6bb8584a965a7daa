"""The job store when things go wrong: a full disk, a damaged job folder, a stop, old jobs piling up."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
import uuid

import pytest
from server_helpers import BackendProcess, panorama_job, texture_job, wait_for

from backend.client import BackendError
from backend.engine import ModelConfig, ModelSet
from backend.server import store as store_module
from backend.server.store import JobStore
from backend.server.worker import Worker


# ---------------------------------------------------------------------- a disk that refuses writes
def test_a_write_failure_fails_the_job_with_a_clear_error(tmp_path, monkeypatch):
    """In-process, with writes that fail as on a full disk (runs everywhere, no mount needed)."""
    store = JobStore(tmp_path / "store")
    full = {"on": False}
    real_write = store_module.write_bytes

    def write(path, data, durable=False):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, durable)

    def runner(job, models, ctx):
        full["on"] = True  # the disk fills up while the job runs
        for step in range(1000):
            ctx.progress("denoise", step, 1000)
            time.sleep(0.001)

    monkeypatch.setattr(store_module, "write_bytes", write)
    worker = Worker(store, ModelSet(ModelConfig.tiny()), runner=runner)
    worker.start()
    try:
        job = store.create("panorama", panorama_job().to_bytes())
        worker.submit(job["id"])
        final = wait_for(lambda: (s := store.status(job["id"]))["state"] not in ("queued", "running") and s,
                         timeout=30)
        assert final["state"] == "failed" and "disk is full" in final["error"]
        # Submitting meanwhile answers a clear error and leaves no half-made job folder behind.
        before = sorted(p.name for p in store.jobs.iterdir())
        with pytest.raises(store_module.StorageError, match="disk is full"):
            store.create("panorama", panorama_job().to_bytes())
        assert sorted(p.name for p in store.jobs.iterdir()) == before
    finally:
        worker.stop()


def test_other_os_errors_are_not_blamed_on_the_disk_and_keep_the_outputs(tmp_path):
    store = JobStore(tmp_path / "store")

    def runner(job, models, ctx):
        (ctx.out_dir / "frame.png").write_bytes(b"png")
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "weights.safetensors")

    worker = Worker(store, ModelSet(ModelConfig.tiny()), runner=runner)
    worker.start()
    try:
        job = store.create("panorama", panorama_job().to_bytes())
        worker.submit(job["id"])
        final = wait_for(lambda: (s := store.status(job["id"]))["state"] == "failed" and s, timeout=30)
        assert "weights.safetensors" in final["error"] and "disk" not in final["error"]
        assert final["outputs"] == ["frame.png"]
    finally:
        worker.stop()


def _mount_small_disk(folder, size: str = "3m") -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _fill(folder) -> None:
    """Write zeros until the disk is full."""
    with open(folder / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_a_full_disk_fails_the_job_refuses_submissions_and_the_server_restarts(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_small_disk(disk):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        server = BackendProcess(disk / "store")
        try:
            job = server.client.submit(texture_job(steps=400).to_bytes())
            wait_for(lambda: server.client.status(job["id"])["step"] >= 1, timeout=120)
            _fill(disk)
            final = server.client.wait(job["id"], poll=0.05, timeout=60)
            assert final["state"] == "failed" and "disk is full" in final["error"]
            before = sorted(p.name for p in (disk / "store" / "jobs").iterdir())
            with pytest.raises(BackendError) as err:
                server.client.submit(panorama_job().to_bytes())
            assert err.value.status == 507 and "disk is full" in err.value.message
            assert sorted(p.name for p in (disk / "store" / "jobs").iterdir()) == before
            assert not any((disk / "store" / "incoming").iterdir())
            assert [s["id"] for s in server.client.jobs()] == [job["id"]]
            queued = job["id"]
        finally:
            server.stop(kill=True)
        # The disk is still full: the server starts anyway and answers for the job.
        again = BackendProcess(disk / "store")
        try:
            assert again.client.status(queued)["state"] in ("failed", "interrupted")
        finally:
            again.stop()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------- a damaged job folder
def _fake_job(store, state: str, finished_ago: float | None, created_ago: float = 0.0) -> str:
    job_id = uuid.uuid4().hex
    folder = store / "jobs" / job_id
    (folder / "outputs").mkdir(parents=True)
    now = time.time()
    status = {"id": job_id, "kind": "panorama", "state": state, "stage": None, "step": 0, "total": 0,
              "eta_seconds": None, "error": None, "created": now - max(created_ago, finished_ago or 0) - 1,
              "started": None, "finished": None if finished_ago is None else now - finished_ago,
              "memory_level": 0, "outputs": []}
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "input.npz").write_bytes(panorama_job().to_bytes())
    return job_id


# ---------------------------------------------------------------------- stopping
def test_sigterm_marks_the_running_job_interrupted_on_disk(tmp_path):
    server = BackendProcess(tmp_path / "store")
    try:
        job = server.client.submit(texture_job(steps=400).to_bytes())
        wait_for(lambda: server.client.status(job["id"])["step"] >= 1, timeout=120)
        queued = server.client.submit(panorama_job().to_bytes())
    finally:
        server.stop()  # SIGTERM, as a service manager or the add-on sends it
    for job_id in (job["id"], queued["id"]):
        status = json.loads((tmp_path / "store" / "jobs" / job_id / "status.json").read_text())
        assert status["state"] == "interrupted" and "resubmit" in status["error"]


# ---------------------------------------------------------------------- a damaged folder, retention
def test_start_up_skips_a_damaged_job_and_deletes_old_and_surplus_finished_jobs_only(tmp_path):
    store = tmp_path / "store"
    old = _fake_job(store, "done", finished_ago=10 * 86400)
    recent = [_fake_job(store, "done", finished_ago=hours * 3600) for hours in (1, 2, 3)]
    running = _fake_job(store, "running", None, created_ago=20 * 86400)
    damaged = _fake_job(store, "running", None)
    (store / "jobs" / damaged / "status.json").write_text('{"id": "trunc')
    server = BackendProcess(store, extra=("--keep-days", "7", "--keep-jobs", "3"))  # starts despite the damage
    try:
        listed = server.client.jobs()  # not a 500
        assert damaged in server.client.version()["damaged_jobs"]
        with pytest.raises(BackendError) as err:
            server.client.status(damaged)
        assert err.value.status == 404 and "damaged" in err.value.message
        assert server.client.status(running)["state"] == "interrupted"
    finally:
        server.stop()
    # The running job became interrupted at start (now the newest finished one) and is kept; of
    # the rest, the one older than a week and the one beyond three are gone; the damaged folder stays.
    assert {s["id"] for s in listed} == {running, recent[0], recent[1]}
    assert not (store / "jobs" / old).exists() and not (store / "jobs" / recent[2]).exists()
    assert (store / "jobs" / damaged).is_dir()
