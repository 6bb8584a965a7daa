"""Durable job store: one folder per job with its inputs, its status and its outputs.

Layout under the store's root::

    jobs/<id>/input.npz      the job exactly as it arrived
    jobs/<id>/status.json    state, stage, step, error... (replaced atomically on every change)
    jobs/<id>/preview.png    the latest preview, when there is one
    jobs/<id>/outputs/...    what the job wrote

Everything a job needs to run again is on disk, so a restarted backend can still hand out
finished results and re-run jobs it was interrupted in. Job ids are 32 hex digits and checked
before any path is built from them; output names are resolved and must stay inside the job.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..atomic import write_bytes
from ..protocol import JOB_STATES
from ..validation import InputError

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
INPUT_NAME = "input.npz"
STATUS_NAME = "status.json"
PREVIEW_NAME = "preview.png"
OUTPUTS = "outputs"


class UnknownJob(KeyError):
    """No job with that id in the store (or an id that cannot name one)."""


class JobStore:
    """Jobs on disk; thread-safe for the one worker and the many request handlers."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.jobs = self.root / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ paths
    def folder(self, job_id: str) -> Path:
        """The job's folder; refuses anything that is not a well-formed id of an existing job."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise UnknownJob(job_id)
        folder = self.jobs / job_id
        if not (folder / STATUS_NAME).is_file():
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
    def create(self, kind: str, body: bytes) -> dict[str, Any]:
        """Store a new job's inputs and a queued status; returns the status."""
        job_id = uuid.uuid4().hex
        folder = self.jobs / job_id
        folder.mkdir()
        write_bytes(folder / INPUT_NAME, body, durable=True)
        status = {
            "id": job_id, "kind": kind, "state": "queued", "stage": None, "step": 0, "total": 0,
            "eta_seconds": None, "error": None, "created": time.time(), "started": None, "finished": None,
            "memory_level": 0, "outputs": [],
        }
        self._write(folder, status)
        return status

    def status(self, job_id: str) -> dict[str, Any]:
        folder = self.folder(job_id)
        return json.loads((folder / STATUS_NAME).read_text())

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Change some fields of a job's status and write it atomically."""
        if "state" in fields and fields["state"] not in JOB_STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        with self._lock:
            status = self.status(job_id)
            status.update(fields)
            self._write(self.folder(job_id), status)
            return status

    def list(self) -> list[dict[str, Any]]:
        """Every job's status, oldest first."""
        statuses = []
        for folder in self.jobs.iterdir():
            if JOB_ID.match(folder.name) and (folder / STATUS_NAME).is_file():
                statuses.append(json.loads((folder / STATUS_NAME).read_text()))
        return sorted(statuses, key=lambda s: s["created"])

    def recover(self) -> list[str]:
        """After a restart: jobs left queued or running are marked interrupted. Returns their ids."""
        interrupted = []
        for status in self.list():
            if status["state"] in ("queued", "running"):
                self.update(status["id"], state="interrupted", finished=time.time(),
                            error="the backend stopped before this job finished; resubmit it to run it again")
                interrupted.append(status["id"])
        return interrupted

    def write_preview(self, job_id: str, png: bytes) -> None:
        write_bytes(self.folder(job_id) / PREVIEW_NAME, png)

    def _write(self, folder: Path, status: dict[str, Any]) -> None:
        write_bytes(folder / STATUS_NAME, json.dumps(status, indent=1).encode("utf-8"), durable=True)
