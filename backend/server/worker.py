"""The one GPU worker: runs queued jobs one at a time, reports progress, cancels, retries on OOM.

One job at a time is deliberate: a diffusion job fills the GPU, and two would only run out of
memory together. The queue lives in memory; the store on disk is the truth, so a restart loses
no result (see :meth:`~backend.server.store.JobStore.recover`).
"""

from __future__ import annotations

import errno
import gc
import io
import logging
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable

import imageio.v3 as iio
import numpy as np
import torch

from ..engine import ModelSet
from ..geometry.child import ChildFailed
from ..pipelines.context import JobContext
from ..pipelines.sampling import Cancelled
from ..protocol import read_job
from ..validation import InputError
from .store import JobStore, StorageError, UnknownJob, describe_write_error

log = logging.getLogger("backend.worker")
PROGRESS_INTERVAL = 0.25  # seconds between status writes within a stage
MAX_MEMORY_LEVEL = 3  # retries after running out of GPU memory, each with a lower-memory setting
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # write failures that mean the store's disk
STOPPED_MESSAGE = "the backend was stopped while this job was queued or running; resubmit it to run it again"


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_job(job, models: ModelSet, ctx: JobContext) -> dict:
    """Run a parsed job (texture or panorama) with ``ctx``; returns its report."""
    if job.kind == "texture":
        from ..pipelines.texturing import run_texture_job

        mode = models.resolve_mode("depth", job.settings.mode)
        return run_texture_job(job, models.sampler("depth"), ctx, models.describe("depth"), mode)
    from ..pipelines.hdri import run_panorama_job

    task = "panorama" if job.image is None else "outpaint"  # from an image: the inpainting model outpaints it
    mode = models.resolve_mode(task, job.settings.mode)
    return run_panorama_job(job, models.sampler(task), ctx, models.describe(task), mode)


class StageClock:
    """Turns (stage, step, total) reports into an ETA for the current stage."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.started = time.perf_counter()

    def eta(self, stage: str, step: int, total: int) -> float | None:
        now = time.perf_counter()
        if stage != self.stage or step == 0:
            self.stage, self.started = stage, now
            return None
        if total <= 0:
            return None
        return round((now - self.started) / step * (total - step), 1)


class Worker:
    """A daemon thread that takes job ids from a queue and runs them against the store."""

    def __init__(self, store: JobStore, models: ModelSet, runner: Callable = run_job,
                 after_job: Callable[[], None] | None = None):
        self.store, self.models, self.runner, self.after_job = store, models, runner, after_job
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.current: str | None = None
        self._stopping = False
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.lock = self._lock  # held while a job's state is read and changed as one step
        self._thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the running job, end the thread, and leave every unfinished job marked interrupted.

        The running job is asked to stop as a cancel would; a stage that does not stop within
        ``timeout`` is marked interrupted anyway, so no job stays ``running`` on disk after exit."""
        self._stopping = True
        if self.current is not None:
            self.cancel(self.current)
        self.queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.store.recover(STOPPED_MESSAGE)

    def submit(self, job_id: str) -> None:
        with self._lock:
            self._cancel[job_id] = threading.Event()
        self.queue.put(job_id)

    def cancel(self, job_id: str) -> dict:
        """Stop a job: a queued one at once, a running one within one denoising step."""
        with self._lock:
            event = self._cancel.get(job_id)
            if event is not None:
                event.set()
            status = self.store.status(job_id)
            if status["state"] == "queued":
                return self.store.update(job_id, state="cancelled", finished=time.time(), error="cancelled")
        return status

    @property
    def queued(self) -> int:
        return self.queue.qsize()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            job_id = self.queue.get()
            if job_id is None or self._stopping:
                return
            try:
                self._run(job_id)
            except UnknownJob:
                log.warning("job %s vanished from the store", job_id)
            except StorageError as err:
                self._finish(job_id, "failed", str(err))
            except Exception:  # the worker must survive anything one job does
                log.exception("job %s crashed the worker loop", job_id)
            finally:
                with self._lock:
                    self._cancel.pop(job_id, None)
                self.current = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.after_job is not None and not self._stopping:
                    try:
                        self.after_job()
                    except Exception:  # housekeeping must never stop the worker
                        log.exception("after-job housekeeping failed")

    def _run(self, job_id: str) -> None:
        with self._lock:
            cancel = self._cancel.setdefault(job_id, threading.Event())
            if self.store.status(job_id)["state"] != "queued" or cancel.is_set():
                return
            self.current = job_id
            self.store.update(job_id, state="running", started=time.time(), error=None)
        try:
            job = read_job(self.store.input_path(job_id))
        except InputError as err:
            self.store.update(job_id, state="failed", finished=time.time(), error=str(err))
            return
        clock = StageClock()
        last = {"stage": None, "written": 0.0}

        def progress(stage: str, step: int, total: int) -> None:
            # Status goes to disk (fsync-ed) at most a few times a second, and always at a stage's
            # start and end: fast steps must not wait on the disk.
            eta, now = clock.eta(stage, step, total), time.monotonic()
            if stage == last["stage"] and 0 < step < total and now - last["written"] < PROGRESS_INTERVAL:
                return
            last["stage"], last["written"] = stage, now
            self.store.update(job_id, stage=stage, step=step, total=total, eta_seconds=eta)

        def preview(image: np.ndarray) -> None:
            buffer = io.BytesIO()
            iio.imwrite(buffer, image, extension=".png")
            self.store.write_preview(job_id, buffer.getvalue())

        for level in range(MAX_MEMORY_LEVEL + 1):
            try:
                ctx = JobContext(self.store.outputs(job_id), cancel, progress, preview, memory_level=level)
                self.store.update(job_id, memory_level=level)
                self.runner(job, self.models, ctx)
            except Cancelled:
                if self._stopping:
                    self._finish(job_id, "interrupted", STOPPED_MESSAGE)
                else:
                    self._finish(job_id, "cancelled", "cancelled")
                return
            except (StorageError, OSError) as err:
                if not isinstance(err, StorageError) and err.errno not in DISK_ERRNOS:
                    self._finish(job_id, "failed", _describe(err, level))  # a missing file, a network error...
                    return
                # A full or read-only disk: drop what the job half wrote (freeing space for the status).
                shutil.rmtree(self.store.outputs(job_id), ignore_errors=True)
                message = str(err) if isinstance(err, StorageError) else describe_write_error(err)
                self._finish(job_id, "failed", message)
                return
            except Exception as err:
                if is_out_of_memory(err) and level < MAX_MEMORY_LEVEL:
                    log.warning("job %s ran out of GPU memory; retrying with memory level %d", job_id, level + 1)
                    del err
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                self._finish(job_id, "failed", _describe(err, level))
                return
            self._finish(job_id, "done", None)
            return

    def _finish(self, job_id: str, state: str, error: str | None) -> None:
        """Record the job's end; if the disk refuses, the store keeps it in memory and this logs why."""
        try:
            self.store.update(job_id, state=state, error=error, finished=time.time(), eta_seconds=None,
                              outputs=self.store.output_names(job_id))
        except StorageError as err:
            log.error("job %s ended %s but its status could not be written: %s", job_id, state, err)


def _describe(error: Exception, level: int) -> str:
    """The message a user sees for a failed job."""
    if is_out_of_memory(error):
        return (
            f"out of GPU memory even at memory level {level} (guidance halves apart, short interpolation "
            "windows); use smaller views, fewer cameras or a GPU with more memory"
        )
    if isinstance(error, (InputError, ChildFailed)):  # their messages are written for the user
        return str(error)
    log.error("job failed:\n%s", "".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {error}"
