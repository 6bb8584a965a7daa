"""``python -m backend serve``: the job store, the worker and the HTTP routes in one process."""

from __future__ import annotations

import logging

import uvicorn

from ..engine import ModelSet
from .app import create_app
from .config import ServerConfig
from .store import JobStore
from .worker import Worker

log = logging.getLogger("backend.server")


def build(config: ServerConfig) -> tuple:
    """Store (recovered after a restart), models, a started worker and the app."""
    config = config.validated()
    store = JobStore(config.store)
    interrupted = store.recover()
    if interrupted:
        log.warning("marked %d job(s) interrupted by the last shutdown: %s", len(interrupted), ", ".join(interrupted))
    worker = Worker(store, ModelSet(config.models))
    worker.start()
    return store, worker, create_app(config, store, worker)


def serve(config: ServerConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, worker, app = build(config)
    log.info("job store: %s", config.store)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    finally:
        worker.stop()
