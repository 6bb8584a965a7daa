"""Durable job store: one folder per job with its inputs, its status and its outputs.

Layout under the store's root::

    jobs/<id>/input.npz      the job exactly as it arrived
    jobs/<id>/status.json    state, stage, step, error... (replaced atomically on every change)
    jobs/<id>/preview.png    the latest preview, when there is one
    jobs/<id>/outputs/...    what the job wrote

Everything a job needs to run again is on disk, so a restarted backend can still hand out
finished results and re-run jobs it was interrupted in. Job ids are 32 hex digits and checked
before any path is built from them; output names are resolved and must stay inside the job.

The disk may fill up or a folder may be damaged. A status that cannot be written is kept in
memory (so a failed job reads as failed, not as running forever) and the write error is raised
as :class:`StorageError`; a job folder whose ``status.json`` cannot be read is skipped and listed
in :attr:`JobStore.damaged` rather than failing every listing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..atomic import write_bytes
from ..protocol import FINAL_STATES, JOB_STATES
from ..validation import InputError

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
INPUT_NAME = "input.npz"
STATUS_NAME = "status.json"
PREVIEW_NAME = "preview.png"
OUTPUTS = "outputs"
INCOMING = "incoming"
DAY = 86400.0
log = logging.getLogger("backend.store")


class UnknownJob(KeyError):
    """No job with that id in the store (or an id that cannot name one)."""

    def __init__(self, job_id: object, message: str = "no such job"):
        super().__init__(job_id)
        self.message = message


class StorageError(RuntimeError):
    """The store could not write (a full disk, a read-only or vanished folder); the message says so."""


def describe_write_error(err: OSError) -> str:
    """What a user reads when the store's disk refuses a write."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the job store's disk is full ({err.strerror}); free some space or delete old jobs"
    if err.errno == errno.EROFS:
        return f"the job store is on a read-only disk ({err.strerror})"
    return f"the job store could not be written ({err.strerror or err})"


