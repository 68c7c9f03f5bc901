"""Liveness, readiness (database, broker, storage) and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import text

from api.deps import ServicesDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process answers; says nothing about its dependencies."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description="database, broker, storage: `ok` or why unreachable.")


@router.get(
    "/ready",
    responses={
        200: {"model": Readiness, "description": "Every dependency is reachable"},
        503: {"model": Readiness, "description": "A dependency is unreachable"},
    },
)
def ready(services: ServicesDep) -> JSONResponse:
    """Whether the database, the broker and the object storage are reachable."""
    checks = {"database": _check_database, "broker": _check_broker, "storage": lambda s: s.storage.check()}
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check(services)
            results[name] = "ok"
        except Exception as exc:
            log.warning("readiness: %s unreachable: %s", name, exc)
            results[name] = f"unreachable: {type(exc).__name__}: {exc}"[:300]
    ok = all(v == "ok" for v in results.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": results}, 200 if ok else 503)


def _check_database(services) -> None:
    with services.sessions() as session:
        session.execute(text("SELECT 1"))


def _check_broker(services) -> None:
    with services.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
def metrics() -> Response:
    """Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
