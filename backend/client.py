"""A small client for the backend's HTTP API, on the standard library only.

Blender's Python has no ``requests``; this module needs nothing beyond ``urllib``, so the add-on,
scripts and tests all talk to the backend through the same code.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .protocol import FINAL_STATES


class BackendError(RuntimeError):
    """The backend answered with an error, or could not be reached; ``status`` is the HTTP code (0: none)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status, self.message = status, message


class BackendClient:
    def __init__(self, url: str = "http://127.0.0.1:8765", token: str | None = None, timeout: float = 30.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    # ------------------------------------------------------------------ routes
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def version(self) -> dict[str, Any]:
        return self._json("GET", "/v1/version")

    def submit(self, job_bytes: bytes) -> dict[str, Any]:
        return self._json("POST", "/v1/jobs", job_bytes, "application/octet-stream")

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/jobs")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def resubmit(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/resubmit")

    def delete(self, job_id: str) -> None:
        """Delete a finished job and its files (a queued or running one answers 409: cancel it first)."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def preview(self, job_id: str) -> bytes | None:
        """The latest preview PNG, or None while there is none."""
        try:
            return self._request("GET", f"/v1/jobs/{job_id}/preview")
        except BackendError as err:
            if err.status == 404:
                return None
            raise

    def result(self, job_id: str, out_dir: str | Path) -> list[Path]:
        """Download every output of a finished job into ``out_dir``; returns the files written."""
        data = self._request("GET", f"/v1/jobs/{job_id}/result")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                target = (out / name).resolve()
                if not target.is_relative_to(out.resolve()):
                    raise BackendError(0, f"refusing an output outside the folder: {name!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
                written.append(target)
        return written

    def wait(self, job_id: str, on_status: Callable[[dict], None] | None = None, poll: float = 0.5,
             timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job ends; returns its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if on_status is not None:
                on_status(status)
            if status["state"] in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise BackendError(0, f"job {job_id} still {status['state']} after {timeout} s")
            time.sleep(poll)

    # ------------------------------------------------------------------ plumbing
    def _json(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        return json.loads(self._request(method, path, body, content_type))

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            raise BackendError(err.code, _detail(err.read())) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise BackendError(0, f"cannot reach the backend at {self.url}: {reason}") from None


def _detail(body: bytes) -> str:
    """The readable part of an error answer: FastAPI's ``detail``, field and problem when given."""
    try:
        detail = json.loads(body).get("detail", body.decode("utf-8", "replace"))
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:500]
    if isinstance(detail, dict) and "field" in detail:
        return f"{detail['field']}: {detail['problem']}"
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]