class JobStore:
    """Jobs on disk; thread-safe for the one worker and the many request handlers."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.jobs = self.root / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.incoming = self.root / INCOMING
        shutil.rmtree(self.incoming, ignore_errors=True)  # uploads a stopped server never finished
        self.incoming.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._unsaved: dict[str, dict[str, Any]] = {}  # statuses the disk refused, newest first
        self.damaged: dict[str, str] = {}  # job id -> why its folder was skipped

    # ------------------------------------------------------------------ paths
    def folder(self, job_id: str) -> Path:
        """The job's folder; refuses anything that is not a well-formed id of an existing job."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise UnknownJob(job_id)
        folder = self.jobs / job_id
        if job_id not in self._unsaved and not (folder / STATUS_NAME).is_file():
            raise UnknownJob(job_id)
        return folder

    def input_path(self, job_id: str) -> Path:
        return self.folder(job_id) / INPUT_NAME

    def outputs(self, job_id: str) -> Path:
        return self.folder(job_id) / OUTPUTS

    def preview_path(self, job_id: str) -> Path:
        return self.folder(job_id) / PREVIEW_NAME

    def output_file(self, job_id: str, name: str) -> Path:
        """One output file by its relative name (``frames/frame_0001.png``), kept inside the job."""
        outputs = self.outputs(job_id).resolve()
        path = (outputs / name).resolve()
        if not path.is_relative_to(outputs) or not path.is_file():
            raise InputError("name", f"no output file {name!r} in this job")
        return path

    def output_names(self, job_id: str) -> list[str]:
        outputs = self.outputs(job_id)
        if not outputs.is_dir():
            return []
        return sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*") if p.is_file())

    # ------------------------------------------------------------------ status
    def upload_path(self) -> Path:
        """A fresh file under the store for an upload in progress (same disk: moved, never copied)."""
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def create(self, kind: str, body: bytes | Path) -> dict[str, Any]:
        """Store a new job's inputs (bytes, or an upload file that is moved in) and a queued status.

        A write that fails removes the half-made folder and raises :class:`StorageError`."""
        job_id = uuid.uuid4().hex
        folder = self.jobs / job_id
        status = {
            "id": job_id, "kind": kind, "state": "queued", "stage": None, "step": 0, "total": 0,
            "eta_seconds": None, "error": None, "created": time.time(), "started": None, "finished": None,
            "memory_level": 0, "outputs": [],
        }
        try:
            folder.mkdir()
            if isinstance(body, Path):
                os.replace(body, folder / INPUT_NAME)
            else:
                write_bytes(folder / INPUT_NAME, body, durable=True)
            self._write(folder, status)
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise StorageError(describe_write_error(err)) from None
        return status

    def status(self, job_id: str) -> dict[str, Any]:
        folder = self.folder(job_id)
        if job_id in self._unsaved:
            return dict(self._unsaved[job_id])
        try:
            return _read_status(folder)
        except (OSError, ValueError) as err:
            self.damaged[job_id] = f"status.json cannot be read ({err})"
            raise UnknownJob(job_id, f"job {job_id} is damaged: its status.json cannot be read") from None

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Change some fields of a job's status and write it atomically."""
        if "state" in fields and fields["state"] not in JOB_STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        with self._lock:
            status = self.status(job_id)
            status.update(fields)
            try:
                self._write(self.folder(job_id), status)
            except OSError as err:
                self._unsaved[job_id] = status
                raise StorageError(describe_write_error(err)) from None
            self._unsaved.pop(job_id, None)
            return status

    def list(self) -> list[dict[str, Any]]:
        """Every job's status, oldest first; damaged folders are skipped (see :attr:`damaged`)."""
        statuses = []
        for folder in self.jobs.iterdir():
            job_id = folder.name
            if not JOB_ID.match(job_id):
                continue
            if job_id in self._unsaved:
                statuses.append(dict(self._unsaved[job_id]))
                continue
            if not (folder / STATUS_NAME).is_file():
                continue
            try:
                statuses.append(_read_status(folder))
            except (OSError, ValueError) as err:
                if job_id not in self.damaged:
                    log.error("skipping damaged job folder %s: status.json cannot be read (%s)", folder, err)
                self.damaged[job_id] = f"status.json cannot be read ({err})"
        return sorted(statuses, key=lambda s: s["created"])

    def recover(self, message: str = "the backend stopped before this job finished; resubmit it to run it "
                                       "again") -> list[str]:
        """Jobs left queued or running are marked interrupted (after a restart, or when stopping).

        A status the disk refuses stays interrupted in memory: start-up goes on. Returns the ids."""
        interrupted = []
        for status in self.list():
            if status["state"] in ("queued", "running"):
                try:
                    self.update(status["id"], state="interrupted", finished=time.time(), error=message)
                except StorageError as err:
                    log.error("job %s: cannot record that it was interrupted: %s", status["id"], err)
                interrupted.append(status["id"])
        return interrupted

    def delete(self, job_id: str) -> None:
        """Remove a job's folder and everything in it."""
        with self._lock:
            folder = self.folder(job_id)
            self._unsaved.pop(job_id, None)
            self.damaged.pop(job_id, None)
            shutil.rmtree(folder)

    def prune(self, keep_days: float | None, keep_jobs: int | None, now: float | None = None) -> list[str]:
        """Delete finished jobs older than ``keep_days`` or beyond the newest ``keep_jobs``; returns their ids."""
        now = time.time() if now is None else now
        finished = [s for s in self.list() if s["state"] in FINAL_STATES]
        finished.sort(key=lambda s: s.get("finished") or s["created"], reverse=True)
        doomed = []
        for rank, status in enumerate(finished):
            ended = status.get("finished") or status["created"]
            too_many = keep_jobs is not None and rank >= keep_jobs
            if too_many or (keep_days is not None and now - ended > keep_days * DAY):
                doomed.append(status["id"])
        for job_id in doomed:
            try:
                self.delete(job_id)
            except (UnknownJob, OSError) as err:
                log.warning("could not delete old job %s: %s", job_id, err)
        return doomed

    def write_preview(self, job_id: str, png: bytes) -> None:
        write_bytes(self.folder(job_id) / PREVIEW_NAME, png)

    def _write(self, folder: Path, status: dict[str, Any]) -> None:
        write_bytes(folder / STATUS_NAME, json.dumps(status, indent=1).encode("utf-8"), durable=True)


def _read_status(folder: Path) -> dict[str, Any]:
    """A job's status from disk; ValueError when it is not a status (truncated, not JSON, fields missing)."""
    status = json.loads((folder / STATUS_NAME).read_text("utf-8"))
    if not isinstance(status, dict) or status.get("id") != folder.name or status.get("state") not in JOB_STATES \
            or not isinstance(status.get("created"), (int, float)):
        raise ValueError("not a job status")
    return status
