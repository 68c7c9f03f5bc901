"""The FastAPI application: HTTP only. It validates and stores; the worker trains.

Run with `uvicorn api.app:create_app --factory` or `prefix-rft serve`. This process never imports
torch (tests/test_boundaries.py checks it): jobs are enqueued by task name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import Services
from api.errors import document_error_responses, install_api_error_handlers
from api.routes import (
    completions,
    dashboard,
    estimates,
    event_streams,
    files,
    fine_tuning,
    graders,
    health,
    models,
    webhooks,
)
from core.rewards import SandboxLimits, SandboxPool
from protocol.request_ids import RequestIds
from service.db import make_engine, make_sessionmaker
from service.judge import ChatJudge
from service.queue import make_celery
from service.reaper import Reaper
from service.settings import Settings, get_settings
from service.storage import open_storage
from service.webhooks import WebhookSender

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
        judge=ChatJudge(settings.judge_models),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = Reaper(settings, services.sessions, services.celery) if settings.reaper_seconds else None
        if reaper:
            reaper.start()
        sender = WebhookSender(settings, services.sessions)
        sender.start()
        yield
        sender.stop()
        if reaper:
            reaper.stop()
        services.sandbox.close()
        services.judge.close()
        engine.dispose()

    app = FastAPI(
        title="Prefix-RFT fine-tuning service",
        version="0.1.0",
        description="Upload training files, run fine-tuning jobs that blend SFT and RL with graders, download adapters, chat with the results.",
        lifespan=lifespan,
    )
    app.state.services = services
    install_api_error_handlers(app)
    document_error_responses(app)
    for module in (
        files,
        event_streams,
        fine_tuning,
        estimates,
        graders,
        webhooks,
        models,
        completions,
        health,
        dashboard,
    ):
        app.include_router(module.router)
    app.mount("/ui", dashboard.dashboard_files(), name="dashboard")

    app.add_middleware(RecordMetrics)
    app.add_middleware(RequestIds)  # outermost: error responses carry the id too
    return app


class RecordMetrics:
    """Counts requests and times them to the start of the response (a stream's first byte).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect
    from the handlers (`Request.is_disconnected`), which inference needs to free its rows.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")  # the template, so ids do not explode the labels
                LATENCY.labels(scope["method"], path).observe(time.perf_counter() - started)
                REQUESTS.labels(scope["method"], path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, timed_send)
