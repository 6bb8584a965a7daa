"""The HTTP API (FastAPI): submit jobs, follow them, fetch previews and results, cancel.

Routes live under ``/v1``; the OpenAPI schema is served at ``/openapi.json`` and browsable at
``/docs``. When a token is set (always, off the loopback address) every route but
``/v1/health`` needs ``Authorization: Bearer <token>``, the schema and the docs included. Every
request passes :class:`~backend.server.guard.RequestGuard` first (known Host names, no foreign
browser origin). Job bodies are ``.npz`` files in the shared wire format (:mod:`backend.protocol`),
streamed to the store's disk, then checked off the event loop (headers and limits first, see
:mod:`backend.server.admission`); a bad field answers 422 naming it, a job over a limit 413.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import os
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from .. import __version__
from ..protocol import API_VERSION, read_job
from ..validation import InputError
from .admission import TooLarge, admit_header, admit_job
from .config import ServerConfig
from .guard import JOB_CONTENT_TYPES, RequestGuard
from .store import JobStore, StorageError, UnknownJob, describe_write_error
from .worker import Worker

REFUSED = {
    400: {"description": "the Host header names a host this backend does not answer to"},
    403: {"description": "a browser request from another web page or site"},
}
GUARDED = {**REFUSED, 401: {"description": "missing or wrong token (token mode)"}}
UNKNOWN = {404: {"description": "no such job, or its folder is damaged"}}

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
JobId = PathParam(pattern=JOB_ID_PATTERN, description="32 hex digits, as returned on submission")


class JobStatus(BaseModel):
    id: str
    kind: str
    state: str
    stage: str | None
    step: int
    total: int
    eta_seconds: float | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    memory_level: int
    outputs: list[str]


class Health(BaseModel):
    status: str
    api_version: int
    backend_version: str


class TaskModel(BaseModel):
    """What a task's model is made of (``ModelSet.describe``)."""

    base_model: str
    multiview_weights: str
    base_kind: str  # sd2_depth, sd15_controlnet or sdxl_controlnet (backend.models.catalog.BASE_KINDS)
    native_view_size: int  # the base model's native square view size in pixels
    controlnet: str | None = None  # the depth task's ControlNet, for the ControlNet kinds


class Version(Health):
    device: str
    dtype: str
    models_loaded: dict[str, str]
    models: dict[str, str]
    tasks: dict[str, TaskModel]
    queued: int
    running: str | None
    instance_id: str
    pid: int
    damaged_jobs: dict[str, str]


