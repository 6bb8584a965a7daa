"""The HTTP API (FastAPI): submit jobs, follow them, fetch previews and results, cancel.

Routes live under ``/v1``; the OpenAPI schema is served at ``/openapi.json`` and browsable at
``/docs``. When a token is set (always, off the loopback address) every route but
``/v1/health`` needs ``Authorization: Bearer <token>``. Job bodies are ``.npz`` files in the
shared wire format (:mod:`backend.protocol`), read without pickles; a bad field answers 422
naming it.
"""

from __future__ import annotations

import hmac
import io
import zipfile
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from .. import __version__
from ..protocol import API_VERSION, read_job
from ..validation import InputError
from .config import ServerConfig
from .store import JobStore, UnknownJob
from .worker import Worker

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


class Version(Health):
    device: str
    dtype: str
    models_loaded: dict[str, str]
    models: dict[str, str]
    tasks: dict[str, TaskModel]
    queued: int
    running: str | None


def create_app(config: ServerConfig, store: JobStore, worker: Worker) -> FastAPI:
    app = FastAPI(title="MVDiffusion texturing backend", version=__version__,
                  description=__doc__.split("\n\n")[0])

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
        return JSONResponse({"detail": {"field": err.field, "problem": err.problem}}, status_code=422)

    @app.exception_handler(UnknownJob)
    async def unknown_job(_: Request, err: UnknownJob) -> JSONResponse:
        return JSONResponse({"detail": "no such job"}, status_code=404)

    @app.get("/v1/health", response_model=Health, tags=["service"])
    def health() -> dict[str, Any]:
        """Is the backend up, and which API does it speak. Needs no token."""
        return {"status": "ok", "api_version": API_VERSION, "backend_version": __version__}

    @app.get("/v1/version", response_model=Version, dependencies=guarded, tags=["service"])
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
        }

    @app.post(
        "/v1/jobs", status_code=201, response_model=JobStatus, dependencies=guarded, tags=["jobs"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
        responses={413: {"description": "body too large"}, 422: {"description": "a field is invalid"}},
    )
    async def submit(request: Request) -> dict[str, Any]:
        """Submit a texture or panorama job: the ``.npz`` bytes of the wire format."""
        body = await _read_limited(request, config.max_body_bytes)
        job = read_job(body, max_bytes=config.max_unpacked_bytes)
        status = store.create(job.kind, body)
        worker.submit(status["id"])
        return status

    @app.get("/v1/jobs", response_model=list[JobStatus], dependencies=guarded, tags=["jobs"])
    def list_jobs() -> list[dict[str, Any]]:
        """Every job in the store, oldest first."""
        return store.list()

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, dependencies=guarded, tags=["jobs"])
    def job_status(job_id: str = JobId) -> dict[str, Any]:
        """State, stage, step of total, ETA of the stage, error."""
        return store.status(job_id)

    @app.get("/v1/jobs/{job_id}/preview", dependencies=guarded, tags=["jobs"],
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "no preview yet"}})
    def job_preview(job_id: str = JobId) -> Response:
        """The latest preview image (PNG) of a running or finished job."""
        path = store.preview_path(job_id)
        if not path.is_file():
            raise HTTPException(404, "no preview yet")
        return Response(path.read_bytes(), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/result", dependencies=guarded, tags=["jobs"],
             responses={200: {"content": {"application/zip": {}}}, 409: {"description": "job not done"}})
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
             responses={409: {"description": "job not done"}, 422: {"description": "no such output"}})
    def job_file(job_id: str = JobId, name: str = PathParam(min_length=1, max_length=255)) -> FileResponse:
        """One output file of a finished job, by its name in ``outputs``."""
        _require_done(store.status(job_id))
        return FileResponse(store.output_file(job_id, name))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus, dependencies=guarded, tags=["jobs"])
    def cancel(job_id: str = JobId) -> dict[str, Any]:
        """Cancel: a queued job at once, a running one within one denoising step."""
        return worker.cancel(job_id)

    @app.post("/v1/jobs/{job_id}/resubmit", response_model=JobStatus, dependencies=guarded, tags=["jobs"],
              responses={409: {"description": "job queued, running or done"}})
    def resubmit(job_id: str = JobId) -> dict[str, Any]:
        """Run an interrupted, failed or cancelled job again from its stored inputs."""
        status = store.status(job_id)
        if status["state"] in ("queued", "running", "done"):
            raise HTTPException(409, f"job is {status['state']}; only interrupted, failed or cancelled jobs run again")
        status = store.update(job_id, state="queued", stage=None, step=0, total=0, error=None,
                              started=None, finished=None, outputs=[])
        worker.submit(job_id)
        return status

    return app


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise InputError("body", "is empty; send the job's .npz bytes")
    return b"".join(chunks)


def _require_done(status: dict[str, Any]) -> None:
    if status["state"] != "done":
        raise HTTPException(409, f"job is {status['state']}, not done")
