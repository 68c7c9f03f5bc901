"""The FastAPI application: HTTP only. It validates and stores; the worker trains.

Run with `uvicorn api.app:create_app --factory` or `prefix-rft serve`. This process never imports
torch (tests/test_boundaries.py checks it): jobs are enqueued by task name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Histogram

from api.deps import Services
from api.errors import document_error_responses, install_error_handlers
from api.routes import datasets, health, jobs, models, rewards
from core.rewards import SandboxLimits, SandboxPool
from service.db import make_engine, make_sessionmaker
from service.queue import make_celery
from service.reaper import Reaper
from service.settings import Settings, get_settings
from service.storage import open_storage

log = logging.getLogger(__name__)

REQUESTS = Counter("prefix_rft_http_requests", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "prefix_rft_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    services = Services(
        settings=settings,
        sessions=make_sessionmaker(engine),
        storage=open_storage(
            settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
        ),
        celery=make_celery(settings),
        sandbox=SandboxPool(SandboxLimits.from_settings(settings)),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = Reaper(settings, services.sessions, services.celery) if settings.reaper_seconds else None
        if reaper:
            reaper.start()
        yield
        if reaper:
            reaper.stop()
        services.sandbox.close()
        engine.dispose()

    app = FastAPI(
        title="Prefix-RFT fine-tuning service",
        version="0.1.0",
        description="Upload datasets and rewards, run jobs that blend SFT and RL, download adapters.",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    document_error_responses(app)
    for module in (datasets, rewards, jobs, models, health):
        app.include_router(module.router)

    @app.middleware("http")
    async def record_metrics(request: Request, call_next) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")  # the template, so ids do not explode the labels
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        return response

    return app