def create_app(config: ServerConfig, store: JobStore, worker: Worker) -> FastAPI:
    app = FastAPI(title="MVDiffusion texturing backend", version=__version__,
                  description=__doc__.split("\n\n")[0], docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=config.allowed_hosts())

    def authorised(request: Request) -> None:
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), config.token.encode()):
            raise HTTPException(401, "missing or wrong token (send 'Authorization: Bearer <token>')",
                                headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorised)]

    @app.exception_handler(InputError)
    async def input_error(_: Request, err: InputError) -> JSONResponse:
        status = 413 if isinstance(err, TooLarge) else 422
        return JSONResponse({"detail": {"field": err.field, "problem": err.problem}}, status_code=status)

    @app.exception_handler(UnknownJob)
    async def unknown_job(_: Request, err: UnknownJob) -> JSONResponse:
        return JSONResponse({"detail": err.message}, status_code=404)

    @app.exception_handler(StorageError)
    async def storage_error(_: Request, err: StorageError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=507)

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/v1/health", response_model=Health, tags=["service"], responses=REFUSED)
    def health() -> dict[str, Any]:
        """Is the backend up, and which API does it speak. Needs no token."""
        return {"status": "ok", "api_version": API_VERSION, "backend_version": __version__}

    @app.get("/v1/version", response_model=Version, dependencies=guarded, tags=["service"], responses=GUARDED)
    def version() -> dict[str, Any]:
        """Versions, the device, which models are configured and which are loaded, the queue.

        ``tasks`` says per task which base model and which multi-view weights a job runs with
        (``"none"``: the blocks are at identity and the views are the base model's alone)."""
        models = worker.models
        return {
            "status": "ok", "api_version": API_VERSION, "backend_version": __version__,
            "device": models.device, "dtype": models.dtype, "models_loaded": models.loaded(),
            "models": {task: models.source_label(task) for task in ("depth", "panorama")},
            "tasks": {task: models.describe(task) for task in ("depth", "panorama")},
            "queued": worker.queued, "running": worker.current,
            "instance_id": config.instance_id, "pid": os.getpid(), "damaged_jobs": dict(store.damaged),
        }

    @app.post(
        "/v1/jobs", status_code=201, response_model=JobStatus, dependencies=guarded, tags=["jobs"],
        openapi_extra={"requestBody": {"required": True, "content": {
            t: {"schema": {"type": "string", "format": "binary"}} for t in JOB_CONTENT_TYPES}}},
        responses={**GUARDED, 408: {"description": "the upload was too slow"},
                   413: {"description": "body too large, or the job is over a server limit (names the field)"},
                   415: {"description": "the body is not sent as application/octet-stream"},
                   422: {"description": "a field is invalid"},
                   507: {"description": "the job store's disk is full or cannot be written"}},
    )
    async def submit(request: Request) -> dict[str, Any]:
        """Submit a texture or panorama job: the ``.npz`` bytes of the wire format."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media not in JOB_CONTENT_TYPES:
            raise HTTPException(415, f"send the job as {' or '.join(JOB_CONTENT_TYPES)}, not {media or 'no type'}")
        path = store.upload_path()
        try:
            await _receive_to_file(request, path, config)
            return await run_in_threadpool(accept, path)
        finally:
            path.unlink(missing_ok=True)

    def accept(path: Path) -> dict[str, Any]:
        """Check an uploaded job (limits from its headers first) and queue it; runs off the event loop."""
        job = read_job(path, max_bytes=config.max_unpacked_bytes,
                       admit=partial(admit_header, limits=config.limits))
        admit_job(job, config.limits)
        status = store.create(job.kind, path)
        worker.submit(status["id"])
        return status

    @app.get("/v1/jobs", response_model=list[JobStatus], dependencies=guarded, tags=["jobs"], responses=GUARDED)
    def list_jobs() -> list[dict[str, Any]]:
        """Every job in the store, oldest first (damaged job folders are left out; see ``/v1/version``)."""
        return store.list()

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, dependencies=guarded, tags=["jobs"],
             responses={**GUARDED, **UNKNOWN})
    def job_status(job_id: str = JobId) -> dict[str, Any]:
        """State, stage, step of total, ETA of the stage, error."""
        return store.status(job_id)

    @app.get("/v1/jobs/{job_id}/preview", dependencies=guarded, tags=["jobs"],
             responses={**GUARDED, 200: {"content": {"image/png": {}}},
                        404: {"description": "no such job, or no preview yet"}})
    def job_preview(job_id: str = JobId) -> Response:
        """The latest preview image (PNG) of a running or finished job."""
        path = store.preview_path(job_id)
        if not path.is_file():
            raise HTTPException(404, "no preview yet")
        return Response(path.read_bytes(), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/result", dependencies=guarded, tags=["jobs"],
             responses={**GUARDED, **UNKNOWN, 200: {"content": {"application/zip": {}}},
                        409: {"description": "job not done"}})
    def job_result(job_id: str = JobId) -> Response:
        """Every output of a finished job as one zip."""
        _require_done(store.status(job_id))
        outputs = store.outputs(job_id)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name in store.output_names(job_id):
                archive.write(outputs / name, name)
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'})

    @app.get("/v1/jobs/{job_id}/files/{name:path}", dependencies=guarded, tags=["jobs"],
             responses={**GUARDED, **UNKNOWN, 409: {"description": "job not done"},
                        422: {"description": "no such output"}})
    def job_file(job_id: str = JobId, name: str = PathParam(min_length=1, max_length=255)) -> FileResponse:
        """One output file of a finished job, by its name in ``outputs``."""
        _require_done(store.status(job_id))
        return FileResponse(store.output_file(job_id, name))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus, dependencies=guarded, tags=["jobs"],
              responses={**GUARDED, **UNKNOWN})
    def cancel(job_id: str = JobId) -> dict[str, Any]:
        """Cancel: a queued job at once, a running one within one denoising step."""
        return worker.cancel(job_id)

    @app.post("/v1/jobs/{job_id}/resubmit", response_model=JobStatus, dependencies=guarded, tags=["jobs"],
              responses={**GUARDED, **UNKNOWN, 409: {"description": "job queued, running or done"}})
    def resubmit(job_id: str = JobId) -> dict[str, Any]:
        """Run an interrupted, failed or cancelled job again from its stored inputs."""
        status = store.status(job_id)
        if status["state"] in ("queued", "running", "done"):
            raise HTTPException(409, f"job is {status['state']}; only interrupted, failed or cancelled jobs run again")
        status = store.update(job_id, state="queued", stage=None, step=0, total=0, error=None,
                              started=None, finished=None, outputs=[])
        worker.submit(job_id)
        return status

    @app.delete("/v1/jobs/{job_id}", status_code=204, dependencies=guarded, tags=["jobs"],
                responses={**GUARDED, **UNKNOWN, 409: {"description": "job queued or running: cancel it first"}})
    def delete(job_id: str = JobId) -> Response:
        """Delete a finished, failed, cancelled or interrupted job with its inputs and outputs.

        A queued or running job is refused (409): cancel it first, then delete it."""
        with worker.lock:
            state = store.status(job_id)["state"]
            if state in ("queued", "running"):
                raise HTTPException(409, f"job is {state}; cancel it first, then delete it")
            store.delete(job_id)
        return Response(status_code=204)

    return app


async def _receive_to_file(request: Request, path: Path, config: ServerConfig) -> None:
    """Stream the body to ``path``: 413 past the size limit, 408 when it stalls or takes too long.

    The body never sits whole in memory, and a client that sends slowly or stops sending is
    dropped instead of holding a connection and a file open forever."""
    limit = config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.upload_timeout
    stream = request.stream().__aiter__()
    size = 0
    try:
        with open(path, "wb") as out:
            while True:
                wait = min(config.upload_idle_timeout, deadline - loop.time())
                try:
                    if wait <= 0:
                        raise asyncio.TimeoutError
                    chunk = await asyncio.wait_for(stream.__anext__(), wait)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise HTTPException(408, f"the upload stalled or took longer than {config.upload_timeout:.0f} s "
                                             f"after {size} bytes", headers={"Connection": "close"}) from None
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"body is over the limit of {limit} bytes")
                out.write(chunk)
                out.flush()
    except OSError as err:
        raise StorageError(describe_write_error(err)) from None
    if size == 0:
        raise InputError("body", "is empty; send the job's .npz bytes")


def _require_done(status: dict[str, Any]) -> None:
    if status["state"] != "done":
        raise HTTPException(409, f"job is {status['state']}, not done")
