"""One backend job seen from Blender: upload, progress, previews, cancel, download, off the UI thread.

A :class:`JobSession` owns a worker thread that does every network call. The thread never
touches ``bpy``: it publishes immutable :class:`Snapshot` objects that the main thread reads
from a timer (the modal operator in the UI) or a loop (background mode). The same session
serves both, so the headless path is the one the tests exercise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..backend import atomic
from ..backend.client import BackendClient, BackendError
from ..backend.protocol import API_VERSION, FINAL_STATES
from . import backend_process
from .connection import Connection, SetupError, with_fix

POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Snapshot:
    """What the UI shows; ``state`` is the backend's, plus 'connecting' and 'uploading' before it."""

    state: str = "connecting"
    stage: str = ""
    step: int = 0
    total: int = 0
    message: str = ""
    job_id: str = ""
    preview_path: Path | None = None
    preview_serial: int = 0
    result_dir: Path | None = None
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES or self.state == "error"

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    def describe(self) -> str:
        if self.state == "running" and self.stage:
            return f"{self.stage} {self.step}/{self.total}" if self.total else self.stage
        return self.message or self.state


class JobSession:
    """Run one job on the backend in a thread; ``snapshot`` is safe to read at any time."""

    def __init__(self, connection: Connection, job_bytes: bytes, work_dir: Path, *,
                 client_factory: Callable[[Connection], BackendClient] | None = None):
        self.connection = connection
        self.job_bytes = job_bytes
        self.work_dir = Path(work_dir)
        self._client_factory = client_factory or (lambda c: BackendClient(c.url, c.token, c.timeout))
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mvdiff-job", daemon=True)

    # ------------------------------------------------------------------ main thread
    def start(self) -> JobSession:
        self._thread.start()
        return self

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    @property
    def finished(self) -> bool:
        """The job has ended and the worker thread with it: the snapshot will not change again."""
        return self.snapshot.finished and not self._thread.is_alive()

    def cancel(self) -> None:
        """Ask the backend to stop the job; the session ends as 'cancelled' once it has."""
        self._cancel.set()

    def wait(self, on_snapshot: Callable[[Snapshot], None] | None = None, poll: float = 0.2) -> Snapshot:
        """Block until the job ends (background mode); ``on_snapshot`` sees every change."""
        last = None
        while True:
            finished = self.finished
            snap = self.snapshot
            if snap != last and on_snapshot is not None:
                on_snapshot(snap)
            last = snap
            if finished:
                return snap
            time.sleep(poll)

    # ------------------------------------------------------------------ worker thread
    def _publish(self, **changes) -> None:
        with self._lock:
            self._snapshot = replace(self._snapshot, **changes)

    def _run(self) -> None:
        try:
            self._run_job()
        except SetupError as err:
            self._publish(state="error", error=with_fix(err))
        except BackendError as err:
            self._publish(state="error", error=err.message if err.status == 0 else str(err))
        except Exception as err:  # noqa: BLE001 - anything else still has to reach the user, not a dead thread
            self._publish(state="error", error=f"{type(err).__name__}: {err}")

    def _run_job(self) -> None:
        client = self._client_factory(self.connection)
        self._publish(state="connecting", message=f"Connecting to {self.connection.url}")
        self._ensure_backend(client)
        version = client.version()
        if version.get("api_version") != API_VERSION:
            raise SetupError(
                f"The backend at {self.connection.url} speaks API version {version.get('api_version')} "
                f"(backend {version.get('backend_version')}), this add-on needs version {API_VERSION}",
                "Update the backend and the add-on to the same release")
        if self._cancel.is_set():
            self._publish(state="cancelled", message="Cancelled before upload")
            return
        self._publish(state="uploading", message=f"Uploading {len(self.job_bytes) / 2**20:.1f} MB")
        job_id = client.submit(self.job_bytes)["id"]
        self._publish(job_id=job_id, state="queued", message="Queued")
        self._follow(client, job_id)

    def _ensure_backend(self, client: BackendClient) -> None:
        launch = self.connection.launch
        if launch is not None:
            backend_process.check_no_orphan(launch.port)
            if backend_process.is_stale(launch):
                # Started with other settings (Model, Device, Port...): a job must not reach the old model.
                self._publish(message="Restarting the backend with the new settings")
                backend_process.stop()
        try:
            if self.connection.local:
                backend_process.identify(client)  # ours, or a clear error: never another program on the port
            else:
                client.health()
            return
        except BackendError as err:
            if launch is None or err.status != 0:
                raise
        self._publish(message="Starting the backend")
        backend_process.start(launch)
        backend_process.wait_until_healthy(client, cancelled=self._cancel.is_set)

    def _follow(self, client: BackendClient, job_id: str) -> None:
        cancel_sent = False
        serial, last_step = 0, None
        while True:
            if self._cancel.is_set() and not cancel_sent:
                client.cancel(job_id)
                cancel_sent = True
            status = client.status(job_id)
            state = status["state"]
            step = (status.get("stage"), status.get("step"))
            # A final state is published only once its results are on disk (below), so a reader
            # never sees "done" without a result folder.
            self._publish(state="running" if state in FINAL_STATES else state, stage=status.get("stage") or "",
                          step=status.get("step") or 0, total=status.get("total") or 0,
                          message=_message(status))
            if state == "running" and step != last_step:
                last_step = step
                preview = client.preview(job_id)
                if preview:
                    serial += 1
                    path = self.work_dir / "preview.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic.write_bytes(path, preview)
                    self._publish(preview_path=path, preview_serial=serial)
            if state in FINAL_STATES:
                break
            time.sleep(POLL_SECONDS)
        if state == "done":
            self._publish(message="Downloading the results")
            result_dir = self.work_dir / "result"
            client.result(job_id, result_dir)
            self._publish(state="done", result_dir=result_dir, message="Done")
        elif state == "failed":
            self._publish(state="failed", error=status.get("error") or "the job failed on the backend")
        elif state == "interrupted":
            self._publish(state="interrupted",
                          error="the backend stopped while running the job; resubmit it when it is back")
        else:
            self._publish(state=state, message="Cancelled")


def _message(status: dict) -> str:
    eta = status.get("eta_seconds")
    text = status["state"]
    if status.get("stage"):
        text = f"{status['stage']} {status.get('step', 0)}/{status.get('total', 0)}"
    if eta:
        text += f", about {eta:.0f} s left"
    return text
