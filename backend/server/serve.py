"""``python -m backend serve``: the job store, the worker and the HTTP routes in one process.

Stopping (Ctrl+C, SIGTERM) is graceful: the server stops taking requests, the running job is
asked to stop, and every job that did not finish is marked interrupted on disk before the
process exits, so a restart never finds a job ``running`` that no process runs.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import uvicorn
from fastapi.concurrency import run_in_threadpool

from ..engine import ModelSet
from .app import create_app
from .config import ServerConfig
from .store import JobStore
from .worker import Worker

log = logging.getLogger("backend.server")
GRACEFUL_SECONDS = 5  # how long open requests may finish once a stop was asked for


def build(config: ServerConfig) -> tuple:
    """Store (recovered after a restart, old jobs pruned), models, a started worker and the app."""
    config = config.validated()
    store = JobStore(config.store)
    interrupted = store.recover()
    if interrupted:
        log.warning("marked %d job(s) interrupted by the last shutdown: %s", len(interrupted), ", ".join(interrupted))
    for job_id, reason in store.damaged.items():
        log.error("job %s is damaged and skipped: %s", job_id, reason)

    def prune() -> None:
        removed = store.prune(config.retention.keep_days, config.retention.keep_jobs)
        if removed:
            log.info("deleted %d finished job(s) past the retention limits", len(removed))

    prune()
    worker = Worker(store, ModelSet(config.models), after_job=prune)
    worker.start()
    app = create_app(config, store, worker)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(worker.stop)

    app.router.lifespan_context = lifespan
    return store, worker, app


def serve(config: ServerConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, worker, app = build(config)
    log.info("job store: %s", config.store)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="info",
                    timeout_graceful_shutdown=GRACEFUL_SECONDS)
    finally:
        worker.stop()
