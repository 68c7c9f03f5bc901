"""Webhook endpoints of the caller's project: where it hears that its jobs ended (service/webhooks.py).

The secret that verifies the signatures is shown once, when the endpoint is made. Deliveries of
an endpoint list what was sent, with each one's attempts and last answer, newest first.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from api.deps import ProjectDep, ServicesDep, SessionDep, owned
from api.errors import error_responses
from api.schemas import (
    WebhookDeliveryOut,
    WebhookDeliveryPage,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointOut,
    WebhookEndpointPage,
)
from protocol.errors import APIError
from service.db import transaction
from service.tables import WebhookDelivery, WebhookEndpoint
from service.webhooks import EVENT_TYPES, RefusedDestination, allows_private, check_destination, new_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
MAX_ENDPOINTS = 20  # per project


def _out(endpoint: WebhookEndpoint, secret: str | None = None) -> WebhookEndpointOut:
    return WebhookEndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events,
        description=endpoint.description,
        created_at=int(endpoint.created_at.timestamp()),
        secret=secret,
    )


@router.post("", response_model=WebhookEndpointOut, responses=error_responses(400, 409))
def create_webhook_endpoint(
    body: WebhookEndpointCreate, project_id: ProjectDep, services: ServicesDep
) -> WebhookEndpointOut:
    """Register a URL; the answer holds its signing secret, which is never shown again."""
    try:
        check_destination(body.url, allows_private(services.settings))
    except RefusedDestination as exc:
        raise APIError(400, "invalid_url", f"url {body.url!r} {exc}", "url") from None
    with transaction(services.sessions) as session:
        count = session.scalar(
            select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id)
        )
        if count >= MAX_ENDPOINTS:
            raise APIError(
                409, "too_many_endpoints", f"a project has at most {MAX_ENDPOINTS} webhook endpoints"
            )
        endpoint = WebhookEndpoint(
            project_id=project_id,
            url=body.url,
            events=list(dict.fromkeys(body.events or EVENT_TYPES)),
            description=body.description,
            secret=new_secret(),
        )
        session.add(endpoint)
        session.flush()
        return _out(endpoint, endpoint.secret)


@router.get("", response_model=WebhookEndpointPage)
def list_webhook_endpoints(session: SessionDep, project_id: ProjectDep) -> WebhookEndpointPage:
    rows = session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.project_id == project_id)
        .order_by(WebhookEndpoint.id.desc())
    ).all()
    return WebhookEndpointPage(data=[_out(e) for e in rows], has_more=False)


@router.get("/{endpoint_id}", response_model=WebhookEndpointOut)
def retrieve_webhook_endpoint(
    endpoint_id: str, session: SessionDep, project_id: ProjectDep
) -> WebhookEndpointOut:
    return _out(owned(session, WebhookEndpoint, endpoint_id, project_id))


@router.delete("/{endpoint_id}", response_model=WebhookEndpointDeleted)
def delete_webhook_endpoint(
    endpoint_id: str, project_id: ProjectDep, services: ServicesDep
) -> WebhookEndpointDeleted:
    """The endpoint and its deliveries, pending ones included, go."""
    with transaction(services.sessions) as session:
        session.delete(owned(session, WebhookEndpoint, endpoint_id, project_id))
    return WebhookEndpointDeleted(id=endpoint_id)


@router.get("/{endpoint_id}/deliveries", response_model=WebhookDeliveryPage)
def list_webhook_deliveries(
    endpoint_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> WebhookDeliveryPage:
    """The newest deliveries first."""
    endpoint = owned(session, WebhookEndpoint, endpoint_id, project_id)
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit + 1)
    ).all()

    def seconds(value) -> int | None:
        return int(value.timestamp()) if value else None

    data = [
        WebhookDeliveryOut(
            id=d.id,
            event_type=d.event_type,
            event=json.loads(d.body),
            status=d.status,
            attempts=d.attempts,
            next_attempt_at=seconds(d.next_attempt_at) if d.status == "pending" else None,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            created_at=seconds(d.created_at),
            delivered_at=seconds(d.delivered_at),
        )
        for d in rows[:limit]
    ]
    return WebhookDeliveryPage(data=data, has_more=len(rows) > limit)
