"""The worker's own rules, without HTTP: out-of-memory retries, cancel of queued jobs, recovery."""

from __future__ import annotations

import torch
from server_helpers import panorama_job, wait_for

from backend.engine import ModelConfig, ModelSet
from backend.server.store import JobStore
from backend.server.worker import MAX_MEMORY_LEVEL, Worker


def _run_with(tmp_path, runner):
    store = JobStore(tmp_path / "store")
    worker = Worker(store, ModelSet(ModelConfig.tiny()), runner=runner)
    worker.start()
    status = store.create("panorama", panorama_job().to_bytes())
    worker.submit(status["id"])
    final = wait_for(lambda: (s := store.status(status["id"]))["state"] in ("done", "failed") and s, timeout=30)
    worker.stop()
    return final


def test_out_of_memory_retries_at_lower_memory_levels_then_succeeds(tmp_path):
    levels = []

    def runner(job, models, ctx):
        levels.append(ctx.memory_level)
        if ctx.memory_level < 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {}

    final = _run_with(tmp_path, runner)
    assert levels == [0, 1, 2]
    assert final["state"] == "done" and final["memory_level"] == 2


def test_out_of_memory_at_every_level_fails_with_a_clear_message(tmp_path):
    def runner(job, models, ctx):
        raise RuntimeError("CUDA error: out of memory")

    final = _run_with(tmp_path, runner)
    assert final["state"] == "failed" and final["memory_level"] == MAX_MEMORY_LEVEL
    assert "out of GPU memory" in final["error"] and "smaller views" in final["error"]


def test_other_errors_fail_at_once_and_the_worker_goes_on(tmp_path):
    calls = []

    def runner(job, models, ctx):
        calls.append(ctx.memory_level)
        raise ValueError("something broke")

    final = _run_with(tmp_path, runner)
    assert calls == [0] and final["state"] == "failed" and "something broke" in final["error"]


def test_a_queued_job_is_cancelled_at_once_and_never_runs(tmp_path):
    store = JobStore(tmp_path / "store")
    ran = []
    worker = Worker(store, ModelSet(ModelConfig.tiny()), runner=lambda job, models, ctx: ran.append(1))
    status = store.create("panorama", panorama_job().to_bytes())
    worker.submit(status["id"])
    assert worker.cancel(status["id"])["state"] == "cancelled"
    worker.start()
    worker.stop()
    assert ran == [] and store.status(status["id"])["state"] == "cancelled"
